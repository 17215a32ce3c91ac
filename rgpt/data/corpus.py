"""Readers for every corpus format; bad input raises CorpusError with one line naming file and place.

Formats (all UTF-8, a leading BOM is tolerated; blank lines and surrounding whitespace are skipped):
- ``.json``: an array whose items are strings (the reference's format; a chat string carries the
  markers 用户： / 助手：, also with an ASCII colon, possibly several turns) or objects as in JSONL.
- ``.jsonl``: one object a line, ``{"text": ...}`` for pretraining, ``{"conversations": [{"role":
  "user"|"assistant", "content": ...}, ...]}`` for instruction tuning.
- ``.txt``: one document a line (for instruction tuning, one marker-delimited dialogue a line).
A directory stands for the corpus files under it, in natural order of their paths (``2.txt`` before
``10.txt``); other files in it are ignored.
"""

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".json", ".jsonl", ".txt")
ROLES = ("user", "assistant")
# 用户： / 助手： (full-width or ASCII colon) open a turn inside a chat string.
MARKER = re.compile(r"(用户|助手)\s*[：:]")
MARKER_ROLE = {"用户": "user", "助手": "assistant"}


class CorpusError(Exception):
    """A corpus problem; str(e) is one line naming the file (and line, column or byte offset)."""


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _natural_key(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.as_posix())]


def _fetch_hint(path: Path) -> str:
    """For a missing data/NAME/... of a corpus that rgpt.data.fetch makes: the command that makes it."""
    from rgpt.data.sources import SOURCES  # only on this error path

    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part == "data" and (parts[i + 1] in SOURCES or parts[i + 1] == "mix"):
            return f" (run `python -m rgpt.data.fetch {parts[i + 1]}` first)"
    return ""


def expand_paths(paths) -> list[Path]:
    """Files of ``paths`` in order, each directory replaced by its corpus files in natural order."""
    if isinstance(paths, str | Path):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix in SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ]
            if not found:
                raise CorpusError(f"{p}: directory holds no {'/'.join(SUFFIXES)} files")
            files += sorted(found, key=lambda f: _natural_key(f.relative_to(p)))
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise CorpusError(
                    f"{p}: unsupported corpus file type {p.suffix!r} (expected {'/'.join(SUFFIXES)})"
                )
            files.append(p)
        else:
            raise CorpusError(f"{p}: no such file or directory{_fetch_hint(p)}")
    return files


def _decode(raw: bytes, path: Path, start: int = 0, line: int | None = None) -> str:
    """UTF-8 text of ``raw``, which begins at byte ``start`` (on ``line``) of the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1 if line is None else line
        raise CorpusError(f"{path}:{line}: not valid UTF-8 at byte offset {start + e.start}") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the file, read and decoded one line at a time."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            text = _decode(raw, path, offset, n)
            offset += len(raw)
            yield n, text.removeprefix("\ufeff") if n == 1 else text


def _loads(text: str, path: Path, first_line: int = 1) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{first_line + e.lineno - 1}:{e.colno}: malformed JSON: {e.msg}") from None


def records(path: Path) -> Iterator[tuple[str, str | dict]]:
    """(where, record) of every non-blank item: a string (text or chat string) or a JSON object."""
    if path.suffix == ".json":
        items = _loads(_decode(path.read_bytes(), path).removeprefix("\ufeff"), path)
        if not isinstance(items, list):
            raise CorpusError(f"{path}: expected a JSON array, got {type(items).__name__}")
        for i, item in enumerate(items, 1):
            where = f"{path}: item {i}"
            if isinstance(item, dict):
                yield where, item
            elif not isinstance(item, str):
                raise CorpusError(f"{where}: expected a string or an object, got {type(item).__name__}")
            elif item.strip():
                yield where, item.strip()
    elif path.suffix == ".jsonl":
        for n, line in _lines(path):
            if line.strip():
                obj = _loads(line, path, n)
                if not isinstance(obj, dict):
                    raise CorpusError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                yield f"{path}:{n}", obj
    else:
        for n, line in _lines(path):
            if line.strip():
                yield f"{path}:{n}", line.strip()


def pretrain_text(where: str, rec: str | dict) -> str:
    """The document of one record: the string itself, or the object's "text" field."""
    if isinstance(rec, str):
        return rec
    text = rec.get("text")
    if not isinstance(text, str):
        raise CorpusError(f'{where}: object has no string "text" field (keys: {", ".join(rec) or "none"})')
    return text.strip()


def parse_chat(text: str, where: str) -> list[tuple[str, str]]:
    """Turns of a chat string ``用户：…助手：…``; text before the first marker is an error."""
    parts = MARKER.split(text)  # [before, "用户", content, "助手", content, ...]
    if len(parts) == 1:
        raise CorpusError(f"{where}: chat string has no 用户：/助手： role markers")
    if parts[0].strip():
        raise CorpusError(f"{where}: text before the first 用户：/助手： marker: {parts[0].strip()[:20]!r}")
    return [(MARKER_ROLE[m], c.strip()) for m, c in zip(parts[1::2], parts[2::2])]


def dialogue(where: str, rec: str | dict) -> list[tuple[str, str]]:
    """The checked turns of one record: a chat string, or an object with "conversations" (or "text")."""
    if isinstance(rec, str):
        turns = parse_chat(rec, where)
    elif isinstance(rec.get("conversations"), list):
        turns = []
        for k, turn in enumerate(rec["conversations"], 1):
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                raise CorpusError(f'{where}: turn {k} is not an object with a string "content"')
            if turn.get("role") not in ROLES:
                raise CorpusError(
                    f"{where}: turn {k} has role {turn.get('role')!r}, expected 'user' or 'assistant'"
                )
            turns.append((turn["role"], turn["content"].strip()))
    elif isinstance(rec.get("text"), str):
        turns = parse_chat(rec["text"].strip(), where)
    else:
        raise CorpusError(f'{where}: object has no "conversations" list (keys: {", ".join(rec) or "none"})')
    for k, (role, content) in enumerate(turns, 1):
        if not content:
            raise CorpusError(f"{where}: turn {k} ({role}) is empty")
    if not any(role == "assistant" for role, _ in turns):
        raise CorpusError(f"{where}: dialogue has no assistant turn")
    return turns


def _empty(paths) -> CorpusError:
    names = ", ".join(str(p) for p in ([paths] if isinstance(paths, str | Path) else paths))
    return CorpusError(f"empty corpus: no documents in {names}" if names else "empty corpus: no files given")


def read_pretrain(paths) -> Iterator[str]:
    """Every pretraining document of ``paths`` (files or directories, any supported format)."""
    n = 0
    for path in expand_paths(paths):
        for where, rec in records(path):
            text = pretrain_text(where, rec)
            if text:
                n += 1
                yield text
    if n == 0:
        raise _empty(paths)


def read_dialogues(paths) -> Iterator[list[tuple[str, str]]]:
    """Every dialogue of ``paths`` as [(role, content), ...], role "user" or "assistant"."""
    n = 0
    for path in expand_paths(paths):
        for where, rec in records(path):
            n += 1
            yield dialogue(where, rec)
    if n == 0:
        raise _empty(paths)


def corpus_texts(paths, kind: str) -> Iterator[str]:
    """Raw texts for building the vocabulary: documents, or every turn's content for "sft"."""
    if kind == "pretrain":
        yield from read_pretrain(paths)
    elif kind == "sft":
        for turns in read_dialogues(paths):
            yield from (content for _, content in turns)
    else:
        raise ValueError(f"unknown corpus kind {kind!r}; expected 'pretrain' or 'sft'")
