"""The same maths on a GPU: gradients against autograd on cuda, cuda against cpu, bf16, the KV cache,
Adam, and a run of the real CLI with device=cuda. Skipped where torch sees no GPU."""

import subprocess

import pytest
import torch

from rgpt.nn.model import GPT
from rgpt.nn.optim import Adam
from tests.helpers import assert_close
from tests.nn.test_model import batch, make_model, reference_grads, tiny_config
from tests.reference import reference_from
from tests.training.test_train_cli import REPO, ckpts, cli_args, cli_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DT = torch.float64


def _on(model_cpu: GPT, device: str, **kw) -> GPT:
    """A copy of model_cpu's weights on ``device``."""
    m = GPT(model_cpu.config, device=device, dtype=model_cpu.dtype, **kw)
    m.store.load(model_cpu.params)
    return m


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_every_gradient_on_cuda_matches_autograd(activation):
    model = _on(make_model(activation=activation), "cuda")
    model.eval()
    ref = reference_from(model)
    idx, targets = (t.cuda() for t in batch())
    loss = model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    rloss, rgrads = reference_grads(ref, idx, targets)
    assert_close(loss, rloss, "loss")
    for name, g in model.grads.items():
        assert g.device.type == "cuda"
        assert_close(g, rgrads[name], f"grad {name}")


def test_cuda_and_cpu_agree_step_by_step():
    cpu = make_model()
    gpu = _on(cpu, "cuda")
    opts = [Adam(m.store) for m in (cpu, gpu)]
    for _ in range(5):
        idx, targets = batch()
        for m, opt in zip((cpu, gpu), opts):
            m.zero_grad()
            m.forward(idx.to(m.device), targets.to(m.device))
            m.backward()
            opt.step(1e-2)
    for name, p in cpu.params.items():
        assert_close(gpu.params[name].cpu(), p, f"param {name} after 5 Adam steps")


def test_bf16_compute_on_cuda_is_close_to_fp32():
    cpu = GPT(tiny_config(vocab_size=97, n_embd=64, n_hidden=128, block_size=32), dtype=torch.float32)
    fp32, bf16 = _on(cpu, "cuda"), _on(cpu, "cuda", compute_dtype=torch.bfloat16)
    idx, targets = (t.cuda() for t in batch(B=4, T=32, V=97))
    losses = []
    for m in (fp32, bf16):
        m.eval()
        m.zero_grad()
        losses.append(m.forward(idx, targets).item())
        m.backward()
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0], losses
    assert bf16.store.data.dtype == torch.float32, "the master weights must stay fp32"
    cos = torch.nn.functional.cosine_similarity(fp32.store.grad, bf16.store.grad, dim=0)
    assert cos > 0.99, f"bf16 gradient direction off: cosine {cos:.4f}"


def test_kv_cache_on_cuda_matches_full_recomputation():
    model = _on(make_model(), "cuda")
    model.eval()
    idx = torch.randint(0, 23, (2, 9), device="cuda")
    full = model.forward(idx)
    caches = model.new_kv_caches(2)
    steps = [model.forward_cached(idx[:, :4], caches)] + [
        model.forward_cached(idx[:, t : t + 1], caches) for t in range(4, 9)
    ]
    assert_close(torch.cat(steps, dim=1), full, "cached logits")


@pytest.mark.parametrize("compute", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_replies_decoded_together_on_cuda_equal_replies_alone(compute):
    """Continuous batching (rgpt.inference.batch) on the GPU: per-row positions, masks and slots."""
    from rgpt.inference.batch import generate_many
    from rgpt.inference.generate import DecodeConfig, generate
    from tests.inference.test_batch import prompts
    from tests.inference.test_generate import tiny_model

    cpu = tiny_model(vocab_size=97, sharpen=4.0, pos="rope", n_kv_head=2)
    model = _on(cpu, "cuda", compute_dtype=compute)
    model.eval()
    cfg = DecodeConfig(method="sample", seed=5, max_new_tokens=25, repetition_penalty=1.3)
    ps = prompts(vocab=97)
    alone = [generate(model, p, cfg) for p in ps]
    assert generate_many(model, ps, cfg, slots=4, prefill_chunk=3) == alone


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_cli_on_cuda_then_resume_on_cpu(tmp_path, precision):
    from tests.training.test_train_cli import write_corpus

    (tmp_path / "corpus").mkdir()
    corpus = write_corpus(tmp_path / "corpus")
    for device, epochs in (("cuda", 1), ("cpu", 2)):
        args = cli_args(
            corpus, tmp_path / "out", f"device={device}", f"train.max_epochs={epochs}", precision=precision
        )
        if device == "cpu":
            args.append("resume=true")
        proc = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert ckpts(tmp_path / "out", "final"), "no final checkpoint after resuming a cuda run on cpu"
