"""Segmenting a corpus in worker processes: the vocabulary's counts, and each document's token ids.

jieba is pure Python, so one process segments ~100k characters a second; a corpus of 100 MB wants every
core. The corpus is read once, in the calling process, and cut into chunks of about CHUNK_CHARS
characters; ``workers`` processes segment the chunks, and the results come back in the corpus's order,
so the output is the same for any number of workers. At most AHEAD chunks per worker are in flight,
which bounds memory whatever the corpus's size.

This module imports neither torch nor the rest of rgpt.data: a spawned worker starts in ~1 s (most of
it jieba's dictionary).
"""

import multiprocessing
import os
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from rgpt.data.tokenizer import Tokenizer, TokenizerBase
from rgpt.data.vocab import tokenizer_from_dict

CHUNK_CHARS = 1 << 20  # characters a task: large enough that sending it costs far less than segmenting it
AHEAD = 2  # chunks in flight per worker
AUTO_MIN_BYTES = 4 << 20  # workers=None: below this corpus size one process is faster than starting more


def auto_workers(workers: int | None, n_bytes: int) -> int:
    """``workers``, or for None: every usable core when the corpus has AUTO_MIN_BYTES or more, else 1."""
    if workers is not None:
        return workers
    return len(os.sched_getaffinity(0)) if n_bytes >= AUTO_MIN_BYTES else 1


def processes(n: int) -> str:
    """ "1 process", "2 processes": for the log lines and progress bars that say how the work ran."""
    return f"{n} process{'es' if n > 1 else ''}"


def chunked(items: Iterable, size: Callable[[object], int], chunk: int | None = None) -> Iterator[list]:
    """Consecutive lists of ``items`` whose sizes add up to about ``chunk`` (CHUNK_CHARS), one item at least."""
    chunk = chunk or CHUNK_CHARS
    out, n = [], 0
    for item in items:
        out.append(item)
        n += size(item)
        if n >= chunk:
            yield out
            out, n = [], 0
    if out:
        yield out


# ---- worker state: set once per process by _start -------------------------------------------------
_job: dict = {}


def _start(job: dict) -> None:
    if job.pop("quiet", False):  # a worker leaves Ctrl-C to the process that started it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    tok = job.get("tokenizer")
    if isinstance(tok, dict):
        job["tokenizer"] = tokenizer_from_dict(tok)
    _job.clear()
    _job.update(job)


def _count(texts: list[str]) -> tuple[Counter, Counter]:
    return Tokenizer.count(texts, _job["user_words"], _job["hmm"])


def _encode(items: list[tuple]) -> tuple[list, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tags, ids, mask, lengths, [learned chars, all chars] per item) of a chunk of (tag, item) pairs,
    the arrays concatenated: one message back per chunk rather than one per document."""
    tok, everything = _job["tokenizer"], _job["learn_everything"]
    ids, masks, lengths, chars = [], [], [], []
    for _, item in items:
        if isinstance(item, str):  # a document, learned whole (pretraining, or replayed during sft)
            a = tok.encode_document(item)
            m = np.ones(len(a), np.uint8)
            learned = total = len(item)
        else:
            a, m = tok.encode_dialogue(item)
            a, m = np.asarray(a, np.int32), np.asarray(m, np.uint8)
            if everything:
                m[:] = 1
            total = sum(len(c) for _, c in item)
            learned = total if everything else sum(len(c) for role, c in item if role == "assistant")
        ids.append(a)
        masks.append(m)
        lengths.append(len(a))
        chars.append((learned, total))
    return (
        [tag for tag, _ in items],
        np.concatenate(ids).astype(np.int32, copy=False),
        np.concatenate(masks),
        np.asarray(lengths, np.int64),
        np.asarray(chars, np.int64).reshape(-1, 2),
    )


def _ordered_map(fn, chunks: Iterable[list], job: dict, workers: int) -> Iterator:
    """fn(chunk) for every chunk, in order: in this process, or in ``workers`` spawned ones."""
    if workers <= 1:
        _start(dict(job))
        yield from map(fn, chunks)
        return
    if isinstance(job.get("tokenizer"), TokenizerBase):
        job = job | {"tokenizer": job["tokenizer"].to_dict()}
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold torch's threads
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start, initargs=(job | {"quiet": True},))
    try:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= AHEAD * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def count(
    texts: Iterable[str], user_words: tuple, hmm: bool, workers: int, progress=None
) -> tuple[Counter, Counter]:
    """(character counts, word counts) of ``texts``, merged chunk by chunk."""
    chars, words = Counter(), Counter()
    job = {"user_words": user_words, "hmm": hmm}
    for c, w in _ordered_map(_count, _counted(chunked(texts, len), progress), job, workers):
        chars.update(c)
        words.update(w)
    return chars, words


def _chars(item) -> int:
    return len(item) if isinstance(item, str) else sum(len(c) for _, c in item)


def encode(
    items: Iterable[tuple], tok: TokenizerBase, learn_everything: bool, workers: int, progress=None
) -> Iterator[tuple[object, np.ndarray, np.ndarray, int, int]]:
    """(tag, ids, mask, learned chars, all chars) of every (tag, item) pair, in order. An item is a
    normalised document (a str, learned whole) or a dialogue's normalised turns (a list of (role, text):
    the assistant's turns learned, or every turn with ``learn_everything``); the tag rides along."""
    job = {"tokenizer": tok, "learn_everything": learn_everything}
    chunks = _counted(chunked(items, lambda pair: _chars(pair[1])), progress)
    for tags, ids, mask, lengths, chars in _ordered_map(_encode, chunks, job, workers):
        ends = np.cumsum(lengths)
        for tag, end, n, (learned, total) in zip(tags, ends, lengths, chars):
            yield tag, ids[end - n : end], mask[end - n : end], int(learned), int(total)


def _counted(chunks: Iterator[list], progress) -> Iterator[list]:
    """The chunks, telling ``progress(items)`` about each as it is sent off."""
    for chunk in chunks:
        if progress is not None:
            progress(chunk)
        yield chunk
