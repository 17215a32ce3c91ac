"""The data=mix recipe end to end through the real CLI, on a fixture shaped like a fetched corpus:
pretraining (packed, eval_every, token budget), then sft with replay, then chat."""

import json
import subprocess
import sys

import pytest

from tests.helpers import write_tiny_corpus
from tests.training.test_train_cli import assert_one_line_error, cli_env

RARE = "龘"  # only in the held-out slice: it must never reach the vocabulary


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """<root>/data/mix/{train/00000.txt, train/00001.txt, heldout.txt}, as `rgpt.data.fetch mix` lays it out."""
    root = tmp_path_factory.mktemp("recipe")
    pre, sft = write_tiny_corpus(root, seed=3, n_pre=160, n_sft=40, n_subjects=12, n_words=6)
    texts = [json.loads(line)["text"] for line in pre.read_text(encoding="utf-8").splitlines()]
    train = root / "data" / "mix" / "train"
    train.mkdir(parents=True)
    for k in range(2):
        (train / f"{k:05d}.txt").write_text("\n".join(texts[k::2]) + "\n", encoding="utf-8")
    (root / "data" / "mix" / "heldout.txt").write_text(f"{RARE}山脉形成于地球的表面。\n", encoding="utf-8")
    return root, sft


def train(root, sft, *extra):
    args = [sys.executable, "-m", "rgpt.train", "data=mix", "model=tiny", "out_dir=out", "threads=1"]
    args += ["precision=fp32"]  # not auto, which is bf16 or fp32 by CPU: the same path on every machine
    args += ["monitor.progress=false", "monitor.sample_tokens=4", f"tokenizer.files.sft=[{sft}]"]
    args += ["train.batch_size=4", "train.grad_accum=1", "train.warmup_steps=2", "train.cycle_steps=20"]
    return subprocess.run(
        args + list(extra), cwd=root, env=cli_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_mix_recipe_pretrains_then_tunes_with_replay(fetched):
    root, sft = fetched
    pre = train(root, sft, "train.max_tokens=3000", "train.eval_every=5")
    assert pre.returncode == 0, pre.stderr[-2000:]
    log = (root / "out" / "pretrain" / "mix" / "train.log").read_text(encoding="utf-8")
    assert "done: reached max_tokens=3000" in log, log[-1500:]
    assert log.count("val loss") >= 2, "eval_every=5 should validate mid-epoch"
    (vocab,) = (root / "out" / ".cache").glob("vocab-*.json")
    assert RARE not in vocab.read_text(encoding="utf-8"), "the held-out slice reached the vocabulary"

    tuned = train(
        root,
        sft,
        "stage=sft",
        "resume=true",
        f"data.files=[{sft}]",
        "train.max_epochs=2",
    )
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    log = (root / "out" / "sft" / "mix" / "train.log").read_text(encoding="utf-8")
    assert "starting instruction tuning from the pretrained model" in log and "/pretrain/mix/" in log
    n_replayed = int(log.split(" of them replayed pretraining text")[0].rsplit(", ", 1)[1])
    assert 40 < n_replayed < 120, f"replay_fraction=0.5 of 160 documents replayed {n_replayed}"
    assert "windows an epoch (data.replay_ratio=1.0)" in log, "the replay pool is not rotated"

    chat = subprocess.run(
        [sys.executable, "-m", "rgpt.chat", "out_dir=out", "max_new_tokens=8"],
        cwd=root,
        env=cli_env(),
        input="山脉是什么？\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    assert "sft/mix" in chat.stderr, "chat should pick the tuned mix model"


def test_mix_without_a_fetched_corpus_is_one_line_naming_the_fetch(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rgpt.train", "data=mix", "out_dir=out"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc, "data/mix/train", "python -m rgpt.data.fetch mix")
