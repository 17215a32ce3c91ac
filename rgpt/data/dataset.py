"""Tokenized, cached token sets: corpus files → fixed-length windows of ids on disk, memory-mapped.

Every pretraining document becomes ``<bos> text <eos>``, every dialogue its chat template. A sequence
of more than block_size+1 tokens is cut into consecutive windows of block_size+1 tokens overlapping
by one token, so each token after the first is a target exactly once and <bos>/<eos> mark only real
document boundaries.

With ``pack`` (pretraining only) the documents of a split run on as one stream ``<bos> d1 <eos> <bos> d2
<eos> …``, cut the same way: every window but the split's last has exactly block_size+1 tokens, so
batches need no padding. Attention then crosses document boundaries inside a window, as in GPT-2's
training; the <eos> <bos> between two documents tells the model a new text starts. The train/val split
is still decided per document, before packing.

A split is stored as three flat arrays: ``ids`` (int32), ``mask`` (uint8, 1 where the token is a learned
target) and ``offsets`` (int64, window i is ``ids[offsets[i]:offsets[i+1]]``).

The cache lives in ``<cache_dir>/<key>/``, keyed by the sha256 of the files' contents (in order), the
tokenizer's fingerprint and every setting that changes the arrays; a second run with the same key
loads it without reading the corpus again.
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rgpt.data.corpus import (
    CorpusError,
    corpus_texts,
    expand_paths,
    file_digest,
    read_dialogues,
    read_pretrain,
)
from rgpt.data.encode import auto_workers, count, encode, processes
from rgpt.data.npyfile import NpyWriter
from rgpt.data.tokenizer import UNK_ID, Tokenizer, TokenizerBase, normalise, shipped_idioms
from rgpt.settings import INTERNAL, check

# Bump when the layout or the meaning of the cached arrays changes: old caches then miss.
DATA_FORMAT = "rgpt-data/1"
REPLAY_FORMAT = "replay-split/2"  # replayed documents in a split of their own (1: merged into train)
KINDS = ("pretrain", "sft", "pairs", "tasks")  # pairs: DPO's preference pairs (rgpt.data.preference);
# tasks: names of the verifiable tasks whose problems are generated (rgpt.data.tasks), for stage=grpo


@dataclass
class DataConfig:
    """A stage's data settings: the one definition (rgpt/conf's `data:` keys override it; the stage
    sets `kind` from the stage)."""

    files: list[str] = field(default_factory=list)  # corpus files and/or directories of one training stage
    # "pretrain" (documents), "sft" (dialogues), "pairs" (dpo) or "tasks" (grpo): set by the stage, never in a config
    kind: str = field(default="pretrain", metadata=INTERNAL)
    val_fraction: float = 0.05  # share of documents, picked by a hash of their text, held out
    val_files: list[str] = field(default_factory=list)  # if given, the validation set instead
    assistant_only_loss: bool = True  # sft: learn assistant tokens only; user turns are context
    pack: bool = False  # pretrain: a split's documents as one stream cut into full windows (see above)
    replay_files: list[str] = field(default_factory=list)  # sft: documents learned beside the dialogues
    replay_fraction: float = 0.0  # sft: share of replay_files' documents in the replay pool (see _replay)
    replay_ratio: float = 1.0  # sft: replay tokens per dialogue token in each epoch (rgpt.data.batches)
    cache_dir: str = "outputs/.cache"  # where tokenized token sets are kept, one directory per key
    workers: int | None = None  # jieba processes; None: every core from 4 MB on (rgpt.data.encode)

    def validate(self) -> "DataConfig":
        """Raise ValueError('data.<key>=<value>: why') for the first bad setting; return self."""
        rules = [
            ("kind", self.kind in KINDS, f"must be one of {', '.join(KINDS)}"),
            ("files", len(self.files) > 0, "lists no corpus file or directory"),
            ("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("workers", self.workers is None or self.workers >= 1, "must be at least 1"),
            ("replay_fraction", 0 <= self.replay_fraction <= 1, "must be in [0, 1]"),
            ("replay_fraction", self.replay_fraction == 0 or self.replay_files, "needs data.replay_files"),
            ("replay_fraction", self.replay_fraction == 0 or self.kind == "sft", "applies to sft only"),
            ("replay_ratio", self.replay_ratio > 0, "must be positive"),
            (
                "pack",
                not (self.pack and self.kind != "pretrain"),
                f"applies to pretraining only, not to {self.kind}",
            ),
        ]
        for key, ok, why in rules:
            if not ok:
                raise ValueError(f"data.{key}={getattr(self, key)!r}: {why}")
        return self


CORPUS_KINDS = ("pretrain", "sft")  # the corpora a vocabulary is built from (tokenizer.files)


@dataclass
class TokenizerSettings:
    # corpora the vocabulary is built from, by kind (pretrain, sft): both stages', so sft's words are known from
    # the start (rgpt/conf/config.yaml names the built-in ones)
    files: dict = field(default_factory=dict)
    min_freq: int = 2  # words seen fewer times are spelled with their characters (every character is kept)
    max_size: int = 20000  # vocabulary cap, most frequent first
    hmm: bool = False  # jieba's HMM guesses new words; off keeps segmentation a pure dictionary lookup
    split_digits: bool = False  # no word holds a digit: numbers are spelled digit by digit (for arithmetic)

    def validate(self):
        check(
            set(self.files) <= set(CORPUS_KINDS),
            "tokenizer.files",
            sorted(self.files),
            "keys must be pretrain/sft",
        )
        check(self.min_freq >= 1, "tokenizer.min_freq", self.min_freq, "must be at least 1")
        check(self.max_size >= 16, "tokenizer.max_size", self.max_size, "must be at least 16")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def in_val(text: str, fraction: float, salt: str = "") -> bool:
    """Whether a document belongs to the validation split: a hash of its own text decides, so adding or
    reordering files never moves another document, and duplicates always land on the same side. Another
    ``salt`` draws another slice of the same share."""
    h = int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "little")
    return h < fraction * 2**64


class TokenSet:
    """One split of a prepared corpus: windows of ids with their loss masks, memory-mapped from disk."""

    def __init__(self, root, split: str):
        self.root = root = Path(root)
        self.ids = np.load(root / f"{split}.ids.npy", mmap_mode="r")  # (n_tokens,) int32
        self.mask = np.load(root / f"{split}.mask.npy", mmap_mode="r")  # (n_tokens,) uint8
        self.offsets = np.load(root / f"{split}.offsets.npy", mmap_mode="r")  # (n_seqs + 1,) int64
        self.stats = json.loads((root / "meta.json").read_text(encoding="utf-8"))[split]
        self.lengths = np.diff(self.offsets)  # (n_seqs,) tokens per window, targets = length - 1

    @property
    def n_seqs(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.n_seqs

    @property
    def n_tokens(self) -> int:
        """Tokens stored (a token shared by two windows counts twice)."""
        return len(self.ids)

    @property
    def n_chars(self) -> int:
        """Characters of the normalised text whose tokens are learned (for bits per character)."""
        return self.stats["n_chars"]

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return torch.from_numpy(self.ids[a:b].astype(np.int64)), torch.from_numpy(self.mask[a:b] != 0)


class _SplitWriter:
    """Appends windows of one split to its three arrays on disk, keeping only counts and the tokens after
    the last full window (fewer than block_size+1) in memory.

    Windows are [s, s + block_size + 1) for s = 0, block_size, 2·block_size, … of a token stream: each
    document on its own, or with ``pack`` all of the split's documents one after another.
    """

    def __init__(self, root: Path, split: str, block_size: int, pack: bool = False):
        self.block_size, self.pack = block_size, pack
        self.ids = NpyWriter(root / f"{split}.ids.npy", np.int32)
        self.mask = NpyWriter(root / f"{split}.mask.npy", np.uint8)
        self.offsets = NpyWriter(root / f"{split}.offsets.npy", np.int64)
        self.offsets.append(np.zeros(1, np.int64))
        self.rest_ids, self.rest_mask = np.zeros(0, np.int32), np.zeros(0, np.uint8)  # stream not yet written
        self.stats = {"n_docs": 0, "n_seqs": 0, "n_tokens": 0, "n_targets": 0, "n_unk": 0, "n_chars": 0}

    def add(self, ids: np.ndarray, mask: np.ndarray, n_chars: int) -> None:
        st = self.stats
        st["n_docs"] += 1
        st["n_unk"] += int((ids == UNK_ID).sum())
        st["n_chars"] += n_chars
        ids, mask = np.concatenate([self.rest_ids, ids]), np.concatenate([self.rest_mask, mask])
        n_full = max(len(ids) - 1, 0) // self.block_size  # windows that end inside what we have
        for s in range(0, n_full * self.block_size, self.block_size):
            self._write(ids[s : s + self.block_size + 1], mask[s : s + self.block_size + 1])
        # from the last full window's final token on: the next window starts there (overlap of one)
        self.rest_ids, self.rest_mask = ids[n_full * self.block_size :], mask[n_full * self.block_size :]
        if not self.pack:
            self._flush()

    def _flush(self) -> None:
        """The stream's short last window; a lone token was the previous window's last target already."""
        if len(self.rest_ids) > 1:
            self._write(self.rest_ids, self.rest_mask)
        self.rest_ids, self.rest_mask = self.rest_ids[:0], self.rest_mask[:0]

    def _write(self, ids: np.ndarray, mask: np.ndarray) -> None:
        st = self.stats
        self.ids.append(ids)
        self.mask.append(mask)
        st["n_seqs"] += 1
        st["n_tokens"] += len(ids)
        st["n_targets"] += int(mask[1:].sum())  # a window's first token is the previous one's last target
        self.offsets.append(np.array([st["n_tokens"]], np.int64))

    def close(self) -> None:
        self._flush()
        for w in (self.ids, self.mask, self.offsets):
            w.close()


def _items(cfg: DataConfig, paths, fixed: str | None):
    """(split, item) of every document of ``paths``: its normalised text ("pretrain") or turns ("sft").
    The split is ``fixed``, or else decided by a hash of the item's text."""
    if cfg.kind == "pretrain":
        items = (normalise(text) for text in read_pretrain(paths))
    else:
        items = ([(role, normalise(c)) for role, c in turns] for turns in read_dialogues(paths))
    for item in items:
        key = item if cfg.kind == "pretrain" else json.dumps(item, ensure_ascii=False)
        yield fixed or ("val" if in_val(key, cfg.val_fraction) else "train"), item


def _replay(cfg: DataConfig, paths: list[Path]):
    """("replay", document) for the replay_fraction of replay_files' documents that their hash picks.

    Replay keeps instruction tuning from wiping out what pretraining learned. The picked documents form a
    pool of their own (the "replay" split, packed into full windows), from which each epoch learns the next
    replay_ratio x its dialogue tokens (rgpt.data.batches.Batcher): fresh text every epoch until the pool
    runs out, not one fixed slice learned by heart (which, measured in the README, did not help). Replay
    never enters the validation split, whose loss stays that of held-out dialogues alone.
    """
    if paths:
        for text in read_pretrain(paths):
            text = normalise(text)
            if in_val(text, cfg.replay_fraction, salt="replay:"):
                yield "replay", text


def _utf8_size(item) -> int:
    """Bytes of a document's text, or of a dialogue's turns: the progress bar's unit."""
    return len(item.encode()) if isinstance(item, str) else sum(len(c.encode()) for _, c in item)


def _bar(total_bytes: int, desc: str) -> tqdm:
    """A bar over the corpus's bytes (the size known before reading), on a terminal only."""
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, leave=False, disable=None)


def prepare(cfg: DataConfig, tok: TokenizerBase, block_size: int, log=print) -> tuple[TokenSet, TokenSet]:
    """(train, val) token sets of a stage, tokenized once and then loaded from cfg.cache_dir."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    cfg.validate()
    cache_dir, workers = cfg.cache_dir, cfg.workers
    replay = expand_paths(cfg.replay_files) if cfg.replay_fraction > 0 else []
    files, val_files = expand_paths(cfg.files), expand_paths(cfg.val_files) if cfg.val_files else []
    key = _key(
        DATA_FORMAT,
        tok.fingerprint,
        block_size,
        # what changes the arrays: not where they are kept nor how many processes make them
        {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "workers", "replay_ratio")}
        | {"files": None, "val_files": None, "replay_files": None},
        [file_digest(f) for f in files],
        [file_digest(f) for f in val_files],
        [REPLAY_FORMAT, [file_digest(f) for f in replay]] if replay else [],
    )
    root = Path(cache_dir) / key
    if (root / "meta.json").exists():
        log(f"data cache hit: {root} (tokenization skipped)")
        return TokenSet(root, "train"), TokenSet(root, "val")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".tmp-{key[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0, n_chars = time.perf_counter(), 0
        out = {s: _SplitWriter(tmp, s, block_size, cfg.pack) for s in ("train", "val")}
        if replay:
            out["replay"] = _SplitWriter(tmp, "replay", block_size, pack=True)
        # (paths, their split), or None: each document's hash decides
        sources = [(files, "train"), (val_files, "val")] if val_files else [(files, None)]
        items = chain(
            chain.from_iterable(_items(cfg, paths, fixed) for paths, fixed in sources), _replay(cfg, replay)
        )
        n_bytes = sum(f.stat().st_size for f in files + val_files + replay)
        workers = auto_workers(workers, n_bytes)
        everything = cfg.kind == "sft" and not cfg.assistant_only_loss
        with _bar(n_bytes, f"tokenizing ({processes(workers)})") as bar:
            sent = lambda chunk: bar.update(sum(_utf8_size(item) for _, item in chunk))  # noqa: E731
            for split, ids, mask, learned, chars in encode(items, tok, everything, workers, sent):
                out[split].add(ids, mask, learned)
                n_chars += chars
        for w in out.values():
            w.close()
        seconds = time.perf_counter() - t0
        for split, w in out.items():
            if w.stats["n_docs"] == 0 and split == "replay":
                raise CorpusError(
                    f"data.replay_fraction={cfg.replay_fraction} picks no document of {cfg.replay_files}"
                )
            if w.stats["n_docs"] == 0:
                how = f"val_files {cfg.val_files}" if val_files else f"val_fraction={cfg.val_fraction}"
                raise CorpusError(f"empty {split} split of {', '.join(map(str, cfg.files))} ({how})")
        meta = {
            "format": DATA_FORMAT,
            "kind": cfg.kind,
            "block_size": block_size,
            "pack": cfg.pack,
            "files": [str(f) for f in files],
            "val_files": [str(f) for f in val_files],
            "replay_files": [str(f) for f in replay],
            **{split: w.stats for split, w in out.items()},
            "seconds": seconds,
            "chars_per_s": n_chars / max(seconds, 1e-9),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished the same key first; its arrays are identical
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    splits = [meta[split] for split in ("train", "val", "replay") if split in meta]
    n_docs, n_tok = sum(st["n_docs"] for st in splits), sum(st["n_tokens"] for st in splits)
    unk = sum(st["n_unk"] for st in splits) / max(n_tok, 1)
    replayed = f", {meta['replay']['n_docs']} of them replayed pretraining text" if replay else ""
    log(
        f"tokenized {n_docs} docs{replayed} ({n_chars} chars → {n_tok} tokens, <unk> rate {unk:.3%}) "
        f"in {seconds:.1f} s, {meta['chars_per_s']:,.0f} chars/s, {processes(workers)} → {root}"
    )
    return TokenSet(root, "train"), TokenSet(root, "val")


def replay_set(train: TokenSet) -> "TokenSet | None":
    """The replay pool prepared beside ``train`` (data.replay_fraction > 0), or None."""
    meta = json.loads((train.root / "meta.json").read_text(encoding="utf-8"))
    return TokenSet(train.root, "replay") if "replay" in meta else None


def replay_windows(train: TokenSet, pool: TokenSet, ratio: float) -> int:
    """Pool windows an epoch learns so that its replay tokens are ``ratio`` x the train split's tokens."""
    return max(1, round(ratio * train.n_tokens / (pool.n_tokens / len(pool))))


def build_tokenizer(
    paths_by_kind: dict[str, list[str]],
    min_freq: int,
    max_size: int,
    hmm: bool,
    cache_dir,
    log=print,
    idioms=None,
    workers: int | None = None,
    split_digits: bool = False,
) -> Tokenizer:
    """The vocabulary of all the given corpora, built once and then loaded from ``<cache_dir>/vocab-<key>.json``."""
    idioms = shipped_idioms() if idioms is None else tuple(sorted(set(idioms)))
    files = {kind: expand_paths(paths) for kind, paths in sorted(paths_by_kind.items())}
    key = _key(
        "rgpt-vocab-build/1",
        min_freq,
        max_size,
        hmm,
        idioms,
        {kind: [file_digest(f) for f in fs] for kind, fs in files.items()},
        *(["split_digits"] if split_digits else []),  # absent when off: caches from before keep their key
    )
    path = Path(cache_dir) / f"vocab-{key}.json"
    if path.exists():
        log(f"tokenizer cache hit: {path}")
        return Tokenizer.load(path)
    t0 = time.perf_counter()
    texts = chain.from_iterable(corpus_texts(fs, kind) for kind, fs in files.items())
    n_bytes = sum(f.stat().st_size for fs in files.values() for f in fs)
    workers = auto_workers(workers, n_bytes)
    with _bar(n_bytes, f"counting words ({processes(workers)})") as bar:
        sent = lambda chunk: bar.update(sum(map(_utf8_size, chunk)))  # noqa: E731
        chars, words = count(texts, idioms, hmm, workers, sent)
    tok = Tokenizer.from_counts(chars, words, min_freq, max_size, hmm, idioms, split_digits)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    seconds = time.perf_counter() - t0
    log(
        f"built vocabulary of {tok.vocab_size} tokens from {chars.total():,} chars in {seconds:.1f} s "
        f"({chars.total() / max(seconds, 1e-9):,.0f} chars/s, {processes(workers)}) → {path}"
    )
    return tok


def tokenize_throughput(tok: Tokenizer, paths, kind: str = "pretrain", max_chars: int = 2_000_000) -> float:
    """Characters per second that ``tok`` encodes on (up to max_chars of) a corpus, for the benchmark script."""
    n, t0 = 0, time.perf_counter()
    for text in corpus_texts(paths, kind):
        tok.encode(text)
        n += len(text)
        if n >= max_chars:
            break
    return n / max(time.perf_counter() - t0, 1e-9)
