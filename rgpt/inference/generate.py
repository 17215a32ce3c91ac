"""Decoding from a GPT: greedy, sampling (temperature, top-k, top-p), beam search and a repetition penalty.

Everything here works on token ids; the chat template and the text live in rgpt.inference.conversation. The prompt is
prefilled through the KV caches in one pass, then each step feeds one token (B tokens for B beams).
When the window is full the oldest tokens slide out (see Window), so generation never stops for lack
of room. Logits rows are (B, V) throughout; nothing loops over the vocabulary in Python.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rgpt.data.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, USER_ID

# An assistant reply ends at <eos>; a model that starts another turn (<user>, <assistant>, <bos>) or pads
# has ended it too, and none of these may appear inside a reply.
END_OF_TURN = (EOS_ID, USER_ID, ASSISTANT_ID, BOS_ID, PAD_ID)
METHODS = ("greedy", "sample", "beam")
# below it sampling decodes greedily: the limit of sampling as T -> 0, and logits / T stay finite (a
# temperature of 1e-40 would turn every logit into +-inf and the draw into NaN)
MIN_TEMPERATURE = 1e-4


@dataclass
class DecodeConfig:
    """How to pick tokens. top_k=0 and top_p=1.0 switch those filters off; they apply to method=sample."""

    # greedy | sample | beam; greedy gives the trained answer, deterministic and repeatable
    method: str = "greedy"
    # sample: logits are divided by it; < 1 is more conservative (0.7 reads well), 1.0 is the model's own
    # distribution; below MIN_TEMPERATURE (0 included) it decodes greedily
    temperature: float = 1.0
    top_k: int = 0  # sample: keep the k most likely tokens (0 = all)
    # sample: keep the smallest most-likely set with mass >= top_p (0.9 is common; 1.0 = all)
    top_p: float = 1.0
    # > 1 discourages tokens already generated in this reply (CTRL rule; 1.1-1.3 breaks loops); 1.0 is off,
    # so trained answers stay exact
    repetition_penalty: float = 1.0
    beam_width: int = 4  # beam: hypotheses kept; 4 finds most of beam search's gain at 4x the work of greedy
    # beam: a finished hypothesis scores logprob / length**length_penalty; 1.0 is the per-token average, 0
    # favours short replies
    length_penalty: float = 1.0
    # longest reply in tokens (about 150 characters); the reference's cap of 20 cut answers off
    max_new_tokens: int = 100
    min_new_tokens: int = 1  # the end of the turn is not allowed before this many tokens: no empty reply
    # sample: seeds a private generator, so a run is reproducible; None draws fresh ones
    seed: int | None = None

    def check(self) -> "DecodeConfig":
        """Raise ValueError naming the first bad field; return self."""
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        rules = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1.0 = off)"),
            ("beam_width", self.beam_width >= 1, "must be >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("min_new_tokens", self.min_new_tokens >= 0, "must be >= 0"),
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**64, "must fit in 64 bits"),
        ]
        for key, ok, why in rules:
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)} {why}")
        return self


def softmax_wide(logits):  # in float32 at least, whatever the model's dtype
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


# ---- logits processing: each takes and returns (B, V) logits ----------------------------------------
def penalise_repeats(logits, seen, penalty: float):
    """CTRL's repetition penalty: where seen (B, V) is True, positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row (ties with the k-th are kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p: float):
    """Nucleus: keep the smallest set of most-probable tokens whose probability mass is >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) most likely first
    probs = softmax_wide(sorted_logits)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens; 0 for the first
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits, cfg: DecodeConfig, seen=None, generator=None):
    """(B, V) logits -> (B,) ids: repetition penalty, then argmax, or temperature, top-k, top-p and a draw."""
    logits = penalise_repeats(logits, seen, cfg.repetition_penalty)
    if cfg.method == "greedy" or cfg.temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return draw(softmax_wide(logits), generator)


def uniform(generator, device):
    """(1, 1) float64 uniform in [0, 1): the one number a row's draw takes from its generator."""
    return torch.rand(1, 1, dtype=torch.float64, device=device, generator=generator)


def draw(probs, generator=None, cdf=None, u=None):
    """(B, V) probabilities -> (B,) ids, one draw from each row: the first id whose cumulative probability
    exceeds u x the row's total, for one uniform u per row (inverting the CDF, in float64). The same
    distribution as torch.multinomial, which draws V exponential numbers per row instead of one (500 us
    a token with an 8k vocabulary on CPU, more than model=small's whole decode step). `cdf`: the probabilities'
    float64 cumulative sums, and `u` (B, 1): each row's uniform, when the caller computed them
    (rgpt.inference.batch, for many rows at once, each with its own generator)."""
    cdf = probs.to(torch.float64).cumsum(-1) if cdf is None else cdf  # (B, V)
    if u is None:
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)  # (B, 1)
    drawn = probs.gather(-1, ids) > 0
    if bool(drawn.all()):  # (the argmax below reads every row whole: only when it is needed)
        return ids.squeeze(-1)
    # a zero-probability id can only come from rounding at the very top of the CDF: take the likeliest
    return torch.where(drawn, ids, probs.argmax(-1, keepdim=True)).squeeze(-1)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A private generator seeded with `seed` (None: use torch's global RNG)."""
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


# ---- the window the model sees ----------------------------------------------------------------------
class Window:
    """The tokens the model currently sees (B rows of equal length) and their per-layer KV caches.

    extend(ids) appends ids and returns the logits after the last one. When the tokens would no longer
    fit block_size, only the last `keep` of them stay (default 3/4 of the window): fresh caches are
    prefilled from those, so positions start again at 0 and there is room for the next block_size/4
    steps. With use_cache=False every step recomputes the whole window instead (same tokens, same
    positions, so the same logits: the reference the cache is tested and timed against).
    """

    def __init__(self, model, batch: int = 1, keep: int | None = None, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        n = model.config.block_size
        self.keep = min(keep or max(1, 3 * n // 4), n)
        self.tokens = torch.empty(batch, 0, dtype=torch.long, device=model.device)  # (B, T)
        self.caches = None
        self.slides = 0  # how many times the oldest tokens slid out

    def extend(self, ids):
        """ids (B, T_new) long -> logits (B, V) that predict the token after them."""
        full = torch.cat((self.tokens, ids), dim=1)
        new = ids
        if full.shape[1] > self.model.config.block_size:
            full = full[:, -self.keep :]
            self.caches, self.slides = None, self.slides + 1
        if not self.use_cache:
            logits = self.model.forward(full)[:, -1]
        else:
            if self.caches is None:
                self.caches, new = self.model.new_kv_caches(full.shape[0]), full
            logits = self.model.forward_cached(new, self.caches, last_only=True)[:, -1]
        self.tokens = full
        return logits

    def reorder(self, index):
        """Keep rows `index` (beam search follows its surviving hypotheses)."""
        self.tokens = self.tokens.index_select(0, index)
        for cache in self.caches or ():
            cache.reorder(index)


def _prompt_tensor(model, prompt) -> torch.Tensor:
    ids = torch.as_tensor(prompt, dtype=torch.long, device=model.device).view(1, -1)  # (1, T)
    if ids.shape[1] == 0:
        raise ValueError("cannot generate from an empty prompt (it needs at least <bos>)")
    return ids


# ---- greedy and sampling ----------------------------------------------------------------------------
@torch.no_grad()
def stream(
    model,
    prompt: Sequence[int],
    cfg: DecodeConfig,
    *,
    stop_ids: Sequence[int] = END_OF_TURN,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (greedy or sampled) until a stop id or max_new_tokens.

    The stop id itself is not yielded. Without a `generator`, cfg.seed (if set) seeds a fresh one.
    """
    if cfg.method == "beam":
        raise ValueError("beam search picks its answer at the end and cannot stream; call beam_search")
    if generator is None:
        generator = make_generator(cfg.seed, model.device)
    window = Window(model, 1, use_cache=use_cache)
    logits = window.extend(_prompt_tensor(model, prompt))  # prefill: the whole prompt in one pass
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=model.device)
    stop_set = set(stop_ids)
    seen = torch.zeros_like(logits, dtype=torch.bool) if cfg.repetition_penalty != 1.0 else None
    for step in range(cfg.max_new_tokens):
        if step < cfg.min_new_tokens and len(stops):
            logits = logits.index_fill(-1, stops, float("-inf"))
        token = next_token(logits, cfg, seen, generator)  # (1,)
        tid = int(token)
        if tid in stop_set:
            return
        yield tid
        if seen is not None:
            seen[0, tid] = True
        if step + 1 < cfg.max_new_tokens:
            logits = window.extend(token.view(1, 1))


# ---- beam search ------------------------------------------------------------------------------------
@torch.no_grad()
def beam_search(
    model,
    prompt: Sequence[int],
    *,
    beam_width: int = 4,
    max_new_tokens: int = 100,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 1,
    stop_ids: Sequence[int] = END_OF_TURN,
    use_cache: bool = True,
) -> tuple[list[int], float]:
    """The best continuation found by a beam of `beam_width` hypotheses, and its total log-probability.

    A hypothesis ends at a stop id (which counts in its length and log-probability but is not returned)
    or after max_new_tokens tokens, and is ranked by logprob / length**length_penalty. The beams advance
    as one batch of W rows. The search stops early once no running beam can beat the best ended one.
    """
    W, lp = beam_width, length_penalty
    window = Window(model, 1, use_cache=use_cache)
    logits = window.extend(_prompt_tensor(model, prompt))  # (1, V): prefill once ...
    V = logits.shape[-1]
    rows = torch.zeros(W, dtype=torch.long, device=model.device)
    window.reorder(rows)  # ... then copy into W identical rows
    logits = logits.expand(W, V)
    scores = torch.full((W,), float("-inf"), dtype=torch.float64, device=model.device)
    scores[0] = 0.0  # the copies start at -inf so the first step does not pick one token W times
    seqs = torch.empty(W, 0, dtype=torch.long, device=model.device)  # (W, t) tokens generated so far
    seen = torch.zeros(W, V, dtype=torch.bool, device=model.device) if repetition_penalty != 1.0 else None
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=model.device)
    best_norm, best_ids, best_logprob = float("-inf"), [], float("-inf")

    def consider(total, row, extra, length):
        nonlocal best_norm, best_ids, best_logprob
        total = float(total)
        norm = total / length**lp
        if norm > best_norm:
            best_norm, best_logprob = norm, total
            best_ids = seqs[row].tolist() + extra

    for t in range(max_new_tokens):  # each running beam holds t tokens; candidates have t + 1
        logits = penalise_repeats(logits, seen, repetition_penalty).to(torch.float64)
        cand = scores[:, None] + torch.log_softmax(logits, dim=-1)  # (W, V) logprob of each extension
        if len(stops):
            if t >= min_new_tokens:  # a hypothesis that ends here: the best of them may be the answer
                ended = cand[:, stops]  # (W, S)
                total, flat = ended.reshape(-1).max(0)
                consider(total, int(flat) // len(stops), [], t + 1)
            cand[:, stops] = float("-inf")  # the beams go on with non-stop tokens only
        if t == max_new_tokens - 1:  # out of length: the best running extension ends here too
            total, flat = cand.reshape(-1).max(0)
            consider(total, int(flat) // V, [int(flat) % V], t + 1)
            break
        scores, flat = cand.reshape(-1).topk(W)  # (W,)
        rows, cols = flat // V, flat % V
        seqs = torch.cat((seqs[rows], cols[:, None]), dim=1)  # (W, t + 1)
        if seen is not None:
            seen = seen[rows]
            seen[torch.arange(W, device=seen.device), cols] = True
        # a running beam's logprob only falls, so its best possible score is s / L**lp at the most
        # favourable future length L: the longest if lp > 0, the next one if lp <= 0
        best_len = max_new_tokens if lp > 0 else t + 2
        if best_norm >= float(scores.max()) / best_len**lp:
            break
        window.reorder(rows)
        logits = window.extend(cols[:, None])
    return best_ids, best_logprob


def generate(
    model,
    prompt: Sequence[int],
    cfg: DecodeConfig,
    *,
    stop_ids: Sequence[int] = END_OF_TURN,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after `prompt` by cfg.method (the stop id excluded)."""
    if cfg.method == "beam":
        return beam_search(
            model,
            prompt,
            beam_width=cfg.beam_width,
            max_new_tokens=cfg.max_new_tokens,
            length_penalty=cfg.length_penalty,
            repetition_penalty=cfg.repetition_penalty,
            min_new_tokens=cfg.min_new_tokens,
            stop_ids=stop_ids,
            use_cache=use_cache,
        )[0]
    return list(stream(model, prompt, cfg, stop_ids=stop_ids, generator=generator, use_cache=use_cache))


# ---- groups of samples (GRPO's rollouts) ------------------------------------------------------------------
Sample = tuple[list[int], list[float], bool]  # a reply's token ids, their log-probabilities, whether it ended


@torch.no_grad()
def sample_groups(
    model,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    max_new_tokens: Sequence[int],
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = END_OF_TURN,
) -> list[list[Sample]]:
    """n replies to each prompt, all P × n sampled together: one forward a token for every row
    (GPT.forward_rows, each row at its own position), after each prompt was prefilled once and its keys and
    values copied into its n rows. For each reply: its token ids (with the stop id that ended it, the reply's
    last target), the log-probability of each under the model's own distribution (temperature 1, no masking:
    what a policy-gradient objective differentiates, whatever drew them), and whether it ended at a stop id
    (False: cut at the prompt's max_new_tokens). The caller keeps each prompt + its max_new_tokens within the
    window, so nothing slides out. Rows that are done go on decoding (in place, within their cut) until all
    are; what they draw is dropped.
    """
    P, B, cuts = len(prompts), len(prompts) * n, list(max_new_tokens)
    cfg = DecodeConfig(method="sample", temperature=temperature, max_new_tokens=max(cuts)).check()
    dev = model.device
    caches, first = model.new_kv_caches(B), []
    for p, prompt in enumerate(prompts):  # prefill each prompt once, then copy it into its n rows
        mine = model.new_kv_caches(1)
        first.append(model.forward_cached(_prompt_tensor(model, prompt), mine, last_only=True)[:, -1])
        for slab, c in zip(caches, mine):
            slab.copy_in(slice(p * n, (p + 1) * n), c, 0, len(prompt))
    logits = torch.cat(first).repeat_interleave(n, dim=0)  # (B, V)
    start = torch.tensor([len(q) for q in prompts], device=dev).repeat_interleave(n)  # (B,) next positions
    limit = torch.tensor(cuts, device=dev).repeat_interleave(n)  # (B,) tokens a row may draw
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    tokens, logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    ended_at = limit.clone()
    for step in range(cfg.max_new_tokens):
        allowed = logits.index_fill(-1, stops, float("-inf")) if step < cfg.min_new_tokens else logits
        token = next_token(allowed, cfg, None, generator)  # (B,)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        tokens.append(token)
        logps.append(logp.gather(1, token[:, None]).squeeze(1))
        stop = torch.isin(token, stops) & ~done
        ended_at = torch.where(stop, torch.full_like(ended_at, step), ended_at)
        done |= stop | (step + 1 >= limit)
        if bool(done.all()):
            break
        pos = torch.minimum(start + step, start + limit - 2)  # a row that is done rewrites an old position
        logits = model.forward_rows(token, caches, pos)
    tok, lp = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()  # (B, steps)
    out = []
    for i, end in enumerate(ended_at.tolist()):
        cut = cuts[i // n]
        k = min(end + 1, cut)  # an ended reply keeps its stop token: learning to end is part of it
        out.append((tok[i][:k], lp[i][:k], end < cut))
    return [out[p * n : (p + 1) * n] for p in range(P)]


def sample_group(model, prompt: Sequence[int], n: int, *, max_new_tokens: int, **kw) -> list[Sample]:
    """n replies to one prompt: sample_groups of that prompt alone."""
    return sample_groups(model, [prompt], n, max_new_tokens=[max_new_tokens], **kw)[0]
