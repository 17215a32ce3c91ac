"""The whole model and the optimizer against the torch.nn + autograd + torch.optim reference."""

import pytest
import torch

from rgpt.nn import optim
from rgpt.nn.model import GPT, GPTConfig
from rgpt.nn.optim import Adam, clip_coef, clip_grad_norm_
from tests.helpers import assert_close
from tests.reference import reference_from

DT = torch.float64


def tiny_config(**kw):
    base = dict(vocab_size=23, n_embd=16, n_head=4, n_layer=2, n_hidden=24, block_size=12, dropout=0.0)
    return GPTConfig(**{**base, **kw})


# every architecture option alone, and all at once (flash with 4-row tiles, so T=10 spans three)
OPTIONS = {
    "default": {},
    "gelu": {"activation": "gelu"},
    "swiglu": {"activation": "swiglu"},
    "rmsnorm": {"norm": "rmsnorm"},
    "rope": {"pos": "rope"},
    "tied": {"tie_embeddings": True},
    "flash": {"attn": "flash"},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1, "attn": "flash"},
    "nobias": {"bias": False},
    "all": {
        "activation": "swiglu",
        "norm": "rmsnorm",
        "pos": "rope",
        "tie_embeddings": True,
        "attn": "flash",
        "n_kv_head": 2,
        "bias": False,
    },
}


def make_model(**kw):
    model = GPT(tiny_config(**kw), dtype=DT)
    for name, p in model.params.items():  # LayerNorm's ones/zeros and zero biases would hide bugs
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
            p.add_(torch.randn_like(p) * 0.3)
    return model


def batch(B=3, T=10, V=23, n_ignored=4):
    idx = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    targets.view(-1)[torch.randperm(B * T)[:n_ignored]] = -100
    return idx, targets


def reference_grads(ref, idx, targets, dropout_masks=None):
    with torch.enable_grad():
        loss = ref(idx, targets, dropout_masks=dropout_masks)
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_parameter_gradient_matches_autograd(option, small_tiles):
    model = make_model(**OPTIONS[option])
    model.eval()
    ref = reference_from(model)
    idx, targets = batch()
    assert_close(model.forward(idx), ref(idx), "logits")
    loss = model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    rloss, rgrads = reference_grads(ref, idx, targets)
    assert_close(loss, rloss, "loss")
    assert set(rgrads) == set(model.grads), "parameter names differ from the reference"
    for name, g in model.grads.items():
        assert_close(g, rgrads[name], f"grad {name}")


@pytest.mark.parametrize("option", ["default", "all"])
def test_gradients_with_dropout_masks(option, small_tiles):
    model = make_model(dropout=0.2, **OPTIONS[option])
    model.train()
    ref = reference_from(model)
    idx, targets = batch()
    loss = model.forward(idx, targets)
    masks = [(b.drop_1.cache.clone(), b.drop_2.cache.clone()) for b in model.h]  # the masks actually drawn
    assert any((m == 0).any() for pair in masks for m in pair), "dropout drew no zeros: test would be vacuous"
    model.zero_grad()
    model.backward()
    rloss, rgrads = reference_grads(ref, idx, targets, dropout_masks=masks)
    assert_close(loss, rloss, "loss with dropout")
    for name, g in model.grads.items():
        assert_close(g, rgrads[name], f"grad {name} with dropout")


def test_two_backward_passes_double_the_gradients():
    model = make_model()
    idx, targets = batch()
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    once = model.store.grad.clone()
    model.forward(idx, targets)
    model.backward()
    assert_close(model.store.grad, 2 * once, "gradients after two backward passes")


def test_token_weighted_accumulation_equals_one_big_batch():
    model = make_model()
    model.eval()
    micro = [batch(B=2, T=8, n_ignored=n) for n in (0, 3, 7, 11)]  # uneven target counts per micro-batch
    n_total = sum(int((t != -100).sum()) for _, t in micro)
    model.zero_grad()
    for idx, targets in micro:
        model.forward(idx, targets)
        model.backward(scale=int((targets != -100).sum()) / n_total)
    accumulated = model.store.grad.clone()
    big_idx, big_t = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
    model.zero_grad()
    model.forward(big_idx, big_t)
    model.backward()
    assert_close(accumulated, model.store.grad, "4 accumulated micro-batches vs one batch")


def test_clipping_matches_torch():
    g = torch.randn(1000, dtype=DT) * 3
    for max_norm in (1.0, 1e6):
        ours, theirs = g.clone(), g.clone().requires_grad_(False)
        p = torch.zeros_like(theirs, requires_grad=True)
        p.grad = theirs
        norm = clip_grad_norm_(ours, max_norm)
        rnorm = torch.nn.utils.clip_grad_norm_([p], max_norm)
        assert_close(norm.double(), rnorm, f"norm (max_norm={max_norm})", rtol=1e-6)
        assert_close(ours, p.grad, f"clipped gradient (max_norm={max_norm})")


# chunk None: the model fits one chunk; 1000: many, the last partial.
# clip: torch clips with clip_grad_norm_ before its step; rgpt passes clip_coef's factor into Adam's pass
@pytest.mark.parametrize("chunk, clip", [(None, None), (1000, None), (1000, 0.05), (None, 1e6)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_ten_adam_steps_match_torch_optim(weight_decay, chunk, clip, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(optim, "CHUNK", chunk)
    model = make_model()
    assert chunk is None or model.store.data.numel() % chunk, "the last chunk should be a partial one"
    model.eval()
    ref = reference_from(model)
    decay = [n for n, p in model.params.items() if p.dim() >= 2]
    opt = Adam(model.store, weight_decay=weight_decay, decay=decay)
    named = dict(ref.named_parameters())
    groups = [
        {"params": [named[n] for n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named.items() if n not in decay], "weight_decay": 0.0},
    ]
    ropt = torch.optim.AdamW(groups, lr=3e-3) if weight_decay else torch.optim.Adam(groups, lr=3e-3)
    losses, rlosses, clipped = [], [], 0
    for _ in range(10):
        idx, targets = batch()
        losses.append(model.forward(idx, targets))
        model.zero_grad()
        model.backward()
        if clip is None:
            opt.step(lr=3e-3)
        else:
            norm, coef = clip_coef(model.store.grad, clip)
            clipped += bool(coef < 1)
            opt.step(lr=3e-3, grad_scale=coef)
        with torch.enable_grad():
            ropt.zero_grad()
            loss = ref(idx, targets)
            loss.backward()
            if clip is not None:
                rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
                assert_close(norm, rnorm, "gradient norm before clipping")
            ropt.step()
        rlosses.append(loss.detach())
    assert clipped == (10 if clip == 0.05 else 0), f"clipping fired in {clipped} of 10 steps"
    assert_close(torch.stack(losses), torch.stack(rlosses), "loss sequence over 10 Adam steps")
    for name, p in model.params.items():
        assert_close(p, named[name].detach(), f"parameter {name} after 10 steps")


def test_frozen_parameters_do_not_move_but_gradients_flow():
    model = make_model()
    frozen = [n for n in model.params if ".attn." in n]
    opt = Adam(model.store, frozen=frozen)
    before = {n: p.clone() for n, p in model.params.items()}
    idx, targets = batch()
    model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    assert model.grads["h.0.attn.c_attn.weight"].abs().sum() > 0
    opt.step(lr=1e-2)
    for n, p in model.params.items():
        moved = not torch.equal(p, before[n])
        assert moved != (n in frozen), f"{n}: moved={moved}, frozen={n in frozen}"


def test_optimizer_state_roundtrip():
    model = make_model()
    opt = Adam(model.store)
    idx, targets = batch()
    model.forward(idx, targets)
    model.backward()
    opt.step(1e-3)
    state = {k: v.clone() for k, v in opt.state_dict().items()}
    opt2 = Adam(model.store)
    opt2.load_state_dict(state)
    assert opt2.t == 1 and torch.equal(opt2.m, opt.m) and torch.equal(opt2.v, opt.v)
    with pytest.raises(ValueError, match="does not match"):
        opt2.load_state_dict({"step": state["step"]})


def test_training_step_needs_no_autograd(monkeypatch):
    """The contract: a full step runs with grad mode off globally and Tensor.backward unusable."""

    def forbidden(*a, **k):
        raise RuntimeError("autograd was used")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    prev = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        model = GPT(tiny_config(dropout=0.1))
        opt = Adam(model.store)
        before = model.store.data.clone()
        idx, targets = batch()
        loss = model.forward(idx, targets)
        model.zero_grad()
        model.backward()
        clip_grad_norm_(model.store.grad, 1.0)
        opt.step(1e-3)
        assert torch.isfinite(loss) and not torch.equal(before, model.store.data)
        assert all(not p.requires_grad for p in model.params.values())
    finally:
        torch.set_grad_enabled(prev)


@pytest.mark.parametrize("option", OPTIONS)
def test_kv_cache_matches_full_recomputation(option):
    model = make_model(**OPTIONS[option])
    model.eval()
    idx = torch.randint(0, 23, (2, 11))
    full = model.forward(idx)
    caches = model.new_kv_caches(batch=2)
    got = [model.forward_cached(idx[:, :5], caches)]  # prefill in one pass
    for t in range(5, 11):  # then one token at a time
        got.append(model.forward_cached(idx[:, t : t + 1], caches))
    assert_close(torch.cat(got, dim=1), full, f"cached logits vs full forward ({option})")
    kv_heads = model.config.n_kv_head or model.config.n_head
    assert caches[0].k.shape[1] == kv_heads, f"the cache holds {caches[0].k.shape[1]} heads, not {kv_heads}"
    with pytest.raises(ValueError, match="overflow"):
        model.forward_cached(idx[:, :2], caches)


def test_initialisation_follows_the_global_seed():
    torch.manual_seed(3)
    a = GPT(tiny_config())
    torch.manual_seed(3)
    b = GPT(tiny_config())
    assert torch.equal(a.store.data, b.store.data)
    assert set(a.params) >= {
        "wte.weight",
        "h.1.attn.c_attn.weight",
        "ln_f.weight",
        "lm_head.weight",
        "lm_head.bias",
    }


def test_kv_cache_last_only_logits():
    model = make_model()
    model.eval()
    idx = torch.randint(0, 23, (2, 7))
    full = model.forward(idx)
    last = model.forward_cached(idx, model.new_kv_caches(batch=2), last_only=True)
    assert last.shape == (2, 1, 23)
    assert_close(last[:, 0], full[:, -1], "last-position logits of a prefill")


def test_a_checkpoint_that_predates_n_kv_head_and_bias_builds_todays_model():
    old = tiny_config().to_dict()
    del old["n_kv_head"], old["bias"]
    cfg = GPTConfig.from_dict(old)
    assert (cfg.n_kv_head, cfg.kv_heads, cfg.bias) == (0, 4, True)
    model = GPT(cfg)
    assert model.params["h.0.attn.c_attn.weight"].shape == (3 * 16, 16), "q, k and v of 4 heads each"
    assert "h.0.attn.c_attn.bias" in model.params and "lm_head.bias" in model.params


def test_no_bias_means_no_bias_parameters_anywhere():
    model = GPT(tiny_config(bias=False, tie_embeddings=True))
    assert not [
        n for n in model.params if n.endswith(".bias") and ".ln_" not in n and not n.startswith("ln_f")
    ]
