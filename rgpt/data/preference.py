"""Preference pairs for DPO: JSONL records → token ids → batches of chosen and rejected replies.

A record (one JSON object a line, in .jsonl; or the objects of a .json array):
    {"prompt": "用户的问题", "chosen": "好的回答", "rejected": "差的回答", "kind": "wrong_fact"}
or, instead of "prompt", "conversations": [{"role": "user"|"assistant", "content": …}, …] — the dialogue
so far, ending with the user's turn. "kind" is optional metadata (what kind of failure the rejected reply
is) and is not used; any other key is an error naming the file and line.

A reply is tokenized exactly as instruction tuning learns it: the prompt is the chat template
``<bos> <user> q <assistant>`` (Tokenizer.encode_prompt), the reply its tokens and ``<eos>``, and only the
reply's tokens are targets. The held-out split is chosen by a hash of each pair's text (rgpt.data.dataset.in_val),
as for the other stages. The set is small (hundreds of pairs), so it is tokenized in memory on every run.
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from rgpt.data.batches import Batch, Batcher, collate
from rgpt.data.corpus import CorpusError, expand_paths, records
from rgpt.data.dataset import in_val
from rgpt.data.tokenizer import EOS_ID, TokenizerBase, normalise

KEYS = ("prompt", "conversations", "chosen", "rejected", "kind")


@dataclass
class Pair:
    turns: list[tuple[str, str]]  # the dialogue so far, ending with the user's turn
    chosen: str
    rejected: str


def _text(where: str, rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CorpusError(f'{where}: "{key}" must be a non-empty string')
    return normalise(value)


def _turns(where: str, rec: dict) -> list[tuple[str, str]]:
    if ("prompt" in rec) == ("conversations" in rec):
        raise CorpusError(f'{where}: a pair has either "prompt" or "conversations", exactly one')
    if "prompt" in rec:
        return [("user", _text(where, rec, "prompt"))]
    conv = rec["conversations"]
    if not isinstance(conv, list) or not conv:
        raise CorpusError(f'{where}: "conversations" must be a non-empty list of turns')
    turns = []
    for k, turn in enumerate(conv, 1):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise CorpusError(f"{where}: turn {k} is not an object with role 'user' or 'assistant'")
        if not isinstance(turn.get("content"), str) or not turn["content"].strip():
            raise CorpusError(f'{where}: turn {k} has no non-empty string "content"')
        turns.append((turn["role"], normalise(turn["content"])))
    if turns[-1][0] != "user":
        raise CorpusError(f"{where}: the conversation must end with the user's turn (the one to answer)")
    return turns


def parse_pair(where: str, rec) -> Pair:
    """The checked pair of one record; CorpusError naming `where` otherwise."""
    if not isinstance(rec, dict):
        raise CorpusError(f'{where}: expected a JSON object with "prompt", "chosen" and "rejected"')
    unknown = sorted(set(rec) - set(KEYS))
    if unknown:
        raise CorpusError(f"{where}: unknown key {unknown[0]!r} (a pair has: {', '.join(KEYS)})")
    pair = Pair(_turns(where, rec), _text(where, rec, "chosen"), _text(where, rec, "rejected"))
    if pair.chosen == pair.rejected:
        raise CorpusError(f"{where}: chosen and rejected are the same reply")
    return pair


def read_pairs(paths) -> list[Pair]:
    """Every pair of `paths` (files or directories of .jsonl / .json), in order."""
    pairs = [parse_pair(where, rec) for path in expand_paths(paths) for where, rec in records(path)]
    if not pairs:
        raise CorpusError(f"no preference pairs in {', '.join(map(str, paths))}")
    return pairs


class PairSet:
    """One split of tokenized pairs: the chosen and rejected (ids, target mask) of pair i."""

    def __init__(self, chosen: list, rejected: list):
        self.chosen, self.rejected = chosen, rejected  # [(ids (L,) int64, mask (L,) bool)]
        # for the batcher's length buckets: the longer reply of the pair
        self.lengths = np.array([max(len(c[0]), len(r[0])) for c, r in zip(chosen, rejected)], np.int64)

    def __len__(self) -> int:
        return len(self.chosen)

    def digest(self) -> str:
        """sha256 of every pair's ids and masks, in order: what the reference log-probabilities depend on."""
        h = hashlib.sha256()
        for ids, mask in self.chosen + self.rejected:
            h.update(ids.numpy().tobytes())
            h.update(mask.numpy().tobytes())
        return h.hexdigest()


def _sequence(prompt: list[int], reply: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(prompt + reply + [EOS_ID], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[len(prompt) :] = True  # the reply's tokens and its <eos>
    return ids, mask


def prepare_pairs(
    paths, tok: TokenizerBase, block_size: int, val_fraction: float, log=print
) -> tuple[PairSet, PairSet]:
    """(train, held-out) pair sets; pairs longer than the window (block_size + 1 tokens) are left out."""
    splits = {"train": ([], []), "val": ([], [])}
    too_long = 0
    for pair in read_pairs(paths):
        prompt = tok.encode_prompt(pair.turns)
        chosen, rejected = (
            _sequence(prompt, tok.encode(pair.chosen)),
            _sequence(prompt, tok.encode(pair.rejected)),
        )
        if max(len(chosen[0]), len(rejected[0])) > block_size + 1:
            too_long += 1
            continue
        key = json.dumps([pair.turns, pair.chosen, pair.rejected], ensure_ascii=False)
        split = splits["val" if in_val(key, val_fraction) else "train"]
        split[0].append(chosen)
        split[1].append(rejected)
    if too_long:
        log(f"notice: {too_long} preference pairs longer than the {block_size}-token window were left out")
    for name, (chosen, _) in splits.items():
        if not chosen:
            raise CorpusError(f"empty {name} split of the preference pairs in {', '.join(map(str, paths))}")
    train, val = (PairSet(*splits[s]) for s in ("train", "val"))
    log(f"preference pairs: {len(train)} for training, {len(val)} held out")
    return train, val


@dataclass
class PairBatch:
    idx: torch.Tensor  # (2B, T) the B chosen sequences, then the B rejected ones
    targets: torch.Tensor  # (2B, T) reply tokens; IGNORE on the prompt and padding
    index: torch.Tensor  # (B,) the pairs' positions in their PairSet (for the reference log-probabilities)
    n_pairs: int

    def to(self, device) -> "PairBatch":
        return PairBatch(self.idx.to(device), self.targets.to(device), self.index.to(device), self.n_pairs)


def collate_pairs(ps: PairSet, indices) -> PairBatch:
    b: Batch = collate([ps.chosen[i] for i in indices] + [ps.rejected[i] for i in indices])
    return PairBatch(b.idx, b.targets, torch.as_tensor(np.asarray(indices, np.int64)), len(indices))


class PairBatcher(Batcher):
    """Batches of pairs, bucketed by length and ordered by (seed, epoch) exactly as Batcher orders windows."""

    def epoch(self, epoch: int, start: int = 0):
        for indices in self.order(epoch)[start:]:
            yield collate_pairs(self.ds, indices)
