"""Decoding: the KV-cached window against full recomputation, the logits filters on hand-made
distributions, beam search against brute force, the repetition penalty, stopping and sliding."""

import itertools
import math

import pytest
import torch

from rgpt.inference.generate import (
    END_OF_TURN,
    MIN_TEMPERATURE,
    DecodeConfig,
    Window,
    beam_search,
    draw,
    generate,
    make_generator,
    next_token,
    penalise_repeats,
    sample_group,
    sample_groups,
    stream,
    top_k_filter,
    top_p_filter,
)
from rgpt.nn.model import GPT, GPTConfig
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread


DT = torch.float64


# the architecture options that change what the KV cache holds or where positions enter
ARCHS = {
    "default": {},
    "rope": {"pos": "rope"},
    "all": {
        "pos": "rope",
        "norm": "rmsnorm",
        "activation": "swiglu",
        "tie_embeddings": True,
        "attn": "flash",
    },
}


def tiny_model(vocab_size=23, block_size=12, sharpen=1.0, **arch):
    cfg = GPTConfig(
        vocab_size=vocab_size,
        n_embd=16,
        n_head=4,
        n_layer=2,
        n_hidden=24,
        block_size=block_size,
        dropout=0.0,
        **arch,
    )
    model = GPT(cfg, dtype=DT)
    for name, p in model.params.items():  # non-trivial LayerNorms and biases, as in test_model
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
            p.add_(torch.randn_like(p) * 0.3)
    head = model.params.get("lm_head.weight", model.params["wte.weight"])  # tied: the embedding is the head
    head.mul_(sharpen)  # an untrained head gives near-ties; sharpen separates them
    model.eval()
    return model


class MarkovModel:
    """A stand-in model whose next-token logits depend only on the last token: table[last] (V, V).

    It has the interface decoding uses (config.block_size, device, forward, new_kv_caches,
    forward_cached), so tests can hand-make the distributions decoding sees.
    """

    class Cache:
        def __init__(self):
            self.length = 0

        def reorder(self, index):
            pass

    def __init__(self, table, block_size=64):
        self.table = torch.as_tensor(table, dtype=DT)
        self.config = GPTConfig(vocab_size=self.table.shape[0], block_size=block_size)
        self.device = torch.device("cpu")

    def forward(self, idx):
        return self.table[idx]  # (B, T, V)

    def new_kv_caches(self, batch):
        return [self.Cache()]

    def forward_cached(self, idx, caches, last_only=False):
        caches[0].length += idx.shape[1]
        assert caches[0].length <= self.config.block_size, "cache overflow"
        return self.table[idx[:, -1:] if last_only else idx]


def log_probs(*rows):
    return torch.tensor(rows, dtype=DT).log()


def survivors(logits):
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def full_logprob(model, prompt, continuation):
    """log P(continuation | prompt) by one full forward: the brute-force reference."""
    ids = torch.tensor([prompt + continuation])
    logp = torch.log_softmax(model.forward(ids[:, :-1]), dim=-1)[0]  # (T - 1, V)
    n = len(continuation)
    return float(logp[-n:].gather(1, ids[0, -n:, None]).sum())


# ---- the KV cache and the sliding window ----------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_window_matches_full_recomputation_across_slides(arch):
    model = tiny_model(block_size=12, **ARCHS[arch])
    cached, recomputed = Window(model, batch=2), Window(model, batch=2, use_cache=False)
    prompt = torch.randint(0, 23, (2, 7))
    # 32 tokens through a 12-token window
    steps = [prompt] + [torch.randint(0, 23, (2, 1)) for _ in range(25)]
    for i, ids in enumerate(steps):
        a, b = cached.extend(ids), recomputed.extend(ids)
        assert_close(a, b, f"step {i}: cached vs recomputed logits")
        # what the model sees is the window, its positions starting again at 0 after every slide
        assert_close(a, model.forward(cached.tokens)[:, -1], f"step {i}: logits vs forward(window)")
        assert cached.tokens.shape[1] <= 12
        assert torch.equal(cached.tokens, recomputed.tokens)
    assert cached.slides >= 2, f"the window slid only {cached.slides} times: the test would not cover sliding"
    assert torch.equal(cached.tokens[:, -1:], steps[-1]), "the newest token must always stay in the window"


def test_prefill_of_a_prompt_longer_than_the_window_keeps_its_end():
    model = tiny_model(block_size=12)
    window = Window(model)
    prompt = torch.randint(0, 23, (1, 30))
    logits = window.extend(prompt)
    assert torch.equal(window.tokens, prompt[:, -9:]), "keeps the last 3/4 of the window"
    assert_close(logits, model.forward(prompt[:, -9:])[:, -1], "logits after a long prompt")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_cache_equals_recomputation_and_the_naive_loop(arch):
    model = tiny_model(block_size=12, sharpen=20.0, **ARCHS[arch])
    prompt = [2, 4, 9, 1]
    cfg = DecodeConfig(max_new_tokens=30)
    fast = generate(model, prompt, cfg, stop_ids=())
    slow = generate(model, prompt, cfg, stop_ids=(), use_cache=False)
    assert fast == slow and len(fast) == 30, f"cached {fast} != recomputed {slow}"
    seq = list(prompt)  # the naive loop, while everything still fits the window
    for _ in range(12 - len(prompt)):
        seq.append(int(model.forward(torch.tensor([seq]))[0, -1].argmax()))
    assert fast[:8] == seq[len(prompt) :], "greedy must pick the argmax of a full forward at every step"


def test_generation_never_goes_silent_when_the_window_is_full():
    model = tiny_model(block_size=8)
    for method in ("greedy", "sample"):
        out = generate(model, [2] * 8, DecodeConfig(method=method, max_new_tokens=40, seed=1), stop_ids=())
        assert len(out) == 40, f"{method}: {len(out)} tokens, not 40, from a full window"


# ---- logits filters on hand-made distributions ------------------------------------------------------
def test_top_k_keeps_the_k_most_likely_tokens():
    logits = log_probs([0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.15, 0.05])
    assert survivors(top_k_filter(logits, 2)) == [[1, 3], [0, 2]]
    assert survivors(top_k_filter(logits, 1)) == [[1], [0]]
    assert survivors(top_k_filter(logits, 0)) == [[0, 1, 2, 3]] * 2, "k=0 means off"
    kept = top_k_filter(logits, 2)
    alive = torch.isfinite(kept)
    assert torch.equal(kept[alive], logits[alive]), "survivors keep their logits"


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.3, [1]),  # the most likely token alone already has 0.4
        (0.6, [1, 3]),  # 0.4 + 0.3 = 0.7 >= 0.6: the smallest set reaching p
        (0.75, [1, 2, 3]),  # 0.7 < 0.75, so 0.2 joins
        (0.95, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_most_likely_set_reaching_p(p, expected):
    assert survivors(top_p_filter(log_probs([0.1, 0.4, 0.2, 0.3]), p)) == [expected]


def test_top_p_boundary_and_batch_rows():
    # exactly representable masses: 0.5 + 0.25 reaches p = 0.75 exactly, so two tokens suffice
    logits = log_probs([0.125, 0.5, 0.125, 0.25], [0.05, 0.05, 0.05, 0.85])
    assert survivors(top_p_filter(logits, 0.75)) == [[1, 3], [3]]
    # the reference's bug kept the least likely tokens: the least likely must never survive alone
    assert survivors(top_p_filter(log_probs([0.6, 0.3, 0.1]), 0.5)) == [[0]]


def test_sampling_draws_only_survivors_and_is_seedable():
    logits = log_probs([0.1, 0.4, 0.2, 0.3]).expand(500, 4)
    cfg = DecodeConfig(method="sample", top_p=0.6)
    draws = next_token(logits, cfg, generator=make_generator(0, "cpu"))
    assert set(draws.tolist()) == {1, 3}, f"drew {sorted(set(draws.tolist()))} outside the nucleus {{1, 3}}"
    share = (draws == 1).double().mean().item()  # renormalised: 0.4 / 0.7
    assert abs(share - 4 / 7) < 0.08, f"token 1 drawn {share:.2f} of the time, expected about {4 / 7:.2f}"
    again = next_token(logits, cfg, generator=make_generator(0, "cpu"))
    assert torch.equal(draws, again), "the same seed must give the same draws"
    top1 = DecodeConfig(method="sample", top_k=1)
    greedy_like = next_token(logits, top1, generator=make_generator(5, "cpu"))
    assert set(greedy_like.tolist()) == {1}, "top_k=1 sampling is greedy"


def test_draw_inverts_the_cdf_row_by_row_with_the_right_frequencies(monkeypatch):
    n = 40_000
    rows = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    probs = rows.repeat(n, 1) * 3.0  # unnormalised: the draw scales by each row's total
    ids = draw(probs, make_generator(1, "cpu")).view(n, 2)
    for j in range(2):
        freq = torch.bincount(ids[:, j], minlength=6).double() / n
        assert torch.all(freq[rows[j] == 0] == 0), "an id of probability 0 was drawn"
        # each share within 5 standard deviations (sqrt(p (1 - p) / n) <= 0.0025)
        torch.testing.assert_close(freq, rows[j].double(), rtol=0, atol=0.0125)
    # u x total rounded up to the total points past the last id or at a trailing zero: never drawn
    for u in (1 - 2**-53, 1.0):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full((a[0], 1), u, dtype=torch.float64))
        assert draw(torch.tensor([[0.3, 0.7, 0.0]])).tolist() == [1]


def test_seeded_generation_is_reproducible():
    model = tiny_model()
    cfg = DecodeConfig(method="sample", temperature=1.5, max_new_tokens=20, seed=7)
    a, b = generate(model, [2, 5], cfg, stop_ids=()), generate(model, [2, 5], cfg, stop_ids=())
    c = generate(model, [2, 5], DecodeConfig(**{**cfg.__dict__, "seed": 8}), stop_ids=())
    assert a == b, "same seed, different samples"
    assert a != c, "different seeds gave identical 20-token samples"


# ---- repetition penalty -----------------------------------------------------------------------------
def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]], dtype=DT)
    seen = torch.tensor([[True, True, False, False]])
    assert_close(penalise_repeats(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=DT), "CTRL")
    assert penalise_repeats(logits, seen, 1.0) is logits, "1.0 means off"


def test_repetition_penalty_breaks_a_loop():
    # token 1 always prefers itself a little over token 2; without a penalty greedy repeats 1 forever
    table = torch.full((4, 4), -5.0, dtype=DT)
    table[:, 1], table[:, 2] = 2.0, 1.5
    model = MarkovModel(table)
    plain = generate(model, [0], DecodeConfig(max_new_tokens=6), stop_ids=())
    penalised = generate(model, [0], DecodeConfig(max_new_tokens=6, repetition_penalty=2.0), stop_ids=())
    assert plain == [1] * 6
    assert penalised[:2] == [1, 2], f"penalty 2 should make 1 (2.0 -> 1.0) lose to 2 (1.5): got {penalised}"


# ---- stopping ---------------------------------------------------------------------------------------
def markov_chain_to_eos():
    """0 -> 6 -> 7 -> 3 (<eos>), each step almost certain; <eos> is also 0's second choice."""
    table = torch.full((8, 8), -10.0, dtype=DT)
    table[0, 6], table[0, 3], table[6, 7], table[7, 3], table[3, 3] = 5.0, 4.0, 5.0, 5.0, 5.0
    return MarkovModel(table)


def test_generation_stops_at_the_end_of_the_turn_and_at_max_new_tokens():
    model = markov_chain_to_eos()
    assert generate(model, [0], DecodeConfig()) == [6, 7], "stops at <eos> (id 3), which is not returned"
    assert generate(model, [0], DecodeConfig(max_new_tokens=1)) == [6]
    assert list(stream(model, [0], DecodeConfig(), stop_ids=())) == [6, 7, 3] + [3] * 97, "no stop ids"


def test_a_reply_is_never_empty():
    table = markov_chain_to_eos().table.clone()
    table[0, 3] = 9.0  # the model would end the turn at once
    model = MarkovModel(table)
    assert generate(model, [0], DecodeConfig(min_new_tokens=0)) == []
    assert generate(model, [0], DecodeConfig()) == [6, 7], "min_new_tokens=1 forbids <eos> as the first token"
    assert generate(model, [0], DecodeConfig(method="beam", beam_width=2)) == [6, 7]


# ---- beam search ------------------------------------------------------------------------------------
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
def test_beam_search_equals_brute_force_on_a_tiny_model(length_penalty):
    V, stop, L = 8, 3, 3
    model = tiny_model(vocab_size=V, block_size=16, sharpen=40.0)
    prompt = [0, 5, 2]
    others = [t for t in range(V) if t != stop]
    candidates = [list(s) + [stop] for n in range(L) for s in itertools.product(others, repeat=n)]
    candidates += [list(s) for s in itertools.product(others, repeat=L)]  # ended by the length limit
    scored = []
    for seq in candidates:
        lp = full_logprob(model, prompt, seq)
        scored.append((lp / len(seq) ** length_penalty, lp, seq))
    norm, lp, seq = max(scored, key=lambda s: s[0])
    # with 7**2 beams no prefix is ever pruned, so the search is exhaustive and must find the optimum
    ids, logprob = beam_search(
        model,
        prompt,
        beam_width=len(others) ** (L - 1),
        max_new_tokens=L,
        length_penalty=length_penalty,
        min_new_tokens=0,
        stop_ids=(stop,),
    )
    assert ids == [t for t in seq if t != stop], f"beam {ids} != brute force {seq} (score {norm:.4f})"
    assert_close(logprob, lp, "log-probability of the best sequence")


def test_beam_search_finds_what_greedy_misses():
    # from 0: token 1 (p=0.5) then a flat spread, or token 2 (p=0.4) then <eos> (3) almost surely
    table = torch.full((5, 5), -20.0, dtype=DT)
    table[0, :3] = torch.tensor([0.1, 0.5, 0.4]).log()
    table[1, :] = math.log(0.2)  # every continuation of 1 is unlikely
    table[2, 3] = 0.0
    model = MarkovModel(table)
    greedy = generate(model, [0], DecodeConfig(max_new_tokens=2, min_new_tokens=0), stop_ids=(3,))
    ids, logprob = beam_search(model, [0], beam_width=2, max_new_tokens=2, min_new_tokens=0, stop_ids=(3,))
    assert greedy[0] == 1
    assert ids == [2], f"beam search should prefer 2 <eos> (p=0.4) over 1 x (p=0.1); got {ids}"
    assert abs(logprob - math.log(0.4)) < 1e-6


def test_beam_search_slides_the_window_and_matches_recomputation():
    model = tiny_model(block_size=10, sharpen=20.0)
    kw = dict(beam_width=3, max_new_tokens=25, stop_ids=(), repetition_penalty=1.3)
    fast, fast_lp = beam_search(model, [1, 2, 3], **kw)
    slow, slow_lp = beam_search(model, [1, 2, 3], **kw, use_cache=False)
    assert len(fast) == 25 and fast == slow, f"cached beam {fast} != recomputed {slow}"
    assert_close(fast_lp, slow_lp, "beam log-probability, cached vs recomputed")


def test_beam_width_one_without_stops_is_greedy():
    model = tiny_model(sharpen=20.0)
    ids, _ = beam_search(model, [4, 2], beam_width=1, max_new_tokens=15, stop_ids=())
    assert ids == generate(model, [4, 2], DecodeConfig(max_new_tokens=15), stop_ids=())


# ---- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("method", "nucleus"),
        ("temperature", -1.0),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("beam_width", 0),
        ("max_new_tokens", 0),
    ],
)
def test_bad_decode_settings_name_the_key(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**{field: value}).check()


def test_empty_prompt_and_streaming_beam_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [], DecodeConfig())
    with pytest.raises(ValueError, match="cannot stream"):
        next(stream(model, [1], DecodeConfig(method="beam")))


def test_a_vanishing_temperature_samples_greedily_not_nan():
    """logits / 1e-40 would be +-inf and the draw NaN: below MIN_TEMPERATURE sampling is the argmax."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    for t in (0.0, 1e-40, MIN_TEMPERATURE / 2):
        got = next_token(
            logits, DecodeConfig(method="sample", temperature=t), generator=torch.Generator().manual_seed(0)
        )
        assert got.tolist() == [1], f"temperature {t}: {got.tolist()}"
    draws = {
        next_token(
            logits, DecodeConfig(method="sample", temperature=5.0), generator=torch.Generator().manual_seed(s)
        ).item()
        for s in range(40)
    }
    assert len(draws) > 1, "a real temperature still samples"


# ---- a group of samples (GRPO's rollouts) ---------------------------------------------------------------
def assert_logps_of_the_full_forward(model, prompt, ids, logps):
    """What a policy-gradient objective reads: each reply token's log-probability at temperature 1, no
    masking, as the training forward computes it over prompt + reply."""
    full = torch.tensor([prompt + ids])
    targets = torch.full_like(full, -100)
    targets[0, len(prompt) - 1 : -1] = full[0, len(prompt) :]
    model.forward(full[:, :-1], targets[:, :-1])
    want = model.token_logprobs()[0, len(prompt) - 1 :]
    assert_close(torch.tensor(logps, dtype=DT), want, "sampling-time log-probabilities")


def test_sample_group_logprobs_are_the_full_forwards_and_draws_repeat_with_the_generator():
    model = tiny_model(block_size=16)
    model.eval()
    prompt = [1, 7, 9, 3]
    n, max_new = 6, 8
    group = sample_group(
        model, prompt, n, max_new_tokens=max_new, temperature=1.3, generator=make_generator(5, "cpu")
    )
    again = sample_group(
        model, prompt, n, max_new_tokens=max_new, temperature=1.3, generator=make_generator(5, "cpu")
    )
    assert group == again, "the same generator drew other replies"
    assert len(group) == n and any(ended for *_, ended in group) and any(not e for *_, e in group)
    for ids, logps, ended in group:
        assert len(ids) == len(logps) >= 1 and len(ids) <= max_new
        assert ended == (ids[-1] in END_OF_TURN) and not any(t in END_OF_TURN for t in ids[:-1])
        assert_logps_of_the_full_forward(model, prompt, ids, logps)


@pytest.mark.parametrize("arch", [{}, {"pos": "rope", "n_kv_head": 2}], ids=["sinusoids", "rope-gqa"])
def test_sample_groups_decode_prompts_of_any_length_together_each_within_its_cut(arch):
    """GRPO's rollout of a micro-batch: P prompts of different lengths, n replies each, in one batch (each row at
    its own position). Every reply's log-probabilities are those of the full forward over prompt + reply,
    each reply keeps within its prompt's cut (one prompt fills the window to the last position), and the
    same generator draws the same replies."""
    model = tiny_model(block_size=12, **arch)
    model.eval()
    prompts, cuts, n = [[1, 7, 9, 3], [2, 5, 8, 11, 13, 4, 6, 9, 10], [1, 4]], [8, 4, 1], 5

    def sampled():
        g = make_generator(3, "cpu")
        return sample_groups(model, prompts, n, max_new_tokens=cuts, temperature=1.3, generator=g)

    groups = sampled()
    assert groups == sampled(), "the same generator drew other replies"
    assert [len(g) for g in groups] == [n] * len(prompts)
    assert len({tuple(ids) for ids, _, _ in groups[0]}) > 1, "one prompt's replies are not all the same draw"
    for prompt, cut, group in zip(prompts, cuts, groups):
        for ids, logps, ended in group:
            assert 1 <= len(ids) == len(logps) <= cut and len(prompt) + len(ids) <= 12 + 1
            assert ended == (ids[-1] in END_OF_TURN) and not any(t in END_OF_TURN for t in ids[:-1])
            assert ended or len(ids) == cut
            assert_logps_of_the_full_forward(model, prompt, ids, logps)
