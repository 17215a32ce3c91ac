"""Many replies decoded together: continuous batching over one slab of KV caches.

The server's engine and eval's exact match drive a Batcher. Each step() does two things:

  prefill  up to `prefill_chunk` prompt tokens of the replies waiting to start, oldest first, each into a
           private KV cache (a long prompt takes several steps, so it never stalls the others for long;
           batch-invariant, a prompt is cut into chunks of prefill_chunk from its own start);
  decode   one token for every reply in the slab, in one forward (GPT.forward_rows): the weights are read
           once for all of them, which is where the speed comes from on a memory-bound machine.

The slab is model.new_kv_caches(slots): slot i holds reply i's keys and values, and the decoding replies
are always slots [0, n), so a step reads them as a view. A reply whose prefill is done joins at slot n (its
prompt's keys and values are copied in: nothing of the others moves); a reply that ends leaves, and the
last one moves into its slot (one reply's cache copied). Each reply is at its own position: rows are
masked at their own lengths (per-row RoPE angles or sinusoids), so no reply sees another's tokens.

A reply's tokens are picked exactly as rgpt.inference.generate.stream picks them (its own generator seeded
by cfg.seed, its own repetition memory, min_new_tokens, the same window that slides when full), so a
request gets the same text alone or among others. Its logits in company equal its lone logits up to the
rounding of a larger matrix product (within 1e-5 in fp32, tested), and bit for bit where every product is
batch-invariant: bf16 with packed weights (chat, eval and serve on CPU), and fp32 opened with
batch_invariant=true (GPT.pack_for_inference: every product reads packed weights, and attention spans the
whole slab, masked, so a row's products have the same shapes in any company).
"""

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rgpt.inference.generate import (
    END_OF_TURN,
    MIN_TEMPERATURE,
    DecodeConfig,
    draw,
    make_generator,
    next_token,
    softmax_wide,
    uniform,
)


@dataclass(eq=False)
class Row:
    """One reply being decoded. `key` is the caller's (the engine's request); the rest is the Batcher's."""

    prompt: Sequence[int]
    cfg: DecodeConfig
    key: object = None
    stop_ids: Sequence[int] = END_OF_TURN
    window: list[int] = field(default_factory=list)  # the tokens the model sees: prompt, then the reply
    todo: list[int] = field(default_factory=list)  # tokens of the window still to prefill
    caches: list | None = None  # the private KV caches of the prefill, until the reply joins the slab
    slot: int | None = None  # its slab slot while decoding
    length: int = 0  # tokens its caches hold
    token: int | None = None  # its newest token, fed at the next decode step
    generated: int = 0  # tokens of the reply so far
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V) tokens generated so far, for the repetition penalty

    def too_short(self) -> bool:
        """Whether its stop ids are still barred (fewer than min_new_tokens generated)."""
        return self.generated < self.cfg.min_new_tokens and len(self.stop_ids) > 0


@dataclass
class Event:
    """What a step did for one reply: a new token, and/or its end ("stop" or "length")."""

    row: Row
    token: int | None
    end: str | None = None  # "stop", "length", or "error" (then `error` says what failed)
    error: Exception | None = None


class Batcher:
    """Continuous batching of up to `slots` replies over one model (see the module docstring)."""

    def __init__(self, model, slots: int, prefill_chunk: int = 64, keep: int | None = None):
        if slots < 1 or prefill_chunk < 1:
            raise ValueError(f"slots={slots} and prefill_chunk={prefill_chunk} must be >= 1")
        self.model, self.slots, self.prefill_chunk = model, slots, prefill_chunk
        n = model.config.block_size
        self.keep = min(keep or max(1, 3 * n // 4), n)  # what stays when the window slides, as in Window
        self.caches = model.new_kv_caches(slots)  # the slab: (slots, Hkv, block_size, D) per layer
        self.rows: list[Row] = []  # slot i holds rows[i]
        self.queue: collections.deque[Row] = collections.deque()  # waiting for (the rest of) their prefill

    def __len__(self) -> int:
        return len(self.rows) + len(self.queue)

    def add(self, row: Row) -> Row:
        """Queue a reply: its prefill starts at a coming step. Raises ValueError for what stream() refuses."""
        if len(self) >= self.slots:
            raise ValueError(f"all {self.slots} slots are taken")
        if row.cfg.method == "beam":
            raise ValueError(
                "beam search picks its answer at the end and cannot be batched; call beam_search"
            )
        if len(row.prompt) == 0:
            raise ValueError("cannot generate from an empty prompt (it needs at least <bos>)")
        prompt = list(row.prompt)
        if len(prompt) > self.model.config.block_size:  # as Window: only the last `keep` tokens are seen
            prompt = prompt[-self.keep :]
        row.window, row.todo = list(prompt), list(prompt)
        row.generator = make_generator(row.cfg.seed, self.model.device)
        if row.cfg.repetition_penalty != 1.0:
            V = self.model.config.vocab_size
            row.seen = torch.zeros(1, V, dtype=torch.bool, device=self.model.device)
        self.queue.append(row)
        return row

    def drop(self, row: Row) -> None:
        """Stop decoding a reply now (its client left, or a stop string ended it)."""
        if row.slot is not None:
            self._leave(row)
        elif row in self.queue:
            self.queue.remove(row)
        row.caches = None

    @torch.no_grad()
    def step(self) -> list[Event]:
        """One prefill chunk and one decode step; the events of every reply that got a token or ended."""
        failed: list[Event] = []
        ready = self._prefill(failed)  # [(row, logits (1, V))]: the replies whose prompt is all in now
        picks = []
        if self.rows:
            idx = torch.tensor([r.token for r in self.rows], device=self.model.device)
            pos = torch.tensor([r.length for r in self.rows], device=self.model.device)
            # batch-invariant: attention spans the whole slab, so a row's products have one shape in any company
            span = self.caches[0].k.shape[2] if self.model.batch_invariant else None
            logits = self.model.forward_rows(idx, self.caches, pos, span)  # (n, V)
            for i, r in enumerate(self.rows):
                r.length += 1
                picks.append((r, logits[i : i + 1]))
        for row, logits in ready:
            self._join(row)
            picks.append((row, logits))
        shared = self._shared_work(picks)
        return failed + [self._guarded(self._pick, row, logits, shared.get(row)) for row, logits in picks]

    def _guarded(self, work, row: Row, *args):
        """work(row, *args), or the reply's error event: what fails for one reply ends that reply alone."""
        try:
            return work(row, *args)
        except Exception as e:
            self.drop(row)
            return Event(row, None, "error", e)

    # ---- the steps ----------------------------------------------------------------------------------
    def _prefill(self, failed: list) -> list:
        budget, ready = self.prefill_chunk, []
        whole = self.model.batch_invariant  # chunks cut from each prompt's own start, whatever the queue
        while budget and self.queue:
            row = self.queue[0]
            size = self.prefill_chunk if whole else budget
            if min(size, len(row.todo)) > budget:  # whole chunks only: this one waits for the next step
                break
            chunk, row.todo = row.todo[:size], row.todo[size:]
            budget -= len(chunk)
            logits = self._guarded(self._prefill_chunk, row, chunk)
            if isinstance(logits, Event):  # its prefill failed (and drop() took it off the queue)
                failed.append(logits)
            elif not row.todo:
                ready.append((self.queue.popleft(), logits))
        return ready

    def _prefill_chunk(self, row: Row, chunk: list[int]):
        """Logits (1, V) after a row's next prompt tokens, which its private caches now hold too."""
        if row.caches is None:
            row.caches, row.length = self.model.new_kv_caches(1), 0
        ids = torch.tensor([chunk], dtype=torch.long, device=self.model.device)  # (1, T)
        logits = self.model.forward_cached(ids, row.caches, last_only=True)[:, -1]  # (1, V)
        row.length += len(chunk)
        return logits

    def _join(self, row: Row) -> None:
        """A prefilled reply takes slot n: its keys and values move from its own caches into the slab."""
        row.slot, L = len(self.rows), row.length
        for mine, slab in zip(row.caches, self.caches):
            slab.copy_in(row.slot, mine, 0, L)
        row.caches = None
        self.rows.append(row)

    def _leave(self, row: Row) -> None:
        """Free a reply's slot: the last reply moves into it, so slots [0, n) stay the decoding ones."""
        last = self.rows.pop()
        if last is not row:
            i, L = row.slot, last.length
            for slab in self.caches:
                slab.copy_in(i, slab, last.slot, L)
            self.rows[i], last.slot = last, i
        row.slot = None

    @staticmethod
    def _shared_work(picks: list) -> dict:
        """{row: its next token} for the rows that pick plainly (no penalty, no top-k or top-p), picked for
        all of them at once: one argmax for the greedy rows, and for the sampled ones one softmax and one
        float64 CDF per temperature and one CDF inversion, each row with a uniform from its own generator.
        A row still short of min_new_tokens has its stop ids masked in its own row first. Row by row, 32
        picks cost more than model=small's whole decode step. The same numbers next_token computes for each
        row alone: each op treats the rows alike, and the logits are divided by the same Python float."""
        greedy, sampled = [], {}
        for i, (row, _) in enumerate(picks):
            c = row.cfg
            if c.repetition_penalty != 1.0:
                continue
            if c.method == "greedy" or c.temperature < MIN_TEMPERATURE:
                greedy.append(i)
            elif c.top_k == 0 and c.top_p >= 1.0:
                sampled.setdefault(c.temperature, []).append(i)
        if not greedy and not sampled:
            return {}
        logits = torch.cat([lg for _, lg in picks])  # (n, V), a copy: the stop ids can be masked in place
        for i, (row, _) in enumerate(picks):
            if row.too_short():
                logits[i, list(row.stop_ids)] = float("-inf")
        out = {}
        if greedy:
            ids = logits[greedy].argmax(dim=-1).tolist()
            out |= {picks[i][0]: ids[j] for j, i in enumerate(greedy)}
        for temperature, rows in sampled.items():
            probs = softmax_wide(logits[rows] / temperature)  # (k, V)
            cdf = probs.to(torch.float64).cumsum(-1)
            u = torch.cat([uniform(picks[i][0].generator, logits.device) for i in rows])  # (k, 1)
            ids = draw(probs, cdf=cdf, u=u).tolist()
            out |= {picks[i][0]: ids[j] for j, i in enumerate(rows)}
        return out

    def _pick(self, row: Row, logits, shared=None) -> Event:
        """The reply's next token, as stream() picks it; it ends at a stop id or after max_new_tokens.
        shared: the token _shared_work picked for this row, if it did."""
        cfg = row.cfg
        if shared is not None:
            token = shared
        else:
            if row.too_short():
                stops = torch.tensor(list(row.stop_ids), dtype=torch.long, device=logits.device)
                logits = logits.index_fill(-1, stops, float("-inf"))
            token = int(next_token(logits, cfg, row.seen, row.generator))
        if token in row.stop_ids:
            self.drop(row)
            return Event(row, None, "stop")
        row.generated += 1
        if row.generated >= cfg.max_new_tokens:
            self.drop(row)
            return Event(row, token, "length")
        if row.seen is not None:
            row.seen[0, token] = True
        row.token = token
        row.window.append(token)
        if len(row.window) > self.model.config.block_size:  # full: slide, as Window does, and prefill again
            self.drop(row)
            row.window = row.todo = row.window[-self.keep :]
            self.queue.appendleft(row)  # first in line: it was decoding already
        return Event(row, token)


def generate_many(
    model, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, slots: int = 32, prefill_chunk: int = 256
) -> list[list[int]]:
    """The reply (token ids, stop id excluded) to each prompt, decoded `slots` at a time: what
    rgpt.inference.generate.generate gives one by one (greedy or sampled), in the order of the prompts."""
    batcher = Batcher(model, slots, prefill_chunk)
    out: list[list[int]] = [[] for _ in prompts]
    todo = collections.deque(enumerate(prompts))
    while todo or len(batcher):
        while todo and len(batcher) < slots:
            i, prompt = todo.popleft()
            batcher.add(Row(prompt, cfg, key=i))
        for e in batcher.step():
            if e.token is not None:
                out[e.row.key].append(e.token)
    return out
