"""Chinese word tokenizer: jieba precise-mode segmentation over a vocabulary built from the corpus.

A text is first normalised: stripped, and every run of whitespace inside it (spaces, tabs, newlines,
the ideographic space U+3000) becomes one ASCII space. jieba then cuts it into pieces whose
concatenation is the normalised text; a piece in the vocabulary is one id, any other piece falls back
to its characters, and only a character never seen while building becomes <unk>. Decoding joins the
pieces back without separators, so for any text made of vocabulary characters
``decode(encode(t)) == normalise(t)``: no spaces appear between Chinese words, and the spaces between
Latin words are kept because the space is itself a token.

Idioms (成语) from ``rgpt/corpus/idioms.tsv`` are registered with jieba so each stays one piece. The
idiom list is saved in vocab.json with the vocabulary, so a loaded tokenizer cuts exactly as the
saved one did even if the shipped list changes later.
"""

import functools
import hashlib
import json
import logging
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import jieba
import numpy as np

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID = range(6)

IDIOMS_PATH = Path(__file__).resolve().parent.parent / "corpus" / "idioms.tsv"
# An idiom's jieba frequency: above that of any two words it could otherwise be cut into, so the
# 4-character idiom always wins its span in precise mode.
IDIOM_FREQ = 100_000
VOCAB_FORMAT = "rgpt-vocab/1"
_DIGIT = re.compile(r"\d")  # any Unicode decimal digit: 0-9, full-width ０-９, ...


def normalise(text: str) -> str:
    """Strip the text and collapse every run of whitespace inside it to one space."""
    return " ".join(text.split())


def shipped_idioms(path: Path = IDIOMS_PATH) -> tuple[str, ...]:
    """The idioms of idioms.tsv (``成语<TAB>释义`` lines), sorted; empty if the file is absent."""
    if not path.exists():
        return ()
    words = (line.split("\t", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(sorted({w for w in words if w}))


@functools.cache
def _base_jieba() -> jieba.Tokenizer:
    """The process-wide jieba instance; its ~0.5 s dictionary load happens once, on first use."""
    jieba.setLogLevel(logging.WARNING)
    seg = jieba.Tokenizer()
    seg.initialize()
    return seg


@functools.cache
def _segmenter(user_words: tuple[str, ...]) -> jieba.Tokenizer:
    """A jieba instance with ``user_words`` registered, sharing the base dictionary (a dict copy, ~10 ms).

    One instance per distinct word list rather than add_word on the shared instance, so one
    tokenizer's words (a test's tiny idiom list) can never change how another tokenizer cuts.
    """
    base = _base_jieba()
    if not user_words:
        return base
    seg = jieba.Tokenizer()
    seg.FREQ, seg.total, seg.initialized = dict(base.FREQ), base.total, True
    for word in user_words:
        seg.add_word(word, freq=IDIOM_FREQ)
    return seg


class TokenizerBase:
    """What the rest of rgpt calls on a tokenizer, whatever its kind: encode, encode_array, decode, tokens,
    vocab_size, to_dict (and save; rgpt.data.vocab.load_tokenizer loads either kind). The six SPECIALS are ids 0..5 in every
    kind, so the templates below (and rgpt's decoding) are written once.

    Kinds: Tokenizer (jieba words over a vocabulary built from the corpus, vocab.json format
    rgpt-vocab/1) and rgpt.data.json_tokenizer.JsonTokenizer (a transformers tokenizer.json, imported
    with its model by `python -m rgpt.hf import`). A checkpoint's vocab.json records which, by its format.
    """

    tokens: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids, skip_special: bool = True) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def decode_more(self, ids: list[int], shown: str) -> str:
        """The text that token ids[-1] adds to `shown`, the decoding of ids[:-1] (a reply streamed token by
        token). Here pieces join without separators, so it is the last token's piece."""
        return self.decode(ids[-1:])

    def encode_pretrain(self, text: str) -> list[int]:
        return [BOS_ID, *self.encode(text), EOS_ID]

    def encode_document(self, text: str) -> np.ndarray:
        """encode_pretrain() as an int32 array: ``<bos> text <eos>``."""
        return np.concatenate([[BOS_ID], self.encode_array(text), [EOS_ID]]).astype(np.int32)

    def encode_dialogue(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[bool]]:
        """``<bos> (<user> u | <assistant> a <eos>)*``; mask is True on assistant content and its <eos>."""
        ids, mask = [BOS_ID], [False]
        for role, content in turns:
            body = self.encode(content)
            if role == "user":
                ids += [USER_ID, *body]
                mask += [False] * (1 + len(body))
            elif role == "assistant":
                ids += [ASSISTANT_ID, *body, EOS_ID]
                mask += [False] + [True] * (len(body) + 1)
            else:
                raise ValueError(f"unknown role {role!r}; expected 'user' or 'assistant'")
        return ids, mask

    def encode_prompt(self, turns: list[tuple[str, str]]) -> list[int]:
        """The dialogue template for a history ending with the user's turn, then <assistant> as the cue."""
        if not turns or turns[-1][0] != "user":
            raise ValueError("a prompt's last turn must be the user's")
        return self.encode_dialogue(turns)[0] + [ASSISTANT_ID]

    def unk_rate(self, texts: Iterable[str]) -> float:
        """Fraction of tokens that are <unk> over ``texts`` (0.0 for no tokens)."""
        n = n_unk = 0
        for text in texts:
            ids = self.encode(text)
            n += len(ids)
            n_unk += ids.count(UNK_ID)
        return n_unk / n if n else 0.0

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of everything that decides the ids: part of every data-cache key."""
        return hashlib.sha256(
            json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True).encode()
        ).hexdigest()

    def save(self, path) -> None:
        """Write vocab.json (to ``path``, or into it if it is a directory), atomically."""
        path = Path(path)
        path = path / "vocab.json" if path.is_dir() else path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class Tokenizer(TokenizerBase):
    """Vocabulary (id ↔ piece) plus the jieba settings that produce the pieces."""

    def __init__(
        self,
        tokens: list[str],
        hmm: bool,
        min_freq: int,
        max_size: int,
        user_words: tuple[str, ...],
        split_digits: bool = False,
    ):
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {tuple(tokens[: len(SPECIALS)])}")
        numbers = (
            [t for t in tokens[len(SPECIALS) :] if len(t) > 1 and _DIGIT.search(t)] if split_digits else []
        )
        if numbers:
            raise ValueError(f"a vocabulary with split_digits holds {numbers[0]!r}, a word with a digit")
        self.tokens = list(tokens)
        self.hmm, self.min_freq, self.max_size, self.split_digits = hmm, min_freq, max_size, split_digits
        self.user_words = tuple(user_words)
        # Specials are kept out of the lookup: text that literally contains "<eos>" encodes as characters.
        self._ids = {t: i for i, t in enumerate(self.tokens) if i >= len(SPECIALS)}
        self._piece_cache: dict[str, tuple[int, ...]] = {}
        self._seg = None  # the jieba instance, fetched on first encode

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        min_freq: int = 2,
        max_size: int = 20000,
        hmm: bool = False,
        idioms: Iterable[str] | None = None,
        split_digits: bool = False,
    ) -> "Tokenizer":
        """Every character seen, then words (pieces of 2+ characters) seen ≥ min_freq times, most frequent
        first with ties broken by the piece itself, until the vocabulary holds max_size entries.

        If there are more characters than room, the rarest characters are the ones left out. ``idioms``
        defaults to the shipped list. With split_digits no word holding a digit is kept, so every number is
        spelled digit by digit ("63" → 6, 3): arithmetic then reads the same digits in every number.
        """
        user_words = shipped_idioms() if idioms is None else tuple(sorted(set(idioms)))
        chars, words = cls.count(texts, user_words, hmm)
        return cls.from_counts(chars, words, min_freq, max_size, hmm, user_words, split_digits)

    @staticmethod
    def count(texts: Iterable[str], user_words: tuple[str, ...], hmm: bool) -> tuple[Counter, Counter]:
        """(character counts, counts of pieces of 2+ characters) of the normalised texts. Counts of
        parts of a corpus add up to the counts of the whole: the vocabulary can be built part by part."""
        seg = _segmenter(user_words)
        chars, words = Counter(), Counter()
        for text in texts:
            text = normalise(text)
            chars.update(text)
            words.update(p for p in seg.cut(text, HMM=hmm) if len(p) > 1)
        return chars, words

    @classmethod
    def from_counts(
        cls,
        chars: Counter,
        words: Counter,
        min_freq: int,
        max_size: int,
        hmm: bool,
        user_words: tuple[str, ...],
        split_digits: bool = False,
    ) -> "Tokenizer":
        """The vocabulary that build() makes of a corpus with these counts (see build)."""

        def by_freq(counts):
            return sorted(counts, key=lambda t: (-counts[t], t))

        def kept(word):
            return words[word] >= min_freq and not (split_digits and _DIGIT.search(word))

        room = max_size - len(SPECIALS)
        kept_chars = by_freq(chars)[:room]
        kept_words = [w for w in by_freq(words) if kept(w)][: room - len(kept_chars)]
        return cls(
            list(SPECIALS) + kept_chars + kept_words, hmm, min_freq, max_size, user_words, split_digits
        )

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._piece_cache.get(piece)
        if ids is None:
            i = self._ids.get(piece)
            ids = (i,) if i is not None else tuple(self._ids.get(c, UNK_ID) for c in piece)
            if len(self._piece_cache) > 1_000_000:  # bound the memo on corpora with endless distinct numbers
                self._piece_cache.clear()
            self._piece_cache[piece] = ids
        return ids

    def _pieces(self, text: str):
        if self._seg is None:
            self._seg = _segmenter(self.user_words)
        return self._seg.cut(normalise(text), HMM=self.hmm)

    def encode(self, text: str) -> list[int]:
        """Ids of the normalised text, with no <bos>/<eos> added."""
        ids = []
        for piece in self._pieces(text):
            ids.extend(self._piece_ids(piece))
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """encode() as an int32 array, grown 4 bytes a token rather than as a Python list: for long documents."""
        ids = array("i")
        for piece in self._pieces(text):
            ids.extend(self._piece_ids(piece))
        return np.frombuffer(ids, np.intc).astype(np.int32, copy=False)

    def decode(self, ids, skip_special: bool = True) -> str:
        """Pieces joined without separators. With skip_special, <pad>/<bos>/<eos>/<user>/<assistant> are
        dropped; <unk> is always shown, since it stands for real text that was lost."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        out = []
        for i in ids:
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} outside the vocabulary of {len(self.tokens)}")
            if skip_special and i < len(SPECIALS) and i != UNK_ID:
                continue
            out.append(self.tokens[i])
        return "".join(out)

    def to_dict(self) -> dict:
        settings = {"hmm": self.hmm, "min_freq": self.min_freq, "max_size": self.max_size}
        if (
            self.split_digits
        ):  # written only when on: vocabularies (and data caches) from before keep their key
            settings["split_digits"] = True
        settings["normalisation"] = "strip; whitespace runs -> one space"
        return {
            "format": VOCAB_FORMAT,
            "settings": settings,
            "user_words": list(self.user_words),
            "tokens": self.tokens,
        }

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        path = path / "vocab.json" if path.is_dir() else path
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), path)

    @classmethod
    def from_dict(cls, d: dict, where="vocabulary") -> "Tokenizer":
        """The tokenizer that to_dict() describes."""
        if d.get("format") != VOCAB_FORMAT:
            raise ValueError(
                f"{where}: not an rgpt vocabulary (format {d.get('format')!r}, expected {VOCAB_FORMAT!r})"
            )
        s = d["settings"]
        return cls(
            d["tokens"],
            s["hmm"],
            s["min_freq"],
            s["max_size"],
            tuple(d["user_words"]),
            s.get("split_digits", False),
        )
