"""rgpt as a package: the wheel carries its configs, corpus and pages, and trains from an empty directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_trains_from_an_empty_directory(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            REPO,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("rgpt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "rgpt/conf/config.yaml",
        "rgpt/conf/stage/sft.yaml",
        "rgpt/conf/preset/quick.yaml",
        "rgpt/corpus/idioms.tsv",
        "rgpt/inference/web/chat.html",
        "rgpt/viz/web/inspect.html",
    ):
        assert needed in names, f"the wheel lacks {needed}"
    assert any(n.startswith("rgpt/corpus/sft/") for n in names), "the wheel lacks the built-in dialogues"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # the installed package, as pip lays it out
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import rgpt; print(rgpt.__file__)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site)), f"imported {where.stdout.strip()}, not the wheel's rgpt"
    args = ["+preset=quick", "model=tiny", "train.max_steps=2", "precision=fp32", "monitor.progress=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "rgpt.train", *args],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: reached max_steps=2" in proc.stdout, proc.stdout[-2000:]
    assert (empty / "outputs" / "pretrain" / "quick" / ".hydra" / "config.yaml").exists()
