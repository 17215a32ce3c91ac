"""The live gradient check (rgpt.training.gradcheck): quiet on the correct hand-written backward, in float64, with
dropout and ReLU; loud, naming the parameter, on a deliberately broken one; and invisible to the training
run it checks (its weights, gradients and random streams)."""

import pytest
import torch

from rgpt.nn import layers
from rgpt.nn.model import GPT, GPTConfig
from rgpt.training import gradcheck

VOCAB = 40


def model_and_batch(activation="relu", dtype=torch.float32):
    torch.manual_seed(3)
    cfg = GPTConfig(
        vocab_size=VOCAB,
        n_embd=16,
        n_head=2,
        n_layer=2,
        n_hidden=32,
        block_size=12,
        dropout=0.1,
        activation=activation,
    )
    model = GPT(cfg, dtype=dtype)
    with model.store.write() as data:  # away from the initial zeros and ones, which hide bugs
        data.add_(torch.randn_like(data), alpha=0.05)
    idx = torch.randint(1, VOCAB, (3, 10))
    targets = torch.randint(0, VOCAB, (3, 10))
    targets[0, 6:] = -100  # a padded tail: those positions are skipped by the loss
    return model, idx, targets


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_a_correct_backward_agrees_with_finite_differences(activation):
    model, idx, targets = model_and_batch(activation)
    params = model.store.data.clone()
    model.store.grad.fill_(0.25)  # a training model's gradient buffer: must stay as it is
    rng = torch.get_rng_state()
    report = gradcheck.gradient_check(model, idx, targets)
    assert not report.failed
    assert report.worst.rel_error < 1e-6, report.summary()
    raw = max(d.raw_error for d in report.directions)
    assert raw < 1e-5, f"even before discounting rounding the errors are small: {report.summary()}"
    assert [d.name for d in report.directions] == [*model.params, "all"]
    assert all(abs(d.analytic) > 0 for d in report.directions), "every direction has a gradient to check"
    if activation == "relu":
        assert sum(d.kinks for d in report.directions) > 0, "some steps reach across ReLU kinks: held fixed"
    assert torch.equal(model.store.data, params) and bool((model.store.grad == 0.25).all())
    assert torch.equal(torch.get_rng_state(), rng), "the global random stream must not move"
    assert f"gradient check along {len(model.params) + 1} directions" in report.summary()


def test_holding_relu_patterns_is_what_keeps_kinks_from_looking_like_bugs(monkeypatch):
    model, idx, targets = model_and_batch("relu")
    monkeypatch.setattr(gradcheck, "_hold_relu_patterns", lambda twin: [])
    report = gradcheck.gradient_check(model, idx, targets, eps=0.1)
    assert report.worst.raw_error > 1e-4, "without held patterns a large step's kinks spoil the differences"


def broken_layernorm_bias(self, dy):  # the bias gradient 1e-4 too large: a subtle bug
    dx = ORIGINAL["ln"](self, dy)
    self.grads["bias"].mul_(1.0001)
    return dx


def broken_relu(self, dy):  # ReLU's gradient passed through the units that were off
    da = self.c_proj.backward(dy)
    self.cache = None
    return self.c_fc.backward(da)


ORIGINAL = {"ln": layers.LayerNorm.backward}


@pytest.mark.parametrize(
    "cls, broken, culprit",
    [(layers.LayerNorm, broken_layernorm_bias, "ln_"), (layers.MLP, broken_relu, "mlp.c_fc")],
)
def test_a_broken_backward_is_flagged_naming_the_parameter(monkeypatch, cls, broken, culprit):
    model, idx, targets = model_and_batch("relu")
    monkeypatch.setattr(cls, "backward", broken)
    report = gradcheck.gradient_check(model, idx, targets)
    assert report.failed and report.worst.rel_error > gradcheck.TOLERANCE, report.summary()
    bad = [d.name for d in report.directions if d.rel_error > gradcheck.TOLERANCE]
    assert any(culprit in name for name in bad), f"{culprit} not among the flagged {bad}"
    warning = report.warning()
    assert "GRADIENT CHECK FAILED" in warning and report.worst.name in warning


def test_a_float32_bfloat16_model_is_checked_in_float64():
    model, idx, targets = model_and_batch("gelu")
    mixed = GPT(model.config, compute_dtype=torch.bfloat16)
    mixed.store.load(model.params)
    report = gradcheck.gradient_check(mixed, idx, targets)
    assert report.worst.rel_error < 1e-6, report.summary()


def test_every_architecture_option_agrees_with_finite_differences():
    torch.manual_seed(4)
    cfg = GPTConfig(
        vocab_size=VOCAB,
        n_embd=16,
        n_head=2,
        n_layer=2,
        n_hidden=24,
        block_size=12,
        dropout=0.1,
        activation="swiglu",
        norm="rmsnorm",
        pos="rope",
        tie_embeddings=True,
        attn="flash",
    )
    model = GPT(cfg)
    idx, targets = torch.randint(1, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    report = gradcheck.gradient_check(model, idx, targets)
    assert report.worst.rel_error < 1e-6 and not report.failed, report.summary()
    assert "lm_head.weight" not in [d.name for d in report.directions], "tied: checked as wte.weight"
