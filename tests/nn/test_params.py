"""The parameter store: layout, round trips, and the bf16 working copy always following the master weights."""

import pytest
import torch

from rgpt.data.tokenizer import Tokenizer
from rgpt.nn.model import GPT, GPTConfig
from rgpt.nn.optim import Adam
from rgpt.nn.params import ParamStore
from rgpt.runtime import checkpoint as ckpt

BF16 = torch.bfloat16


def tiny(compute_dtype=None):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=23, n_embd=16, n_head=2, n_layer=2, n_hidden=24, block_size=8, dropout=0.0)
    return GPT(cfg, compute_dtype=compute_dtype)


def assert_layers_see_master(model):
    """Every layer's parameter is the master weight itself, or (low precision) its exact bfloat16 rounding."""
    seen = 0
    for prefix, layer in model._named_layers():
        for key, p in getattr(layer, "params", {}).items():
            master = model.params[f"{prefix}.{key}"]
            want = master.to(p.dtype)
            assert torch.equal(p, want), f"{prefix}.{key}: layer sees stale weights"
            seen += 1
    assert seen == len(model.params)


def test_layout_covers_every_element_once_and_layers_hold_views():
    model = tiny()
    store = model.store
    covered = torch.zeros(store.numel(), dtype=torch.int32)
    for s in store.slices.values():
        covered[s] += 1
    assert torch.equal(covered, torch.ones_like(covered)), "slices must tile the flat buffer exactly"
    w = model.h[1].mlp.c_fc.params["weight"]
    assert w.data_ptr() == store.params["h.1.mlp.c_fc.weight"].data_ptr(), (
        "layers must hold views, not copies"
    )
    g = model.h[1].mlp.c_fc.grads["weight"]
    assert g.data_ptr() == store.grads["h.1.mlp.c_fc.weight"].data_ptr()


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        ParamStore(
            [("a", torch.ones(2), False), ("a", torch.ones(3), True)], device="cpu", dtype=torch.float32
        )


@pytest.mark.parametrize("how", ["write", "load", "restore", "adam"])
def test_every_write_path_is_seen_by_the_bf16_layers(how):
    model = tiny(BF16)
    store = model.store
    assert store.working is not None and store.low, "the test needs a working copy"
    snap = store.snapshot()
    if how == "write":
        with store.write() as data:
            data.mul_(1.5).add_(0.01)
    elif how == "load":
        store.load({n: torch.randn_like(p) for n, p in store.params.items()})
    elif how == "restore":
        with store.write() as data:
            data.zero_()
        store.restore(snap)
    else:
        idx = torch.randint(0, 23, (2, 8))
        model.forward(idx, idx)
        model.backward()
        Adam(store).step(0.05)
    if how != "restore":
        assert not torch.equal(store.data, snap), "the weights did not change: the test would be vacuous"
    assert_layers_see_master(model)


def test_the_layers_compute_with_what_the_store_holds():
    """A forward after a store write equals a fresh model built from those weights."""
    model, fresh = tiny(BF16), tiny(BF16)
    new = {n: torch.randn_like(p) * 0.1 for n, p in model.params.items()}
    model.store.load(new)
    fresh.store.load(new)
    model.eval(), fresh.eval()
    idx = torch.randint(0, 23, (2, 8))
    assert torch.equal(model.forward(idx), fresh.forward(idx))
    assert not torch.equal(model.forward(idx), tiny(BF16).forward(idx))


def test_load_names_and_shapes_must_match():
    store = tiny().store
    tensors = store.state_dict()
    tensors.pop("ln_f.bias")
    with pytest.raises(ValueError, match="ln_f.bias"):
        store.load(tensors)
    tensors = store.state_dict()
    tensors["ln_f.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"ln_f.bias has shape \(3,\)"):
        store.load(tensors)


def test_checkpoint_round_trip_restores_master_and_working_copy(tmp_path):
    model = tiny(BF16)
    with model.store.write() as data:
        data.normal_()
    tok = Tokenizer.build(["你好世界"], min_freq=1, idioms=())
    path = ckpt.save(tmp_path, "best", 3, model, tok, {})
    other = tiny(BF16)
    ckpt.load_weights(other, path)
    assert torch.equal(other.store.data, model.store.data)
    assert torch.equal(other.store.working, model.store.working)
    assert_layers_see_master(other)
    state = model.store.state_dict()
    assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * 4 for t in state.values())
