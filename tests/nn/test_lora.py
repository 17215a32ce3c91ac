"""LoRA: the adapter layer and the whole adapted model against autograd in float64, the model unchanged at
step 0, merged == unmerged logits, and a frozen base that training never touches."""

import pytest
import torch

from rgpt.nn.layers import Linear
from rgpt.nn.lora import Adapters, LoRALinear, LoRASettings
from rgpt.nn.model import GPT
from rgpt.nn.optim import Adam
from rgpt.settings import ConfigError
from tests.helpers import assert_close, autograd_grads
from tests.nn.test_model import batch, make_model, tiny_config
from tests.reference import reference_from

DT = torch.float64
ALL = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


class Mode:
    training = True


def test_lora_layer_gradients_match_autograd_with_dropout():
    base = Linear(6, 5, std=0.3, device="cpu", dtype=DT)
    base.params["bias"].normal_()
    gen = torch.Generator().manual_seed(3)
    lora = LoRALinear(base, r=3, alpha=5.0, dropout=0.3, mode=Mode(), generator=gen)
    lora.params["lora_B"].normal_()  # B = 0 would hide every bug in dA and dx's adapter path
    x = torch.randn(2, 4, 6, dtype=DT)
    h = lora.forward(x)
    mask = lora.drop.cache.clone()
    assert (mask == 0).any(), "dropout drew no zeros: the test would not check its backward"
    dh = torch.randn_like(h)
    dx = lora.backward(dh)

    W0, b0 = base.params["weight"], base.params["bias"]
    want, (wx, wA, wB) = autograd_grads(
        lambda x, A, B: x @ W0.t() + b0 + (5.0 / 3) * ((x * mask) @ A.t()) @ B.t(),
        [x, lora.params["lora_A"], lora.params["lora_B"]],
        dh,
    )
    assert_close(h, want, "LoRA forward")
    assert_close(dx, wx, "dx")
    assert_close(lora.grads["lora_A"], wA, "dA")
    assert_close(lora.grads["lora_B"], wB, "dB")
    assert not base.grads["weight"].any() and not base.grads["bias"].any(), "the frozen W0 got a gradient"


def adapted(targets=ALL, r=3, alpha=6.0, dropout=0.0):
    model = make_model()
    model.eval()
    adapters = Adapters(model, LoRASettings(r=r, alpha=alpha, dropout=dropout, targets=list(targets)))
    return model, adapters


def test_whole_model_adapter_gradients_match_autograd():
    model, adapters = adapted()
    for name, p in adapters.store.params.items():
        if name.endswith("lora_B"):
            p.normal_(std=0.3)
    ref = reference_from(model)  # the base weights W0
    idx, targets = batch()
    loss = model.forward(idx, targets)
    adapters.store.zero_grad()
    model.backward()

    leaves = {n: p.clone().requires_grad_(True) for n, p in adapters.store.params.items()}
    with torch.enable_grad():
        merged = dict(ref.named_parameters())  # W = W0 + (alpha/r) B A on every target, autograd through A, B
        for name, lora in adapters.layers.items():
            w = name + ".weight"
            merged[w] = merged[w].detach() + lora.scale * leaves[f"{name}.lora_B"] @ leaves[f"{name}.lora_A"]
        want = torch.func.functional_call(ref, merged, (idx, targets))
        want.backward()
    assert_close(loss, want.detach(), "loss of the adapted model")
    for name, g in adapters.store.grads.items():
        assert_close(g, leaves[name].grad, f"grad {name}")
    assert not model.store.grad.any(), "a frozen base parameter got a gradient"


def test_the_model_is_unchanged_at_step_0():
    model = make_model()
    model.eval()
    idx, _ = batch()
    before = model.forward(idx).clone()
    adapters = Adapters(model, LoRASettings(targets=ALL))
    assert not any(p.any() for n, p in adapters.store.params.items() if n.endswith("lora_B")), "B starts at 0"
    A = [p for n, p in adapters.store.params.items() if n.endswith("lora_A")]
    assert all(p.std() > 0 for p in A), "A starts Gaussian"
    assert torch.equal(model.forward(idx), before), "adapters with B = 0 changed the logits"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merged_logits_equal_the_adapted_logits(dtype):
    model = GPT(tiny_config(), dtype=dtype)
    model.eval()
    adapters = Adapters(model, LoRASettings(r=2, alpha=3.0, targets=["attn.c_attn", "mlp.c_proj"]))
    for p in adapters.store.params.values():
        p.normal_(std=0.3)
    idx, _ = batch()
    with_adapters = model.forward(idx).clone()
    adapters.merge()
    assert not any(isinstance(layer, LoRALinear) for _, layer in model._named_layers()), "adapters left in"
    tol = dict() if dtype == DT else dict(rtol=1e-5, atol=1e-5)  # float32: W0 + sBA rounds once more
    assert_close(model.forward(idx), with_adapters, f"merged logits ({dtype})", **tol)


def test_training_moves_the_adapters_and_leaves_the_base_bit_identical():
    model, adapters = adapted(dropout=0.1)
    model.train()
    base = model.store.snapshot()
    opt = Adam(adapters.store)
    start = adapters.store.snapshot()
    for _ in range(3):
        idx, targets = batch()
        adapters.store.zero_grad()
        model.forward(idx, targets)
        model.backward()
        opt.step(1e-2)
    assert torch.equal(model.store.data, base), "a frozen base weight moved"
    assert not model.store.grad.any(), "the frozen base computed gradients"
    assert not torch.equal(adapters.store.data, start), "the adapters did not train"
    assert opt.m.numel() == adapters.store.numel() < model.store.numel() / 2, (
        "Adam holds more than the adapters"
    )


@pytest.mark.parametrize(
    "settings, key",
    [
        (dict(r=0), "lora.r"),
        (dict(alpha=0.0), "lora.alpha"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(targets=["attn.c_q"]), "lora.targets"),
        (dict(targets=[]), "lora.targets"),
        (dict(targets=["attn.c_attn", "attn.c_attn"]), "lora.targets"),
    ],
)
def test_bad_lora_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        LoRASettings(**settings).validate()
