"""stage=dpo end to end through the real CLI: pretrain -> sft -> dpo -> chat on the tiny corpus, the loss
starting at ln 2, the TensorBoard tags, exact resume (with the reference cache deleted in between), errors."""

import json
import math
import subprocess
import sys

import pytest

from rgpt.runtime import checkpoint as ckpt
from tests.nn.test_dpo import PAIRS
from tests.training.test_train_cli import (
    assert_one_line_error,
    assert_same_weights,
    ckpts,
    cli_args,
    copy_out_dir,
    history,
    run,
    run_dir,
    scalar_curve,
    tensorboard,
    weights,
)

DPO = ("train.batch_size=2", "train.grad_accum=1", "data.val_fraction=0.25", "train.lr=1e-3")
STEPS_PER_EPOCH = 4  # 7 training pairs (5 held out by hash) in micro-batches of 2


def run_dpo(corpus, out_dir, *extra, pairs=PAIRS, rc=0) -> subprocess.CompletedProcess:
    args = [a for a in cli_args(corpus, out_dir, stage="dpo") if not a.startswith("data.files=")]
    return run([*args, f"data.files=[{pairs}]", *DPO, *extra], rc=rc)


@pytest.fixture(scope="module")
def straight(corpus, sft, tmp_path_factory):
    out = copy_out_dir(sft, tmp_path_factory.mktemp("dpo") / "out")
    proc = run_dpo(corpus, out, "resume=true", "train.max_epochs=2")
    return out, proc


def test_sft_then_dpo_then_chat(corpus, straight):
    out, proc = straight
    best_sft = ckpt.find(run_dir(out, "sft") / "checkpoints", "best")
    assert f"starting preference tuning from the instruction-tuned model {best_sft}" in proc.stdout
    assert "reference log-probabilities of 12 pairs computed" in proc.stdout
    (final,) = ckpts(out, "final", stage="dpo")
    state = ckpt.read_state(final)
    assert state["stage"] == "dpo" and state["step"] == 2 * STEPS_PER_EPOCH
    assert state["dpo_reference"] == {
        "path": str(best_sft),
        "sha256": ckpt.read_state(best_sft)["files"][ckpt.MODEL]["sha256"],
    }
    start, end = weights(best_sft), weights(final)
    assert all(n in end for n in start) and any(not (start[n] == end[n]).all() for n in start), (
        "DPO moved nothing"
    )

    acc = tensorboard(run_dir(out, "dpo"))
    tags = acc.Tags()["scalars"]
    want = ["dpo/loss", "dpo/reward_margin", "dpo/accuracy", "dpo/chosen_logp", "dpo/rejected_logp"]
    want += ["val/loss", "dpo/val_accuracy", "dpo/val_logp_accuracy"]
    assert not [t for t in want if t not in tags], f"missing {[t for t in want if t not in tags]} in {tags}"
    loss = [e.value for e in acc.Scalars("dpo/loss")]
    assert len(loss) == 2 * STEPS_PER_EPOCH
    # the policy starts as the reference (dropout off in the dpo stage): margin 0, loss ln 2
    assert abs(loss[0] - math.log(2)) < 1e-5, f"first DPO loss {loss[0]} is not ln 2 = {math.log(2)}"
    assert abs(acc.Scalars("dpo/reward_margin")[0].value) < 1e-4
    assert loss[-1] < loss[0], f"DPO loss did not fall: {loss}"
    for tag in want:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag

    reply = run(
        [
            sys.executable,
            "-m",
            "rgpt.chat",
            f"checkpoint={run_dir(out, 'dpo')}",
            "prompt=山脉是什么？",
            "max_new_tokens=8",
            "threads=1",
        ]
    )
    assert reply.stdout.strip() and "Traceback" not in reply.stderr


def test_dpo_resumes_bit_identically_even_without_the_reference_cache(corpus, sft, straight, tmp_path):
    ref_out, _ = straight
    out = copy_out_dir(sft, tmp_path / "out")
    first = run_dpo(corpus, out, "resume=true", "train.max_epochs=2", "train.max_steps=3")
    assert "reference log-probabilities: cache hit" in first.stdout  # the straight run computed them
    (last,) = ckpts(out, "last", stage="dpo")
    assert (ckpt.read_state(last)["step"], ckpt.read_state(last)["pos"]) == (3, 3)
    for f in corpus.cache.glob(
        "dpo-reference-*"
    ):  # the resumed run must score the reference checkpoint again
        f.unlink()
    second = run_dpo(corpus, out, "resume=true", "train.max_epochs=2")
    assert "resuming" in second.stdout and "reference log-probabilities of 12 pairs computed" in second.stdout
    (want,) = ckpts(ref_out, "final", stage="dpo")
    (final,) = [p for p in ckpts(out, "final", stage="dpo") if p.name == want.name]
    assert_same_weights(final, want, "dpo 3 steps + resume")
    assert history(final) == history(want), "per-epoch losses differ from the straight run"
    for tag in ("dpo/loss", "dpo/accuracy", "val/loss", "dpo/val_accuracy"):
        got, ref = scalar_curve(run_dir(out, "dpo"), tag), scalar_curve(run_dir(ref_out, "dpo"), tag)
        assert got == ref, f"{tag}: {got} != {ref}"


def test_dpo_errors_are_one_line(corpus, sft, tmp_path):
    proc = run_dpo(corpus, tmp_path, rc=1)  # no resume: nothing to tune
    assert_one_line_error(proc, "resume=true")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        PAIRS.read_text(encoding="utf-8").splitlines()[0]
        + "\n"
        + json.dumps({"prompt": "问", "chosen": "好", "rejected": "差", "score": 3})
        + "\n",
        encoding="utf-8",
    )
    out = copy_out_dir(sft, tmp_path / "out")
    proc = run_dpo(corpus, out, "resume=true", pairs=bad, rc=1)
    assert_one_line_error(proc, f"{bad}:2", "unknown key 'score'")
