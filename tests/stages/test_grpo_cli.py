"""stage=grpo end to end through the real CLI: pretrain -> sft -> grpo -> chat on the tiny corpus, the KL 0 at
the first step, the TensorBoard tags, exact resume (3 steps + resume == 4 steps, bit for bit), errors."""

import math
import sys

import pytest

from rgpt.runtime import checkpoint as ckpt
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

# 2 prompts × 4 replies a micro-batch, 4 micro-batches an epoch: 2 steps an epoch (grad_accum 2)
GRPO = (  # also the precision matrix's (data.files apart)
    "grpo.group_size=4",
    "grpo.micro_batches=4",
    "grpo.max_reply_tokens=6",
    "grpo.val_problems=4",
    "train.batch_size=2",
    "train.lr=1e-3",
)
STEPS_PER_EPOCH = 2


def run_grpo(corpus, out_dir, *extra, rc=0):
    args = [a for a in cli_args(corpus, out_dir, stage="grpo") if not a.startswith("data.files=")]
    return run([*args, "data.files=[arithmetic,idiom]", *GRPO, *extra], rc=rc)


@pytest.fixture(scope="module")
def straight(corpus, sft, tmp_path_factory):
    out = copy_out_dir(sft, tmp_path_factory.mktemp("grpo") / "out")
    return out, run_grpo(corpus, out, "resume=true", "train.max_epochs=2")


TAGS = ["grpo/reward", "grpo/reward_arithmetic", "grpo/reward_idiom", "grpo/kl", "grpo/clip_fraction"]
TAGS += ["grpo/advantage_std", "grpo/reply_length", "grpo/rollout_sec", "grpo/update_sec", "val/loss"]
TAGS += ["grpo/val_reward", "grpo/val_accuracy_arithmetic", "grpo/val_accuracy_idiom"]


def test_sft_then_grpo_then_chat(straight):
    out, proc = straight
    best_sft = ckpt.find(run_dir(out, "sft") / "checkpoints", "best")
    assert (
        f"starting reinforcement learning on verifiable tasks from the instruction-tuned model {best_sft}"
        in (proc.stdout)
    )
    (final,) = ckpts(out, "final", stage="grpo")
    state = ckpt.read_state(final)
    assert state["stage"] == "grpo" and state["step"] == 2 * STEPS_PER_EPOCH
    assert state["grpo_reference"] == {
        "path": str(best_sft),
        "sha256": ckpt.read_state(best_sft)["files"][ckpt.MODEL]["sha256"],
    }
    acc = tensorboard(run_dir(out, "grpo"))
    tags = acc.Tags()["scalars"]
    assert not [t for t in TAGS if t not in tags], f"missing {[t for t in TAGS if t not in tags]} in {tags}"
    for tag in TAGS:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    # the policy is the reference at the first step (dropout off): the KL is exactly 0, nothing is clipped
    assert acc.Scalars("grpo/kl")[0].value == 0.0 and acc.Scalars("grpo/clip_fraction")[0].value == 0.0
    assert acc.Scalars("grpo/kl")[-1].value > 0.0, "the policy never left the reference"
    assert any(e.value > 0 for e in acc.Scalars("grpo/advantage_std")), "no group had different rewards"
    texts = acc.Tags()["tensors"]
    assert "grpo/replies/text_summary" in texts, texts  # the sampled replies, as TensorBoard text
    start, end = weights(best_sft), weights(final)
    assert any(not (start[n] == end[n]).all() for n in start), "GRPO moved nothing"
    reply = run(
        [sys.executable, "-m", "rgpt.chat", f"checkpoint={run_dir(out, 'grpo')}", "prompt=3加5等于几？"]
        + ["max_new_tokens=8", "threads=1"]
    )
    assert reply.stdout.strip() and "Traceback" not in reply.stderr


def test_grpo_resumes_bit_identically(corpus, sft, straight, tmp_path):
    ref_out, _ = straight
    out = copy_out_dir(sft, tmp_path / "out")
    run_grpo(corpus, out, "resume=true", "train.max_epochs=2", "train.max_steps=3")
    (last,) = ckpts(out, "last", stage="grpo")
    assert (ckpt.read_state(last)["step"], ckpt.read_state(last)["pos"]) == (3, 2)  # mid-epoch
    second = run_grpo(corpus, out, "resume=true", "train.max_epochs=2")
    assert "resuming" in second.stdout
    (want,) = ckpts(ref_out, "final", stage="grpo")
    (final,) = [p for p in ckpts(out, "final", stage="grpo") if p.name == want.name]
    assert_same_weights(final, want, "grpo 3 steps + resume")
    assert history(final) == history(want), "per-epoch losses differ from the straight run"
    for tag in ("grpo/reward", "grpo/kl", "grpo/reply_length", "val/loss"):
        got, ref = scalar_curve(run_dir(out, "grpo"), tag), scalar_curve(run_dir(ref_out, "grpo"), tag)
        assert got == ref, f"{tag}: {got} != {ref}"


@pytest.mark.parametrize(
    "extra, needles",
    [
        ((), ("resume=true",)),  # nothing to tune
        (("resume=true", "data.files=[arithmetic,poetry]"), ("data.files=", "arithmetic, idiom")),
        (("resume=true", "grpo.group_size=1"), ("grpo.group_size=1",)),
        (("resume=true", "grpo.clip_eps=0"), ("grpo.clip_eps=0",)),
        (("resume=true", "grpo.kl_beta=-1"), ("grpo.kl_beta=-1",)),
    ],
)
def test_grpo_errors_are_one_line(corpus, sft, tmp_path, extra, needles):
    out = copy_out_dir(sft, tmp_path / "out") if extra else tmp_path
    assert_one_line_error(run_grpo(corpus, out, *extra, rc=1), *needles)
