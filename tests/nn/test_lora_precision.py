"""LoRA under mixed precision (bfloat16 products, float32 master weights): the adapter behaves like the
Linear it wraps (its output and input gradient in the compute dtype), its gradients are as close to float64
as PyTorch's own bf16 autocast gets, on every target alone and all at once, and Adam and merging use the
float32 master weights, never the bfloat16 working copy."""

import pytest
import torch

from rgpt.nn.layers import Linear
from rgpt.nn.lora import Adapters, LoRALinear, LoRASettings
from rgpt.nn.model import GPT
from rgpt.nn.optim import Adam
from tests.nn.test_lora import ALL, Mode
from tests.nn.test_mixed_precision import REL_ERR_MAX, SLACK_ABS, SLACK_FACTOR, rel_err
from tests.nn.test_model import batch, make_model
from tests.reference import reference_from

BF16 = torch.bfloat16


def assert_like_autocast(got: dict, exact: dict, autocast: dict):
    """Each of `got` no further from float64 (`exact`) than torch's bf16 autocast, with the mixed-precision
    tests' slack, and never far."""
    for name, g in got.items():
        assert g.dtype == torch.float32, f"{name}: the master gradient must stay float32, got {g.dtype}"
        err, yardstick = rel_err(g, exact[name]), rel_err(autocast[name], exact[name])
        assert err <= SLACK_FACTOR * yardstick + SLACK_ABS and err < REL_ERR_MAX, (
            f"{name}: relative error {err:.3e} vs float64; torch autocast bf16 gets {yardstick:.3e}"
        )


def test_lora_layer_in_bf16_has_the_dtypes_of_a_linear_and_autocast_accuracy():
    # the store's layout under mixed precision: parameters read as a bf16 working copy, gradients float32
    base = Linear(24, 20, std=0.3, device="cpu", dtype=torch.float32)
    base.params["bias"].normal_()
    lora = LoRALinear(
        base, r=4, alpha=6.0, dropout=0.3, mode=Mode(), generator=torch.Generator().manual_seed(3)
    )
    lora.params["lora_B"].normal_()  # B = 0 would hide dA and the adapter's part of dx
    base.params = {k: p.to(BF16) for k, p in base.params.items()}
    lora.params = {k: p.to(BF16) for k, p in lora.params.items()}
    plain = Linear(24, 20, std=0.3, device="cpu", dtype=torch.float32)  # the layer LoRA stands in for
    plain.params = dict(base.params)

    x = torch.randn(3, 5, 24)  # float32, as the residual stream that reaches a Linear
    h = lora.forward(x)
    mask = lora.drop.cache.clone()
    assert (mask == 0).any(), "dropout drew no zeros: its backward would go unchecked"
    dh = torch.randn(h.shape).to(BF16)  # the upstream gradient of a bf16 output (attention's dqkv)
    dx = lora.backward(dh)
    y, dy = plain.forward(x), plain.backward(dh)
    assert h.dtype == y.dtype == BF16, f"output dtype {h.dtype}, a Linear's is {y.dtype}"
    assert dx.dtype == dy.dtype == BF16, f"input gradient dtype {dx.dtype}, a Linear's is {dy.dtype}"

    def fn(x, A, B):  # the adapter's forward on the working copy's values
        W0, b0 = (base.params[k].to(x.dtype) for k in ("weight", "bias"))
        return x @ W0.t() + b0 + lora.scale * ((x * mask.to(x.dtype)) @ A.t()) @ B.t()

    def grads(dtype, autocast):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, *lora.params.values())]
        with torch.enable_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out = fn(*leaves).to(dtype)  # autocast's products are bf16
        with torch.enable_grad():
            (out * dh.to(dtype)).sum().backward()
        return {"h": out.detach(), **dict(zip(("dx", "lora_A", "lora_B"), (t.grad for t in leaves)))}

    exact, autocast = grads(torch.float64, False), grads(torch.float32, True)
    got = {"h": h.float(), "dx": dx.float(), **lora.grads}
    assert_like_autocast(got, exact, autocast)
    assert not base.grads["weight"].any(), "the frozen W0 got a gradient"


def adapter_grads(model, adapters, idx, targets, dtype, autocast=False):
    """Autograd's gradients of the adapters on the reference, each target's output plus (α/r)·B·A·x added
    by a forward hook: the unmerged form, so under autocast u = x·Aᵀ is rounded to bf16 as ours is."""
    ref = reference_from(model, dtype=dtype)
    leaves = {n: p.detach().to(dtype).requires_grad_(True) for n, p in adapters.store.params.items()}

    def hook(name, scale):
        A, B = leaves[f"{name}.lora_A"], leaves[f"{name}.lora_B"]
        return lambda module, inputs, out: out + scale * (inputs[0] @ A.t()) @ B.t()

    for name, lora in adapters.layers.items():
        ref.get_submodule(name).register_forward_hook(hook(name, lora.scale))
    with torch.enable_grad():
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss = ref(idx, targets)
        loss.backward()
    return {n: p.grad for n, p in leaves.items()}


# every target alone (the attention's c_attn alone once crashed in bf16: its fp32 output met c_proj's bf16
# gradient in the attention backward), the CLI tests' pair, and all four
@pytest.mark.parametrize("targets", [[t] for t in ALL] + [["attn.c_attn", "mlp.c_fc"], ALL], ids=str)
def test_bf16_adapter_gradients_match_float64_like_autocast(targets):
    # gelu: a ReLU unit that rounding moves across 0 flips its whole column of the small adapters'
    # gradients (up to 10% on c_fc's B, against autocast's 3%), which says nothing about the products
    exact = make_model(n_embd=32, n_head=4, n_hidden=64, activation="gelu")
    exact.eval()
    cfg = LoRASettings(r=4, alpha=8.0, targets=targets)
    exact_adapters = Adapters(exact, cfg)
    for name, p in exact_adapters.store.params.items():
        if name.endswith("lora_B"):
            # a trained adapter's scale: B·A about as large as W0; far larger, the model leaves its range
            # and both bf16 errors grow chaotic (autocast's up to 12%)
            p.normal_(std=0.05)
    idx, targets_ = batch(B=4, T=10)
    want = adapter_grads(exact, exact_adapters, idx, targets_, torch.float64)
    yardstick = adapter_grads(exact, exact_adapters, idx, targets_, torch.float32, autocast=True)

    mixed = GPT(exact.config, dtype=torch.float32, compute_dtype=BF16)
    mixed.eval()
    mixed.store.load(exact.params)
    adapters = Adapters(mixed, cfg)
    adapters.store.load(exact_adapters.store.params)
    loss = mixed.forward(idx, targets_)
    adapters.store.zero_grad()
    mixed.backward()
    assert loss.dtype == torch.float32
    for name, lora in adapters.layers.items():
        assert lora.params["lora_A"].dtype == BF16, f"{name}: the adapter should compute in bf16"
    assert_like_autocast(adapters.store.grads, want, yardstick)
    assert not mixed.store.grad.any(), "a frozen base parameter got a gradient"


def test_bf16_adam_and_merge_use_the_float32_master_adapters():
    model = make_model()
    mixed = GPT(model.config, dtype=torch.float32, compute_dtype=BF16)
    mixed.store.load(model.params)
    adapters = Adapters(mixed, LoRASettings(r=2, alpha=3.0, targets=["attn.c_attn", "mlp.c_proj"]))
    idx, targets = batch()
    mixed.forward(idx, targets)
    mixed.backward()
    Adam(adapters.store).step(1e-2)  # rewrites the working copy from the updated master weights
    for name, lora in adapters.layers.items():
        for k in ("lora_A", "lora_B"):
            master = adapters.store.params[f"{name}.{k}"]
            assert master.dtype == torch.float32 and master.any(), f"{name}.{k}: master weights"
            assert torch.equal(lora.params[k], master.to(BF16)), f"{name}.{k}: working copy is stale"
    w0 = {n: p.clone() for n, p in mixed.params.items()}
    want = {
        f"{n}.weight": w0[f"{n}.weight"]
        + lora.scale * (adapters.store.params[f"{n}.lora_B"] @ adapters.store.params[f"{n}.lora_A"])
        for n, lora in adapters.layers.items()
    }
    adapters.merge()
    for name, w in want.items():
        diff = (mixed.params[name] - w).abs().max().item()
        assert torch.equal(mixed.params[name], w), f"{name}: merged from the bf16 copy? max diff {diff:.3e}"
        working = mixed.store.compute_view(name)
        assert torch.equal(working, w.to(BF16)), f"{name}: the model's working copy missed the merge"
