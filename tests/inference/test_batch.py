"""Continuous batching (rgpt.inference.batch): replies decoded together get what each gets alone.

The batched decode step against the one-reply KV-cache path, logits first (float64: equal to rounding;
float32: within 1e-5, the contract when a larger product may round differently), then whole replies:
greedy and seeded sampling with every filter, replies of every length joining and leaving, windows that
slide, prompts prefilled in chunks, in every architecture, in fp32 and bf16."""

import dataclasses

import pytest
import torch

from rgpt.inference.batch import Batcher, Row, generate_many
from rgpt.inference.generate import DecodeConfig, generate
from rgpt.nn.layers import FEW_ROWS
from rgpt.nn.model import GPT, GPTConfig
from tests.inference.test_generate import ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS_GQA = ARCHS | {"gqa-sinusoidal": {"n_kv_head": 2, "bias": False, "tie_embeddings": False}}
DECODES = {
    # plain picks: their argmax and their probabilities are computed for all rows at once (_shared_work)
    "plain-greedy": DecodeConfig(max_new_tokens=30, min_new_tokens=0),
    "plain-sampled": DecodeConfig(method="sample", seed=5, temperature=0.9, max_new_tokens=30),
    # ... also before min_new_tokens, their stop ids masked in their own rows
    "plain-greedy-min": DecodeConfig(max_new_tokens=30, min_new_tokens=6),
    "plain-sampled-min": DecodeConfig(method="sample", seed=3, temperature=1.1, min_new_tokens=9, max_new_tokens=20),
    # no early end, so the windows slide; the penalty keeps a random model from one loop for every prompt
    "greedy": DecodeConfig(max_new_tokens=30, min_new_tokens=30, repetition_penalty=2.0),
    "sampled": DecodeConfig(
        method="sample", seed=7, temperature=1.3, top_k=12, top_p=0.95, repetition_penalty=1.3,
        min_new_tokens=4, max_new_tokens=25,
    ),
}  # fmt: skip


def prompts(n=10, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 12, 20, 5, 9, 2, 4, 11, 6, 8][:n]  # 20 > block_size: only the last 3/4 are seen
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def lone_logits(model, prompt, token):
    caches = model.new_kv_caches(1)
    model.forward_cached(torch.tensor([prompt]), caches)
    return model.forward_cached(torch.tensor([[token]]), caches)[0, -1]


def slab_logits(model, ps, tokens, slots, n_keys=None):
    """One forward_rows over replies of different lengths, their prompts placed in slots [0, len(ps))."""
    slab = model.new_kv_caches(slots)
    for i, p in enumerate(ps):
        mine = model.new_kv_caches(1)
        model.forward_cached(torch.tensor([p]), mine)
        for own, shared in zip(mine, slab):
            shared.k[i, :, : len(p)], shared.v[i, :, : len(p)] = own.k[0, :, : len(p)], own.v[0, :, : len(p)]
    return model.forward_rows(torch.tensor(tokens), slab, torch.tensor([len(p) for p in ps]), n_keys)


@pytest.mark.parametrize("arch", ARCHS_GQA)
def test_a_batched_step_gives_each_reply_its_lone_logits(arch):
    model = tiny_model(**ARCHS_GQA[arch])
    ps = [p for p in prompts(8) if len(p) < model.config.block_size]
    tokens = [3 + i for i in range(len(ps))]
    got = slab_logits(model, ps, tokens, slots=len(ps) + 3)
    for i, (p, t) in enumerate(zip(ps, tokens)):
        torch.testing.assert_close(got[i], lone_logits(model, p, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS_GQA)
def test_a_lone_reply_takes_the_unmasked_path_and_gets_its_lone_logits(arch):
    """One row spanning exactly its own keys (the lone reply's fast path: an int position, no mask, its
    key and value written by slicing) and the same row spanning more keys, masked (the general path)."""
    model = tiny_model(**ARCHS_GQA[arch])
    for p in (p for p in prompts(8) if len(p) < model.config.block_size - 1):
        lone = lone_logits(model, p, 4)
        fast = slab_logits(model, [p], [4], slots=3)[0]
        masked = slab_logits(model, [p], [4], slots=3, n_keys=len(p) + 2)[0]
        torch.testing.assert_close(fast, lone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(masked, lone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("arch", ARCHS_GQA)
def test_in_float32_company_changes_logits_by_less_than_1e_5(arch, packed):
    """float32: the 24-row product may round differently from the one-row one; by how much is bounded
    (packed: as chat, eval and serve open a model on CPU)."""
    torch.manual_seed(1)
    cfg = GPTConfig(
        vocab_size=300, n_embd=64, n_head=4, n_layer=2, n_hidden=128, block_size=48, **ARCHS_GQA[arch]
    )
    model = GPT(cfg)
    model.eval()
    if packed and not model.pack_for_inference():
        pytest.skip("no oneDNN")
    g = torch.Generator().manual_seed(2)
    ps = [
        torch.randint(5, 300, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 47, (24,), generator=g)
    ]
    tokens = torch.randint(5, 300, (24,), generator=g).tolist()
    got = slab_logits(model, ps, tokens, slots=32)
    worst = max(
        float((got[i] - lone_logits(model, p, t)).abs().max()) for i, (p, t) in enumerate(zip(ps, tokens))
    )
    assert worst < 1e-5


def together(model, ps, cfgs, slots, chunk):
    """Each prompt's reply, with its own settings, all decoded by one Batcher of `slots` slots."""
    batcher, out, todo = Batcher(model, slots, chunk), [[] for _ in ps], list(range(len(ps)))
    while todo or len(batcher):
        while todo and len(batcher) < slots:
            i = todo.pop(0)
            batcher.add(Row(ps[i], cfgs[i], key=i))
        for e in batcher.step():
            assert e.error is None
            out[e.row.key] += [] if e.token is None else [e.token]
    return out


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("arch", ARCHS_GQA)
def test_replies_decoded_together_equal_replies_decoded_alone(arch, decode):
    """More prompts than slots, of every length: replies end at different steps, others join their
    slots; the windows slide (30 tokens through a 12-token window); prompts take several chunks.
    Sampled replies have a seed each, as requests do."""
    model = tiny_model(vocab_size=97, sharpen=4.0, **ARCHS_GQA[arch])
    ps = prompts(vocab=97)
    cfgs = [
        dataclasses.replace(DECODES[decode], seed=DECODES[decode].seed and 100 + i) for i in range(len(ps))
    ]
    alone = [generate(model, p, cfg) for p, cfg in zip(ps, cfgs)]
    assert len({tuple(r) for r in alone}) > 3, "the replies should differ, or a crossed row would not show"
    for slots, chunk in ((4, 3), (10, 64), (1, 1)):
        assert together(model, ps, cfgs, slots, chunk) == alone, (slots, chunk)
    assert generate_many(model, ps, cfgs[0], slots=3, prefill_chunk=5) == [
        generate(model, p, cfgs[0]) for p in ps
    ]


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("decode", DECODES)
def test_bfloat16_replies_together_equal_alone(decode, packed):
    """precision=bf16 (bfloat16 products, float32 norms and KV cache), as chat, eval and serve load it
    (packed: weights in oneDNN's layout, as they open it on CPU)."""
    model = bf16_model()
    if packed and not model.pack_for_inference():
        pytest.skip("no oneDNN")
    ps = prompts(12, vocab=200, seed=4)
    alone = [generate(model, p, DECODES[decode]) for p in ps]
    assert generate_many(model, ps, DECODES[decode], slots=8, prefill_chunk=5) == alone


def bf16_model(vocab_size=200, **arch):
    """A random model with bfloat16 products whose logits are confident (no near-ties to flip)."""
    torch.manual_seed(3)
    cfg = GPTConfig(
        vocab_size=vocab_size, n_embd=64, n_head=4, n_layer=2, n_hidden=128, block_size=32, **arch
    )
    model = GPT(cfg, compute_dtype=torch.bfloat16)
    for name, p in model.params.items():
        if "weight" in name and p.dim() == 2:
            p.mul_(6.0)
    model.store.load(dict(model.params))  # refresh the bfloat16 copies
    model.eval()
    return model


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("arch", ["default", "all"])
def test_packed_bfloat16_weights_give_the_same_numbers_for_any_number_of_rows(arch):
    """Linear.pack (inference, bf16, CPU): the same products bit for bit as the plain bfloat16 ones, and a
    row's product does not depend on how many rows share it (so bf16 decoding is batch-invariant there)."""
    model = bf16_model(**ARCHS[arch])
    idx = torch.randint(0, 200, (3, 9))
    linears = [layer for _, layer in model._named_layers() if hasattr(layer, "pack")]
    xs = [torch.randn(9, layer.params["weight"].shape[1]) for layer in linears]
    plain_logits, plain = model.forward(idx), [layer.forward(x) for layer, x in zip(linears, xs)]
    assert model.pack_for_inference() == len(linears) and all(layer.packed is not None for layer in linears)
    assert torch.equal(model.forward(idx), plain_logits)
    for layer, x, y in zip(linears, xs, plain):
        assert torch.equal(layer.forward(x), y)
        for rows in (1, 2, 5):
            assert torch.equal(layer.forward(x[:rows]), y[:rows]), "a row's product changed with its company"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("every_row", [False, True], ids=["default", "batch-invariant"])
def test_packed_float32_weights_serve_many_rows_and_leave_few_rows_alone(every_row):
    """float32: more than FEW_ROWS rows (replies decoded together) read the packed weight, the same
    products up to rounding; a row's product is the same in any such company; fewer rows are untouched,
    unless packed for batch invariance: then a row's product is the same in any company, one row included."""
    torch.manual_seed(5)
    cfg = GPTConfig(vocab_size=300, n_embd=64, n_head=4, n_layer=2, n_hidden=128, block_size=48)
    model = GPT(cfg)
    model.eval()
    linears = [layer for _, layer in model._named_layers() if hasattr(layer, "pack")]
    xs = [torch.randn(24, layer.params["weight"].shape[1]) for layer in linears]
    plain = [layer.forward(x) for layer, x in zip(linears, xs)]
    few = [layer.forward(x[:FEW_ROWS]) for layer, x in zip(linears, xs)]
    assert model.pack_for_inference(batch_invariant=every_row) == len(linears)
    for layer, x, y, y_few in zip(linears, xs, plain, few):
        together = layer.forward(x)
        torch.testing.assert_close(together, y, rtol=1e-5, atol=1e-6)
        if not every_row:
            assert torch.equal(layer.forward(x[:FEW_ROWS]), y_few)
        for rows in (1, 2, FEW_ROWS, FEW_ROWS + 1, 9, 16)[0 if every_row else 3 :]:
            assert torch.equal(layer.forward(x[:rows]), together[:rows]), rows


def invariant_fp32_model(**arch):
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=300, n_embd=64, n_head=4, n_layer=2, n_hidden=128, block_size=48, **arch)
    model = GPT(cfg)
    model.eval()
    if not model.pack_for_inference(batch_invariant=True):
        pytest.skip("no oneDNN")
    return model


@pytest.mark.parametrize("arch", ARCHS_GQA)
def test_batch_invariant_float32_logits_in_company_are_the_lone_logits_bit_for_bit(arch):
    """float32 opened with batch_invariant=true: 24 replies of different lengths in one batched step, each
    with exactly the logits it gets decoded alone (its products have the same shapes in any company: every
    product reads packed weights, attention spans the whole slab)."""
    model = invariant_fp32_model(**ARCHS_GQA[arch])
    g = torch.Generator().manual_seed(2)
    ps = [
        torch.randint(5, 300, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 47, (24,), generator=g)
    ]
    tokens = torch.randint(5, 300, (24,), generator=g).tolist()
    with torch.no_grad():
        got = slab_logits(model, ps, tokens, slots=32, n_keys=48)  # the whole slab, as the Batcher's steps
        for i, (p, t) in enumerate(zip(ps, tokens)):
            assert torch.equal(got[i], slab_logits(model, [p], [t], slots=32, n_keys=48)[0]), i


def token_logits(model, ps, cfgs, idx, slots, chunk):
    """{i: the logits each token of reply i was picked from}, replies idx decoded by one Batcher."""
    batcher, seen = Batcher(model, slots, chunk), {i: [] for i in idx}
    pick = batcher._pick
    batcher._pick = lambda row, logits, shared=None: (
        seen[row.key].append(logits.clone()) or pick(row, logits, shared)
    )
    todo = list(idx)
    with torch.no_grad():
        while todo or len(batcher):
            while todo and len(batcher) < slots:
                i = todo.pop(0)
                batcher.add(Row(ps[i], cfgs[i], key=i))
            batcher.step()
    return seen


def assert_alone_equals_together(model, ps, cfgs, slots, chunk):
    together = token_logits(model, ps, cfgs, range(len(ps)), slots, chunk)
    for i in range(len(ps)):
        alone = token_logits(model, ps, cfgs, [i], 1, chunk)[i]
        assert len(alone) == len(together[i]) and all(map(torch.equal, alone, together[i])), i


@pytest.mark.parametrize("decode", ["plain-sampled", "sampled"])
def test_batch_invariant_float32_replies_together_equal_alone_through_the_batcher(decode):
    """Whole sampled replies, every token's logits compared: 10 replies joining and leaving 4 slots against
    each decoded alone, in float32 with batch_invariant=true (no rounding between them to hide)."""
    model = invariant_fp32_model(**ARCHS["all"])
    ps = prompts(vocab=300)
    cfgs = [dataclasses.replace(DECODES[decode], seed=100 + i) for i in range(len(ps))]
    assert_alone_equals_together(model, ps, cfgs, slots=4, chunk=3)


def test_batch_invariant_float32_holds_for_wide_layers_and_long_prompts():
    """Where a lone row of a wide product takes another oneDNN kernel (inputs of 1,536 and more) and where
    a prompt's prefill chunks would follow the queue: prompts longer than the chunk, in company and alone."""
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=2000, n_embd=512, n_head=8, n_layer=4, n_hidden=2048, block_size=64)
    model = GPT(cfg)
    model.eval()
    if not model.pack_for_inference(batch_invariant=True):
        pytest.skip("no oneDNN")
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in (50, 20, 37, 9, 44)]
    cfgs = [DecodeConfig(method="sample", seed=i, max_new_tokens=6, min_new_tokens=6) for i in range(len(ps))]
    assert_alone_equals_together(model, ps, cfgs, slots=3, chunk=16)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode():
    model = tiny_model(block_size=64)
    batcher = Batcher(model, slots=4, prefill_chunk=4)
    short = batcher.add(Row([1, 5, 6], DecodeConfig(max_new_tokens=40, min_new_tokens=40)))
    while short.slot is None:
        batcher.step()
    long = batcher.add(Row(list(range(5, 23)) * 2, DecodeConfig(max_new_tokens=5)))  # 36 tokens: 9 chunks
    for _ in range(8):
        events = batcher.step()
        assert [e.row for e in events] == [short], (
            "each step: a token for the decoding reply, none for the other"
        )
        assert long.slot is None and len(long.todo) > 0
    events = batcher.step()  # the last chunk: the long prompt's first token comes with the short one's next
    assert [e.row for e in events] == [short, long] and long.slot == 1


def test_a_failing_reply_ends_alone_and_frees_its_slot(monkeypatch):
    model = tiny_model(sharpen=4.0)
    batcher = Batcher(model, slots=3)
    cfg = DecodeConfig(max_new_tokens=20, min_new_tokens=20)
    rows = [batcher.add(Row(p, cfg)) for p in prompts(3)]
    real = Batcher._pick

    def pick(self, row, *args):
        if row is rows[1] and row.generated == 2:
            raise RuntimeError("boom")
        return real(self, row, *args)

    monkeypatch.setattr(Batcher, "_pick", pick)
    got = {id(r): [] for r in rows}
    errors = []
    while len(batcher):
        for e in batcher.step():
            if e.error is not None:
                errors.append((e.row, str(e.error)))
            elif e.token is not None:
                got[id(e.row)].append(e.token)
    assert errors == [(rows[1], "boom")] and rows[1].slot is None
    alone = [generate(model, p, cfg) for p in prompts(3)]
    assert got[id(rows[0])] == alone[0] and got[id(rows[2])] == alone[2]


def test_bad_rows_are_refused():
    model = tiny_model()
    batcher = Batcher(model, slots=1)
    with pytest.raises(ValueError, match="empty prompt"):
        batcher.add(Row([], DecodeConfig()))
    with pytest.raises(ValueError, match="beam"):
        batcher.add(Row([1], DecodeConfig(method="beam")))
    batcher.add(Row([1], DecodeConfig()))
    with pytest.raises(ValueError, match="slots are taken"):
        batcher.add(Row([1], DecodeConfig()))
