"""The training-health statistics (rgpt.training.diagnostics) against numbers known without them: dead units made
dead on purpose, Adam's first step (lr * sign of the gradient), block norms that add up to the global norm,
and attention entropy against a direct computation."""

import math

import pytest
import torch

from rgpt.data.tokenizer import PAD_ID
from rgpt.nn.model import GPT, GPTConfig
from rgpt.nn.optim import Adam, clip_coef
from rgpt.training.diagnostics import GROUPS, StepProbe, block_of

VOCAB = 30


def model_and_batch(activation="relu"):
    torch.manual_seed(5)
    cfg = GPTConfig(
        vocab_size=VOCAB,
        n_embd=16,
        n_head=2,
        n_layer=2,
        n_hidden=32,
        block_size=12,
        dropout=0.0,
        activation=activation,
    )
    model = GPT(cfg)
    idx = torch.randint(6, VOCAB, (3, 8))
    idx[1, 5:] = PAD_ID  # a right-padded row: its padding must not count
    targets = torch.randint(6, VOCAB, (3, 8)).masked_fill(idx == PAD_ID, -100)
    return model, idx, targets


def test_dead_and_inactive_units_are_counted_over_real_positions_only():
    model, idx, targets = model_and_batch("relu")
    with model.store.write():
        model.params["h.1.mlp.c_fc.bias"][:8] = -1e3  # 8 of 32 units can never switch on,
        model.params["h.1.mlp.c_fc.bias"][8:] = 1e3  # and the others are never off
    model.forward(idx, targets)
    probe = StepProbe()
    probe.activations(model, idx)
    s = probe.scalars
    a = model.h[1].mlp.cache[idx != PAD_ID]  # (N, F) the ReLU's output at real positions
    assert s["act_dead/h.1.mlp"] == 8 / 32 and s["act_inactive/h.1.mlp"] == 8 / 32
    a0 = model.h[0].mlp.cache  # (B, T, F): block 0 as initialised, some units off here and there
    assert s["act_inactive/h.0.mlp"] == float((a0[idx != PAD_ID] <= 0).float().mean())
    assert s["act_inactive/h.0.mlp"] != float((a0 <= 0).float().mean()), "padding is left out"
    assert math.isclose(s["act_mean/h.1.mlp"], float(a.mean()), rel_tol=1e-6)
    for i, block in enumerate(model.h):
        att = block.attn.last_attention().double()  # (B, H, T, T)
        for j in range(2):
            rows = att[:, j][idx != PAD_ID]  # (N, T)
            want = float(-(rows * torch.log2(rows.where(rows > 0, torch.ones_like(rows)))).sum(-1).mean())
            assert math.isclose(s[f"attn_entropy/h.{i}.head_{j}"], want, rel_tol=1e-5), (i, j)


def test_gelu_units_in_the_flat_tail_are_inactive():
    model, idx, targets = model_and_batch("gelu")
    with model.store.write():
        model.params["h.0.mlp.c_fc.bias"][:4] = -50.0
    model.forward(idx, targets)
    probe = StepProbe()
    probe.activations(model, idx)
    assert probe.scalars["act_dead/h.0.mlp"] == 4 / 32
    assert 4 / 32 <= probe.scalars["act_inactive/h.0.mlp"] < 0.5


def test_gradient_norms_and_adams_first_update_ratio():
    model, idx, targets = model_and_batch()
    model.forward(idx, targets)
    model.backward()
    opt = Adam(model.store)
    steps = {n: (g / (g.abs() + 1e-8)).double() for n, g in model.grads.items()}  # Adam's first m / sqrt(v)
    stds = {n: float(p.double().std()) for n, p in model.params.items()}
    probe = StepProbe()
    probe.gradients(model)
    lr = 1e-3
    opt.step(lr)
    probe.updates(model)
    s = probe.scalars
    total, _ = clip_coef(model.store.grad, 1.0)
    blocks = [v for k, v in s.items() if k.startswith("block_grad_norm/")]
    assert sorted(k.split("/")[1] for k in s if k.startswith("block_grad_norm/")) == [
        "h.0",
        "h.1",
        "lm_head",
        "ln_f",
        "wte",
    ]
    assert math.isclose(math.sqrt(sum(v * v for v in blocks)), float(total), rel_tol=1e-5)
    name = "h.0.attn.c_attn.weight"
    assert math.isclose(s[f"grad_norm/{name}"], float(model.grads[name].norm()), rel_tol=1e-6)
    # Adam's first step moves each weight by lr * g / (|g| + eps): about lr * sign(g)
    want = math.log10(lr * float(steps[name].std()) / stds[name])
    assert abs(s[f"update_ratio/{name}"] - want) < 1e-3, (s[f"update_ratio/{name}"], want)
    assert "update_ratio/h.0.ln_1.bias" not in s, "a zero tensor has no scale to compare its step with"
    assert set(probe.histograms) == {f"{k}/{n}" for k in ("grads", "weights") for n in model.params}
    assert {k.split("/")[0] for k in s} <= set(GROUPS)
    assert block_of("h.12.mlp.c_fc.bias") == "h.12" and block_of("lm_head.weight") == "lm_head"


def test_histograms_count_every_value_in_equal_bins():
    from rgpt.training.monitor import histogram

    v = torch.tensor([[-1.0, 0.0, 0.5], [1.0, 1.0, 3.0]])
    h = histogram(v, bins=4)  # bins of width 1 from -1 to 3
    assert (h["min"], h["max"], h["num"], h["sum"], h["sum_squares"]) == (-1.0, 3.0, 6, 4.5, 12.25)
    assert h["bucket_limits"] == [0.0, 1.0, 2.0, 3.0] and h["bucket_counts"] == [1.0, 2.0, 2.0, 1.0]
    flat = histogram(torch.zeros(5))
    assert flat["bucket_limits"] == [0.0] and flat["bucket_counts"] == [5.0]


def test_swiglu_units_whose_gate_is_in_the_flat_tail_are_inactive():
    from rgpt.nn.layers import swiglu_hidden

    model, idx, targets = model_and_batch("swiglu")
    width = swiglu_hidden(model.config.n_hidden)
    with model.store.write():
        model.params["h.0.mlp.c_fc.bias"][:3] = -50.0  # c_fc yields [gate | value]: three gates shut
    model.forward(idx, targets)
    probe = StepProbe()
    probe.activations(model, idx)
    assert probe.scalars["act_dead/h.0.mlp"] == pytest.approx(3 / width)
    assert 3 / width <= probe.scalars["act_inactive/h.0.mlp"] < 0.5
