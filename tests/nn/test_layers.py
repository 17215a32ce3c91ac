"""Each layer: forward against torch.nn.functional, backward against torch.autograd, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from rgpt.nn.attention import CausalSelfAttention, Rotary, StandardCore
from rgpt.nn.flash import FlashCore
from rgpt.nn.layers import (
    FEW_ROWS,
    MLP,
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    RMSNorm,
    TiedHead,
    _few_rows,
    sinusoidal_positions,
)
from rgpt.nn.loss import CrossEntropy
from tests.helpers import assert_close, autograd_grads
from tests.reference import rope

DT = torch.float64
KW = dict(device="cpu", dtype=DT)


def randomise(layer):
    """Non-trivial parameters: ones/zeros (e.g. LayerNorm's defaults) would hide bugs."""
    for name, p in layer.params.items():
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" and p.dim() == 1 else 0.0))
    for sub in getattr(layer, "sublayers", dict)().values():
        randomise(sub)


def test_linear():
    lin = Linear(5, 7, std=0.3, **KW)
    randomise(lin)
    x, dy = torch.randn(3, 4, 5, dtype=DT), torch.randn(3, 4, 7, dtype=DT)
    w, b = lin.params["weight"], lin.params["bias"]
    y = lin.forward(x)
    assert_close(y, F.linear(x, w, b), "linear forward")
    dx = lin.backward(dy)
    _, (rdx, rdw, rdb) = autograd_grads(F.linear, [x, w, b], dy)
    assert_close(dx, rdx, "linear dx")
    assert_close(lin.grads["weight"], rdw, "linear dW")
    assert_close(lin.grads["bias"], rdb, "linear db")


@pytest.mark.parametrize("n_out, split", [(12, True), (9, True), (25, True), (11, False)])
@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_product_equals_the_plain_one(n_out, split, rows, bias):
    """Decoding's batched row-block product computes exactly what addmm computes (and is really taken)."""
    lin = Linear(6, n_out, std=0.3, bias=bias, **KW)
    randomise(lin)
    w, b = lin.params["weight"], lin.params.get("bias")
    x = torch.randn(rows, 6, dtype=DT)
    fast = _few_rows(x, w, b)
    assert (fast is not None) == split, (
        f"{n_out} output rows: the split path should {'' if split else 'not '}apply"
    )
    if split:
        assert_close(fast, F.linear(x, w, b), "row-block product vs F.linear")
    assert_close(lin.forward(x[:, None]), F.linear(x[:, None], w, b), "Linear.forward with few rows")
    assert _few_rows(torch.randn(FEW_ROWS + 1, 6, dtype=DT), w, b) is None, "more rows take the plain product"


def test_gradients_accumulate_not_assign():
    lin = Linear(4, 3, std=0.3, **KW)
    x, dy = torch.randn(2, 4, dtype=DT), torch.randn(2, 3, dtype=DT)
    lin.forward(x)
    lin.backward(dy)
    once = lin.grads["weight"].clone()
    lin.forward(x)
    lin.backward(dy)
    assert_close(lin.grads["weight"], 2 * once, "two backward passes without zeroing")


def test_backward_twice_fails_loudly():
    ln = LayerNorm(4, **KW)
    ln.forward(torch.randn(2, 3, 4, dtype=DT))
    ln.backward(torch.randn(2, 3, 4, dtype=DT))
    with pytest.raises(TypeError):
        ln.backward(torch.randn(2, 3, 4, dtype=DT))


def test_embedding_repeated_ids_accumulate():
    emb = Embedding(6, 4, std=1.0, **KW)
    idx = torch.tensor([[1, 3, 1, 1], [5, 3, 0, 1]])  # id 1 four times, id 3 twice, id 2/4 never
    dout = torch.randn(2, 4, 4, dtype=DT)
    out = emb.forward(idx)
    assert_close(out, F.embedding(idx, emb.params["weight"]), "embedding forward")
    emb.backward(dout)
    _, (rdw,) = autograd_grads(lambda w: F.embedding(idx, w), [emb.params["weight"]], dout)
    assert_close(emb.grads["weight"], rdw, "embedding dW")
    assert emb.grads["weight"][2].abs().sum() == 0 and emb.grads["weight"][4].abs().sum() == 0


@pytest.mark.parametrize("n_embd", [8, 9])
def test_sinusoidal_positions_standard_formula(n_embd):
    pe = sinusoidal_positions(50, n_embd, **KW)
    for pos in (0, 1, 7, 49):
        for i in range(n_embd):
            angle = pos / 10000 ** ((i - i % 2) / n_embd)  # 2i for even and odd channel alike
            want = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert abs(pe[pos, i].item() - want) < 1e-12, f"PE[{pos}, {i}] = {pe[pos, i].item()}, want {want}"


def test_layernorm():
    ln = LayerNorm(6, **KW)
    randomise(ln)
    x, dy = torch.randn(2, 5, 6, dtype=DT) * 3 + 1, torch.randn(2, 5, 6, dtype=DT)
    w, b = ln.params["weight"], ln.params["bias"]
    ref = lambda x, w, b: F.layer_norm(x, (6,), w, b, eps=1e-5)  # noqa: E731
    assert_close(ln.forward(x), ref(x, w, b), "layernorm forward")
    dx = ln.backward(dy)
    _, (rdx, rdw, rdb) = autograd_grads(ref, [x, w, b], dy)
    assert_close(dx, rdx, "layernorm dx")
    assert_close(ln.grads["weight"], rdw, "layernorm dgamma")
    assert_close(ln.grads["bias"], rdb, "layernorm dbeta")


def test_dropout_fixed_mask_and_modes():
    gen = torch.Generator().manual_seed(7)
    drop = Dropout(0.25, gen)
    x, dy = torch.randn(4, 8, 16, dtype=DT), torch.randn(4, 8, 16, dtype=DT)
    y = drop.forward(x)
    mask = drop.cache.clone()  # the mask actually used; the reference multiplies by the same one
    assert set(mask.unique().tolist()) <= {0.0, 1 / 0.75}
    assert 0.15 < (mask == 0).double().mean() < 0.35
    assert_close(y, x * mask, "dropout forward")
    _, (rdx,) = autograd_grads(lambda x: x * mask, [x], dy)
    assert_close(drop.backward(dy), rdx, "dropout dx")
    # reproducible from the seed
    drop2 = Dropout(0.25, torch.Generator().manual_seed(7))
    assert torch.equal(drop2.forward(x), y)
    # identity in eval mode
    drop.training = False
    assert drop.forward(x) is x and drop.backward(dy) is dy


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_mlp(activation):
    mlp = MLP(6, 10, activation=activation, std=0.5, proj_std=0.5, **KW)
    randomise(mlp)
    x, dy = torch.randn(2, 3, 6, dtype=DT), torch.randn(2, 3, 6, dtype=DT)
    fc, pr = mlp.c_fc.params, mlp.c_proj.params
    act = F.relu if activation == "relu" else F.gelu

    def ref(x, w1, b1, w2, b2):
        return F.linear(act(F.linear(x, w1, b1)), w2, b2)

    inputs = [x, fc["weight"], fc["bias"], pr["weight"], pr["bias"]]
    assert_close(mlp.forward(x), ref(*inputs), f"mlp[{activation}] forward")
    dx = mlp.backward(dy)
    _, (rdx, rw1, rb1, rw2, rb2) = autograd_grads(ref, inputs, dy)
    assert_close(dx, rdx, "mlp dx")
    assert_close(mlp.c_fc.grads["weight"], rw1, "mlp c_fc dW")
    assert_close(mlp.c_fc.grads["bias"], rb1, "mlp c_fc db")
    assert_close(mlp.c_proj.grads["weight"], rw2, "mlp c_proj dW")
    assert_close(mlp.c_proj.grads["bias"], rb2, "mlp c_proj db")


def _ref_attention(n_head, key_padding_mask):
    def ref(x, wa, ba, wp, bp):
        B, T, C = x.shape
        q, k, v = F.linear(x, wa, ba).split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        if key_padding_mask is not None:
            mask = mask | key_padding_mask[:, None, None, :]
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // n_head)).masked_fill(mask, float("-inf")).softmax(-1)
        att = torch.where(torch.isnan(att), torch.zeros_like(att), att)
        return F.linear((att @ v).transpose(1, 2).reshape(B, T, C), wp, bp)

    return ref


@pytest.mark.parametrize("padded", [False, True])
def test_attention(padded):
    B, T, C, H = 3, 5, 8, 2
    attn = CausalSelfAttention(C, H, 16, std=0.5, proj_std=0.5, **KW)
    randomise(attn)
    x, dy = torch.randn(B, T, C, dtype=DT), torch.randn(B, T, C, dtype=DT)
    # row 1 has left padding (its first query sees only padding: a fully masked row); row 2 right padding
    kpm = (
        torch.tensor([[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
        if padded
        else None
    )
    a, p = attn.c_attn.params, attn.c_proj.params
    inputs = [x, a["weight"], a["bias"], p["weight"], p["bias"]]
    ref = _ref_attention(H, kpm)
    y = attn.forward(x, key_padding_mask=kpm)
    assert torch.isfinite(y).all(), "attention output has NaN/inf"
    assert_close(y, ref(*inputs), "attention forward")
    if not padded:  # and against torch's own fused kernel
        q, k, v = F.linear(x, a["weight"], a["bias"]).split(C, 2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        assert_close(y, F.linear(sdpa, p["weight"], p["bias"]), "attention forward vs SDPA")
    else:  # the fully masked query (row 1, position 0) attends to nothing: only the projection bias remains
        assert_close(y[1, 0], p["bias"], "fully masked row")
    dx = attn.backward(dy)
    assert torch.isfinite(dx).all()
    _, (rdx, rwa, rba, rwp, rbp) = autograd_grads(ref, inputs, dy)
    assert_close(dx, rdx, "attention dx")
    assert_close(attn.c_attn.grads["weight"], rwa, "attention c_attn dW")
    assert_close(attn.c_attn.grads["bias"], rba, "attention c_attn db")
    assert_close(attn.c_proj.grads["weight"], rwp, "attention c_proj dW")
    assert_close(attn.c_proj.grads["bias"], rbp, "attention c_proj db")


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_cross_entropy_with_ignore_index(scale):
    logits = torch.randn(2, 4, 11, dtype=DT) * 4
    targets = torch.tensor([[3, -100, 10, 3], [0, 5, -100, -100]])
    ce = CrossEntropy()
    loss = ce.forward(logits.clone(), targets)  # backward reuses the logits' memory, hence the clone
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert_close(loss, ref, "cross-entropy forward")
    dlogits = ce.backward(scale)
    _, (rd,) = autograd_grads(
        lambda z: F.cross_entropy(z.flatten(0, 1), targets.flatten(), ignore_index=-100), [logits], scale
    )
    assert_close(dlogits, rd, "cross-entropy dlogits")
    assert (dlogits[0, 1] == 0).all() and (dlogits[1, 2:] == 0).all(), (
        "ignored positions must get zero gradient"
    )


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[[1e4, 0.0, -1e4]]], dtype=torch.float32)
    ce = CrossEntropy()
    loss = ce.forward(logits.clone(), torch.tensor([[1]]))
    assert torch.isfinite(loss) and abs(loss.item() - 1e4) < 1e-2
    assert torch.isfinite(ce.backward()).all()


# ---- architecture options -----------------------------------------------------------------------
def test_rmsnorm():
    ln = RMSNorm(6, **KW)
    randomise(ln)
    x, dy = torch.randn(3, 4, 6, dtype=DT) * 2 + 0.5, torch.randn(3, 4, 6, dtype=DT)
    w = ln.params["weight"]
    ref = lambda x, w: F.rms_norm(x, (6,), w, eps=1e-5)  # noqa: E731
    assert_close(ln.forward(x), ref(x, w), "rmsnorm forward")
    dx = ln.backward(dy)
    _, (rdx, rdw) = autograd_grads(ref, [x, w], dy)
    assert_close(dx, rdx, "rmsnorm dx")
    assert_close(ln.grads["weight"], rdw, "rmsnorm dW")


def test_swiglu_mlp_keeps_the_parameter_count_and_matches_autograd():
    relu = MLP(6, 12, activation="relu", std=0.5, proj_std=0.5, **KW)
    mlp = MLP(6, 12, activation="swiglu", std=0.5, proj_std=0.5, **KW)
    count = lambda m: sum(p.numel() for s in m.sublayers().values() for p in s.params.values())  # noqa: E731
    assert abs(count(mlp) - count(relu)) <= 0.05 * count(relu), f"{count(mlp)} vs {count(relu)} parameters"
    randomise(mlp)
    x, dy = torch.randn(3, 4, 6, dtype=DT), torch.randn(3, 4, 6, dtype=DT)
    a, p = mlp.c_fc.params, mlp.c_proj.params
    inputs = [x, a["weight"], a["bias"], p["weight"], p["bias"]]

    def ref(x, w1, b1, w2, b2):
        g, u = F.linear(x, w1, b1).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, w2, b2)

    assert_close(mlp.forward(x), ref(*inputs), "swiglu forward")
    dx = mlp.backward(dy)
    _, (rdx, rw1, rb1, rw2, rb2) = autograd_grads(ref, inputs, dy)
    assert_close(dx, rdx, "swiglu dx")
    assert_close(mlp.c_fc.grads["weight"], rw1, "swiglu c_fc dW")
    assert_close(mlp.c_fc.grads["bias"], rb1, "swiglu c_fc db")
    assert_close(mlp.c_proj.grads["weight"], rw2, "swiglu c_proj dW")
    assert_close(mlp.c_proj.grads["bias"], rb2, "swiglu c_proj db")


def test_tied_head_scales_and_accumulates_into_the_shared_weight():
    head = TiedHead(6, 9, **KW)
    w = torch.randn(9, 6, dtype=DT)
    head.params["weight"], head.grads["weight"] = w, torch.ones(9, 6, dtype=DT)  # bound as the model binds it
    head.params["bias"].normal_()
    x, dy = torch.randn(2, 3, 6, dtype=DT), torch.randn(2, 3, 9, dtype=DT)
    ref = lambda x, w, b: F.linear(x / math.sqrt(6), w, b)  # noqa: E731
    assert_close(head.forward(x), ref(x, w, head.params["bias"]), "tied head forward")
    dx = head.backward(dy)
    _, (rdx, rdw, rdb) = autograd_grads(ref, [x, w, head.params["bias"]], dy)
    assert_close(dx, rdx, "tied head dx")
    assert_close(head.grads["weight"], 1.0 + rdw, "tied head dW must add to what the embedding put there")
    assert_close(head.grads["bias"], rdb, "tied head db")


@pytest.mark.parametrize("start", [0, 5])
def test_rotary_matches_the_complex_form_and_its_backward_is_the_inverse(start):
    rot = Rotary(8, 16, **KW)
    x, dy = torch.randn(2, 3, 4, 8, dtype=DT), torch.randn(2, 3, 4, 8, dtype=DT)
    assert_close(rot.rotate(x, start), rope(x, start), "rope forward vs complex multiplication")
    _, (rdx,) = autograd_grads(lambda x: rope(x, start), [x], dy)
    assert_close(rot.rotate(dy, start, inverse=True), rdx, "rope backward")
    # relative positions: q_t . k_s depends on t - s only
    q, k = torch.randn(8, dtype=DT).expand(1, 1, 16, 8), torch.randn(8, dtype=DT).expand(1, 1, 16, 8)
    qr, kr = rot.rotate(q, 0), rot.rotate(k, 0)
    assert_close((qr[0, 0, 7] * kr[0, 0, 4]).sum(), (qr[0, 0, 12] * kr[0, 0, 9]).sum(), "q_7.k_4 vs q_12.k_9")


def test_attention_with_rope_matches_autograd():
    B, T, C, H = 2, 6, 8, 2
    attn = CausalSelfAttention(C, H, 16, std=0.5, proj_std=0.5, rope=True, **KW)
    randomise(attn)
    x, dy = torch.randn(B, T, C, dtype=DT), torch.randn(B, T, C, dtype=DT)
    a, p = attn.c_attn.params, attn.c_proj.params
    inputs = [x, a["weight"], a["bias"], p["weight"], p["bias"]]

    def ref(x, wa, ba, wp, bp):
        q, k, v = F.linear(x, wa, ba).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return F.linear(y.transpose(1, 2).reshape(B, T, C), wp, bp)

    assert_close(attn.forward(x), ref(*inputs), "rope attention forward")
    dx = attn.backward(dy)
    _, (rdx, rwa, rba, _, _) = autograd_grads(ref, inputs, dy)
    assert_close(dx, rdx, "rope attention dx")
    assert_close(attn.c_attn.grads["weight"], rwa, "rope attention c_attn dW")
    assert_close(attn.c_attn.grads["bias"], rba, "rope attention c_attn db")


@pytest.mark.parametrize("T, tile", [(13, 4), (16, 4), (7, 64), (20, 6)])
@pytest.mark.parametrize("padded", [False, True])
def test_flash_equals_standard_in_values_and_gradients(T, tile, padded):
    B, H, D = 3, 2, 5
    q, k, v, dy = (torch.randn(B, H, T, D, dtype=DT) for _ in range(4))
    kpm = None
    if padded:  # row 1: left padding (its first queries see nothing); row 2: right padding; row 0 none
        kpm = torch.zeros(B, T, dtype=torch.bool)
        kpm[1, : T // 2 + 1] = True
        kpm[2, T - 3 :] = True
    std, fl = StandardCore(torch.ones(T, T, dtype=torch.bool).triu(1)), FlashCore(tile)
    y_std, y_fl = std.forward(q, k, v, kpm), fl.forward(q, k, v, kpm)
    assert torch.isfinite(y_fl).all()
    assert_close(y_fl, y_std, "flash forward", rtol=0, atol=1e-10)
    if padded:
        assert torch.equal(y_fl[1, :, 0], torch.zeros_like(y_fl[1, :, 0])), "a fully masked row gives zeros"
    for a, b, name in zip(fl.backward(dy), std.backward(dy), ("dq", "dk", "dv")):
        assert torch.isfinite(a).all(), f"flash {name} has NaN/inf"
        assert_close(a, b, f"flash {name}", rtol=0, atol=1e-10)


def test_flash_never_allocates_the_full_score_matrix():
    """No product in a flash forward + backward is larger than a tile: the (T, T) weights never exist."""
    B, H, T, D = 1, 2, 512, 8
    q, k, v, dy = (torch.randn(B, H, T, D, dtype=DT) for _ in range(4))
    sizes = []
    real_matmul = torch.matmul

    def spy(a, b):
        out = real_matmul(a, b)
        sizes.append(out.numel())
        return out

    core = FlashCore(64)
    torch.matmul = spy
    try:
        core.backward(core.forward(q, k, v) * 0 + dy)
    finally:
        torch.matmul = real_matmul
    assert max(sizes) <= B * H * 64 * max(64, D), f"a product of {max(sizes)} elements: not tiled"
    assert max(sizes) < B * H * T * T / 50


@pytest.mark.parametrize("flash", [False, True], ids=["standard", "flash"])
@pytest.mark.parametrize("n_kv_head", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_query_attention_matches_autograd(flash, n_kv_head, padded, small_tiles):
    """n_kv_head key/value heads shared by groups of query heads, written the plain way (each copied for its
    group) in the reference; forward also against SDPA's own grouped-query path, backward by autograd."""
    B, T, C, H = 3, 7, 16, 4
    D, Hkv = C // H, n_kv_head
    attn = CausalSelfAttention(C, H, 16, std=0.5, proj_std=0.5, flash=flash, n_kv_head=Hkv, rope=True, **KW)
    randomise(attn)
    assert attn.c_attn.params["weight"].shape == (C + 2 * Hkv * D, C)
    x, dy = torch.randn(B, T, C, dtype=DT), torch.randn(B, T, C, dtype=DT)
    kpm = torch.zeros(B, T, dtype=torch.bool) if padded else None
    if padded:
        kpm[1, :3], kpm[2, 5:] = True, True

    def ref(x, wa, ba, wp, bp):
        q, k, v = F.linear(x, wa, ba).split((C, Hkv * D, Hkv * D), dim=2)
        q = rope(q.view(B, T, H, D).transpose(1, 2))
        k = rope(k.view(B, T, Hkv, D).transpose(1, 2)).repeat_interleave(H // Hkv, 1)
        v = v.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        if kpm is not None:
            mask = mask | kpm[:, None, None, :]
        att = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(mask, float("-inf")).softmax(-1)
        att = torch.where(torch.isnan(att), torch.zeros_like(att), att)
        return F.linear((att @ v).transpose(1, 2).reshape(B, T, C), wp, bp)

    a, p = attn.c_attn.params, attn.c_proj.params
    inputs = [x, a["weight"], a["bias"], p["weight"], p["bias"]]
    y = attn.forward(x, key_padding_mask=kpm)
    assert_close(y, ref(*inputs), f"GQA forward ({n_kv_head} kv heads)")
    if not padded:
        q, k, v = F.linear(x, a["weight"], a["bias"]).split((C, Hkv * D, Hkv * D), 2)
        q = rope(q.view(B, T, H, D).transpose(1, 2))
        k = rope(k.view(B, T, Hkv, D).transpose(1, 2))
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert_close(
            y, F.linear(sdpa.transpose(1, 2).reshape(B, T, C), p["weight"], p["bias"]), "GQA vs SDPA"
        )
    dx = attn.backward(dy)
    _, (rdx, rwa, rba, rwp, rbp) = autograd_grads(ref, inputs, dy)
    assert_close(dx, rdx, "GQA dx")
    assert_close(attn.c_attn.grads["weight"], rwa, "GQA c_attn dW (the k and v rows sum over their groups)")
    assert_close(attn.c_attn.grads["bias"], rba, "GQA c_attn db")
    assert_close(attn.c_proj.grads["weight"], rwp, "GQA c_proj dW")
    assert_close(attn.c_proj.grads["bias"], rbp, "GQA c_proj db")
