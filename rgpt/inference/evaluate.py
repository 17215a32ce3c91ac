"""Evaluation: a checkpoint measured on a corpus in one streaming pass (python -m rgpt.eval):
- task=lm: every passage (a line of a .txt, a {"text"} record, ...) is scored as in pretraining,
  <bos> passage <eos>: each token of the passage and the closing <eos> is predicted from what precedes it.
- task=sft: dialogues are scored as in instruction tuning (the assistant's tokens and their <eos>), and
  each assistant turn is also decoded from the turns before it (greedy by default: every decoding key
  applies, as in chat) and compared with the reference: exact match and character F1.
Reported: tokens scored, characters, mean loss (nats per token), perplexity, bits per character (total
NLL in bits / characters of the scored text, comparable across tokenizers) and the <unk> rate. A passage
longer than the window is scored with a sliding window: each token once, with at least half a window
of context. The last line printed is one JSON object with these numbers.
"""

import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from rgpt.data import CorpusError, expand_paths, read_dialogues, read_pretrain
from rgpt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, normalise
from rgpt.inference.batch import generate_many
from rgpt.inference.generate import DecodeConfig, generate
from rgpt.inference.load import ModelChoice
from rgpt.nn.loss import IGNORE_INDEX as IGNORE
from rgpt.runtime.device import RuntimeSettings
from rgpt.settings import FLAT, ConfigError, check

TASKS = ("lm", "sft", "verify")


@dataclass
class EvalData:
    # a corpus file or directory (.txt one passage or dialogue a line, .jsonl, .json); rgpt/conf/eval.yaml
    # sets the built-in pretraining text
    path: str | None = None


@dataclass
class EvalConfig:
    """python -m rgpt.eval's settings: what to score, how, and with which model."""

    model: ModelChoice = field(default_factory=ModelChoice, metadata=FLAT)  # checkpoint=, out_dir=
    data: EvalData = field(default_factory=EvalData)
    # lm: loss, perplexity, bits/char, <unk> rate; sft: also greedy replies scored by exact match and char F1;
    # verify: accuracy and reward of greedy replies to the held-out verifiable tasks (rgpt.data.tasks; no data.path)
    task: str = "lm"
    # task=verify: the first N held-out problems of each task (the ones stage=grpo validates on with
    # grpo.val_problems=N); None: all of them (~1,500 arithmetic, ~50 idioms)
    max_problems: int | None = None
    # windows per forward pass; 16 x 256 tokens x 10k vocab of logits is ~160 MB in float32
    batch_size: int = 16
    # task=sft and task=verify: replies decoded together (continuous batching, rgpt.inference.batch: the same
    # replies as one at a time); 1: one by one
    reply_batch: int = 32
    # how task=sft makes its replies
    decode: DecodeConfig = field(default_factory=DecodeConfig, metadata=FLAT)
    # device, threads, allocator
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings, metadata=FLAT)

    @property
    def data_path(self) -> str:
        return self.data.path

    def validate(self) -> "EvalConfig":
        path = self.data.path
        if path is None or not str(path).strip():
            raise ConfigError(
                "data.path is required: the file (or directory) to evaluate on, e.g. data.path=val.txt"
            )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be a positive integer")
        check(self.reply_batch >= 1, "reply_batch", self.reply_batch, "must be a positive integer")
        check(self.task in TASKS, "task", self.task, f"must be one of {', '.join(TASKS)}")
        check(
            self.max_problems is None or self.max_problems >= 1,
            "max_problems",
            self.max_problems,
            "must be >= 1 or null",
        )
        try:
            self.decode.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.runtime.validate()
        return self


# ---- scoring -----------------------------------------------------------------------------------------
def windows(ids: list[int], scored: list[bool], block_size: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) pieces of a sequence, each at most block_size long, together scoring every
    position i >= 1 with scored[i] exactly once (targets: the id, or -100 where nothing is scored).

    The first piece covers the start; each later one moves on by half a window, scoring only its last
    half, so every later token is predicted from at least block_size / 2 tokens of context.
    """
    n, stride = len(ids), max(1, block_size // 2)
    pos = 1  # first target position not yet scored
    while pos < n:
        end = min(pos + (block_size if pos == 1 else stride), n)  # targets [pos, end) are scored here
        start = max(0, end - 1 - block_size)  # inputs ids[start:end - 1]
        # the target at position i is predicted from the inputs up to i - 1
        targets = [ids[i] if i >= pos and scored[i] else IGNORE for i in range(start + 1, end)]
        yield ids[start : end - 1], targets
        pos = end


BUCKET = 32  # batches of windows gathered, sorted by length, then cut into batches: little padding


class Scorer:
    """Sums the NLL of the scored tokens over many sequences, batch_size windows per forward pass.

    Windows are bucketed by length (BUCKET batches at a time), and each batch goes through the model's
    fused loss, which projects only the positions with a target onto the vocabulary: no (B, T, V) logits
    for padding or for the context half of a sliding window.
    """

    def __init__(self, model, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.pending: list[tuple[list[int], list[int]]] = []
        self.nll = 0.0  # nats, summed in float64
        self.tokens = self.unk = 0

    def add(self, ids: list[int], scored: list[bool]) -> None:
        for piece in windows(ids, scored, self.model.config.block_size):
            if any(t != IGNORE for t in piece[1]):  # a window with nothing to score costs nothing
                self.pending.append(piece)
        if len(self.pending) >= self.batch_size * BUCKET:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = sorted(self.pending, key=lambda p: len(p[0])), []
        for i in range(0, len(pending), self.batch_size):
            self._score(pending[i : i + self.batch_size])

    def _score(self, pieces) -> None:
        T = max(len(x) for x, _ in pieces)
        idx = torch.full((len(pieces), T), PAD_ID, dtype=torch.long)
        tgt = torch.full((len(pieces), T), IGNORE, dtype=torch.long)
        for row, (x, y) in enumerate(pieces):  # right padding: causal attention never looks at it
            idx[row, : len(x)], tgt[row, : len(y)] = torch.tensor(x), torch.tensor(y)
        valid = tgt != IGNORE
        n = int(valid.sum())
        loss = self.model.forward(idx.to(self.model.device), tgt.to(self.model.device))  # mean over n
        self.nll += float(loss.double()) * n
        self.tokens += n
        self.unk += int(((tgt == UNK_ID) & valid).sum())


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the characters (as multisets, whitespace ignored) of a reply against the reference."""
    pred, ref = Counter(prediction.replace(" ", "")), Counter(reference.replace(" ", ""))
    common = sum((pred & ref).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    p, r = common / sum(pred.values()), common / sum(ref.values())
    return 2 * p * r / (p + r)


def _line_count(paths) -> int | None:
    """Non-blank lines of the files (the passage count of .txt / .jsonl), for the progress bar; None for
    .json arrays, whose item count is only known after parsing."""
    try:
        files = expand_paths(paths)
    except CorpusError:
        return None  # the reader reports it properly
    if any(f.suffix == ".json" for f in files):
        return None
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += sum(1 for line in fh if line.strip())
    return n


class Replies:
    """The model's replies to the dialogues' questions, scored against the taught answers (exact match and
    char F1): decoded `slots` at a time by a Batcher once enough questions wait (beam search: one by one)."""

    def __init__(self, model, tok, decode: DecodeConfig, slots: int):
        self.model, self.tok, self.decode, self.slots = model, tok, decode, slots
        self.pending: list[tuple[list[int], str]] = []  # (prompt ids, the taught answer)
        self.exact, self.f1, self.n = 0, 0.0, 0

    def add(self, prompt: list[int], answer: str) -> None:
        self.pending.append((prompt, answer))
        if len(self.pending) >= 4 * self.slots:  # enough to keep the slots full; memory stays flat
            self.flush()

    def flush(self) -> None:
        prompts = [p for p, _ in self.pending]
        if self.decode.method == "beam" or self.slots == 1:
            outs = [generate(self.model, p, self.decode) for p in prompts]
        else:
            outs = generate_many(self.model, prompts, self.decode, self.slots)
        for ids, (_, answer) in zip(outs, self.pending):
            reply, answer = normalise(self.tok.decode(ids)), normalise(answer)
            self.exact += reply == answer
            self.f1 += char_f1(reply, answer)
            self.n += 1
        self.pending = []


def evaluate(model, tok, cfg: EvalConfig, progress: bool = True) -> dict:
    """The metrics of `model` on cfg.data_path (see the module docstring); a dict ready for JSON."""
    from tqdm import tqdm

    scorer, chars, passages = Scorer(model, cfg.batch_size), 0, 0
    replies = Replies(model, tok, cfg.decode, cfg.reply_batch)
    items = read_pretrain(cfg.data_path) if cfg.task == "lm" else read_dialogues(cfg.data_path)
    bar = tqdm(
        items,
        total=_line_count(cfg.data_path),
        unit=" passages" if cfg.task == "lm" else " dialogues",
        disable=None if progress else True,  # None: shown on a terminal, silent in pipes and logs
        file=sys.stderr,
    )
    for item in bar:
        passages += 1
        if cfg.task == "lm":
            text = normalise(item)
            ids = [BOS_ID, *tok.encode(text), EOS_ID]
            scorer.add(ids, [False] + [True] * (len(ids) - 1))
            chars += len(text)
            continue
        ids, mask = tok.encode_dialogue(item)
        scorer.add(ids, mask)
        for k, (role, content) in enumerate(item):
            if role != "assistant":
                continue
            chars += len(normalise(content))
            if k == 0 or item[k - 1][0] != "user":
                continue  # no question to answer
            replies.add(tok.encode_prompt(item[:k]), content)
    scorer.flush()
    replies.flush()
    exact, f1, prompts = replies.exact, replies.f1, replies.n
    bar.close()
    if scorer.tokens == 0:
        raise CorpusError(f"{cfg.data_path}: nothing to score (no passages with text)")
    loss = scorer.nll / scorer.tokens
    result = {
        "tokens": scorer.tokens,
        "chars": chars,
        "loss": loss,
        "ppl": math.exp(loss) if loss < 700 else None,  # None rather than the non-JSON Infinity
        "bpc": scorer.nll / math.log(2) / chars if chars else None,
        "unk_rate": scorer.unk / scorer.tokens,
    }
    if cfg.task == "sft":
        result["exact_match"] = exact / prompts if prompts else None
        result["char_f1"] = f1 / prompts if prompts else None
    result["_passages"], result["_prompts"] = passages, prompts
    return result
