"""stage=lora end to end through the real CLI: pretrain -> lora and sft -> lora, adapter-only checkpoints,
`python -m rgpt.lora merge`, chat on the merged model, and exact resume."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from rgpt.inference.load import open_model
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.adapters import merge_checkpoint
from rgpt.runtime.checkpoint import CheckpointError
from tests.training.test_train_cli import (
    assert_one_line_error,
    ckpts,
    cli_args,
    copy_out_dir,
    history,
    run,
    run_dir,
    scalar_curve,
    weights,
)

LORA = (
    "train.lr=1e-2",
    "lora.r=4",
    "lora.alpha=8",
    "lora.dropout=0.1",
    "lora.targets=[attn.c_attn,mlp.c_fc]",
)
ADAPTER_FILES = {ckpt.ADAPTER, ckpt.ADAPTER_CONFIG, ckpt.OPTIM, ckpt.VOCAB, ckpt.STATE}


def lora_args(corpus, out, *extra):
    return [a.replace("stage=sft", "stage=lora") for a in cli_args(corpus, out, *LORA, *extra, stage="sft")]


@pytest.fixture(scope="module")
def straight(corpus, pretrain, tmp_path_factory):
    out = copy_out_dir(pretrain, tmp_path_factory.mktemp("lora") / "out")
    proc = run(lora_args(corpus, out, "resume=true", "train.max_epochs=2"))
    return out, proc


def test_pretrain_then_lora_then_merge_then_chat(straight):
    out, proc = straight
    base = ckpt.find(run_dir(out) / "checkpoints", "best")
    assert f"starting LoRA instruction tuning from the pretrained model {base}" in proc.stdout
    (final,) = ckpts(out, "final", stage="lora")
    assert {f.name for f in final.iterdir()} == ADAPTER_FILES, "a LoRA checkpoint holds the adapters only"
    state = ckpt.read_state(final)
    assert state["lora_base"] == {
        "path": str(base),
        "sha256": ckpt.read_state(base)["files"][ckpt.MODEL]["sha256"],
    }
    adapter = load_file(final / ckpt.ADAPTER)
    assert sorted(adapter) == sorted(
        f"h.{i}.{t}.lora_{m}" for i in (0, 1) for t in ("attn.c_attn", "mlp.c_fc") for m in "AB"
    )

    merged_out = run([sys.executable, "-m", "rgpt.lora", "merge", str(run_dir(out, "lora"))])
    (merged,) = ckpt.list_checkpoints(run_dir(out, "lora") / "merged", "final")
    assert str(merged) in merged_out.stdout
    w0, w = weights(base), weights(merged)
    assert w.keys() == w0.keys()
    best = ckpt.find(run_dir(out, "lora") / "checkpoints", "best")
    ab = load_file(best / ckpt.ADAPTER)
    for name in w0:
        target = name.removesuffix(".weight")
        if f"{target}.lora_A" in ab:
            delta = (8 / 4) * ab[f"{target}.lora_B"] @ ab[f"{target}.lora_A"]
            assert delta.abs().max() > 0, f"{target}: the adapter did not train"
            torch.testing.assert_close(w[name], w0[name] + delta, rtol=0, atol=1e-6)
        else:  # everything else is the frozen base, bit for bit
            assert torch.equal(w[name], w0[name]), f"{name} changed: the base is frozen"

    reply = run(
        [
            sys.executable,
            "-m",
            "rgpt.chat",
            f"checkpoint={run_dir(out, 'lora')}/merged",
            "prompt=山脉是什么？",
            "max_new_tokens=8",
            "threads=1",
        ]
    )
    assert reply.stdout.strip() and "Traceback" not in reply.stderr
    with pytest.raises(CheckpointError, match="LoRA adapters only.*python -m rgpt.lora merge"):
        open_model(run_dir(out, "lora"), None, "cpu")  # what chat, eval and serve load a checkpoint with


def test_lora_resumes_bit_identically(corpus, pretrain, straight, tmp_path):
    ref_out, _ = straight
    out = copy_out_dir(pretrain, tmp_path / "out")
    run(lora_args(corpus, out, "resume=true", "train.max_epochs=2", "train.max_steps=5"))
    proc = run(lora_args(corpus, out, "resume=true", "train.max_epochs=2"))
    assert "resuming" in proc.stdout
    (want,) = ckpts(ref_out, "final", stage="lora")
    (got,) = [p for p in ckpts(out, "final", stage="lora") if p.name == want.name]
    a, b = load_file(got / ckpt.ADAPTER), load_file(want / ckpt.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
        "adapters differ from the straight run"
    )
    assert history(got) == history(want)
    assert scalar_curve(run_dir(out, "lora")) == scalar_curve(run_dir(ref_out, "lora")), "train/loss differs"
    assert load_file(got / ckpt.OPTIM).keys() == load_file(want / ckpt.OPTIM).keys()


def test_sft_then_lora_on_the_tuned_model(corpus, pretrain, tmp_path):
    out = copy_out_dir(pretrain, tmp_path / "out")
    run(cli_args(corpus, out, "resume=true", "train.max_epochs=1", stage="sft"))
    sft_best = ckpt.find(run_dir(out, "sft") / "checkpoints", "best")
    run(lora_args(corpus, out, f"resume_from={sft_best}", "train.max_epochs=1"))
    (final,) = ckpts(out, "final", stage="lora")
    assert ckpt.read_state(final)["lora_base"]["path"] == str(sft_best)
    merged = merge_checkpoint(final, tmp_path / "merged")  # the CLI's merge, in process: tested above
    assert ckpt.read_state(merged)["merged_from"] == str(final)


def test_lora_without_a_model_to_adapt_is_one_line(corpus, tmp_path):
    assert_one_line_error(run(lora_args(corpus, tmp_path), rc=1), "resume=true")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        merge_checkpoint(tmp_path / "nothing")
