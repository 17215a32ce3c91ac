"""Quality checks for the built-in corpus: size, topic balance, idioms, duplicates, dialogue shape, artifacts.

    python scripts/check_corpus.py [--root rgpt/corpus]

prints every problem found (each naming its file and line) and exits 1 if there is any. The layout
checked is ``<root>/pretrain/*`` ({"text", "topic"} records), ``<root>/sft/*`` (dialogues),
``<root>/dpo/*`` (preference pairs: {"prompt" | "conversations", "chosen", "rejected", "kind"}) and
``<root>/idioms.tsv`` (``成语<TAB>释义`` lines), read with the same readers as training.
"""

import argparse
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from rgpt.data.corpus import ROLES, CorpusError, expand_paths, parse_chat, records
from rgpt.data.tokenizer import IDIOMS_PATH

DEFAULT_ROOT = IDIOMS_PATH.parent
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
IDIOM = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]{4}")
# Placeholders left by templates or unfinished writing; Latin words only count when not part of a longer word.
_LATIN_WORDS = r"x{3,}|todo|fixme|tbd|lorem|ipsum|placeholder"
ARTIFACT = re.compile(rf"(?i)(?<![a-z])(?:{_LATIN_WORDS})(?![a-z])|\{{[^{{}}]*\}}")
# How a preference pair's "rejected" answer fails: a wrong fact, a refusal where help is right, rambling
# (off-topic or padded), repetition (loops), or an unhelpful (vague, evasive) reply.
PAIR_KINDS = ("wrong_fact", "refusal", "rambling", "repetition", "unhelpful")
PAIR_KEYS = ("chosen", "rejected", "kind")  # besides exactly one of "prompt" and "conversations"


@dataclass
class Limits:
    min_pretrain_items: int = 2000  # distinct pretraining texts
    min_pretrain_cjk: int = 60_000  # CJK characters over all pretraining texts
    max_topic_share: float = 0.15  # no "topic" may hold more of the pretraining items than this
    min_dialogues: int = 1500
    min_dialogue_cjk: int = 100_000  # CJK characters over all turns
    min_multi_turn: int = 200  # dialogues with at least two user turns
    min_idioms: int = 300  # entries of idioms.tsv
    min_idioms_in_pretrain: int = 10  # distinct idioms that occur somewhere in pretraining text
    min_chars: int = 4  # shortest pretraining text, assistant turn, chosen or rejected (user turns: "李白。")
    min_pairs: int = 300  # preference pairs under dpo/
    min_pair_conversations: int = 30  # pairs whose "conversations" has ≥ 3 turns (user/assistant/user...)
    max_kind_share: float = 0.45  # no rejection "kind" may hold more of the pairs than this
    min_cjk_share: float = 0.5  # CJK characters among the letters of each text of a pair (a "DNA" is fine)


@dataclass
class Item:
    where: str
    text: str
    topic: object = None


@dataclass
class Dialogue:
    where: str
    turns: list  # [(role, content)], as written: roles and order are not yet checked


@dataclass
class Pair:
    where: str
    rec: dict  # as written: keys, types and turns are not yet checked


def _read(folder: Path, parse, problems: list[str]) -> list:
    """parse(where, record) over every record under ``folder``; a bad file is one problem, not a crash."""
    out = []
    try:
        files = expand_paths([folder])
    except CorpusError as e:
        problems.append(str(e))
        return out
    for path in files:
        try:
            for where, rec in records(path):
                try:
                    out.append(parse(where, rec))
                except CorpusError as e:
                    problems.append(str(e))
        except CorpusError as e:  # malformed JSON or invalid UTF-8: the rest of that file is unreadable
            problems.append(str(e))
    return out


def _pretrain_item(where, rec) -> Item:
    if isinstance(rec, str):
        return Item(where, rec)
    if not isinstance(rec.get("text"), str):
        raise CorpusError(f'{where}: no string "text" field')
    return Item(where, rec["text"].strip(), rec.get("topic"))


def _dialogue(where, rec) -> Dialogue:
    if isinstance(rec, str):
        return Dialogue(where, parse_chat(rec, where))
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not all(
        isinstance(t, dict) and isinstance(t.get("content"), str) for t in conv
    ):
        raise CorpusError(f'{where}: "conversations" is not a list of {{"role", "content"}} objects')
    return Dialogue(where, [(t.get("role"), t["content"].strip()) for t in conv])


def _pair(where, rec) -> Pair:
    if isinstance(rec, str):
        raise CorpusError(f"{where}: a preference pair must be a JSON object, not a line of text")
    return Pair(where, rec)


def load_idioms(path: Path, problems: list[str]) -> list[tuple[str, str, str]]:
    """(where, idiom, meaning) of every non-blank line of idioms.tsv."""
    if not path.exists():
        problems.append(f"{path}: no such file")
        return []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(f"{path}:{line}: not valid UTF-8 at byte offset {e.start}")
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            idiom, _, meaning = line.partition("\t")
            out.append((f"{path}:{n}", idiom.strip(), meaning.strip()))
    return out


def cjk_count(text: str) -> int:
    return len(CJK.findall(text))


def near_key(text: str) -> str:
    """The text without punctuation, symbols and whitespace, lower-cased: equal keys are near-duplicates."""
    return "".join(c for c in text if unicodedata.category(c)[0] not in "PSZC").lower()


def check_pretrain(items: list[Item], lim: Limits) -> list[str]:
    problems = []
    distinct = len({i.text for i in items})
    if distinct < lim.min_pretrain_items:
        problems.append(f"pretraining: {distinct} distinct items, need ≥ {lim.min_pretrain_items}")
    cjk = sum(cjk_count(i.text) for i in items)
    if cjk < lim.min_pretrain_cjk:
        problems.append(f"pretraining: {cjk} CJK characters, need ≥ {lim.min_pretrain_cjk}")
    problems += [f'{i.where}: no "topic" field' for i in items if not isinstance(i.topic, str) or not i.topic]
    counts: dict[str, int] = {}
    for i in items:
        if isinstance(i.topic, str) and i.topic:
            counts[i.topic] = counts.get(i.topic, 0) + 1
    for topic, n in sorted(counts.items()):
        if n > lim.max_topic_share * len(items):
            problems.append(
                f"pretraining: topic {topic!r} holds {n}/{len(items)} items ({n / len(items):.0%}), "
                f"more than {lim.max_topic_share:.0%}"
            )
    return problems


def check_dialogues(dialogues: list[Dialogue], lim: Limits) -> list[str]:
    problems = []
    if len(dialogues) < lim.min_dialogues:
        problems.append(f"dialogues: {len(dialogues)}, need ≥ {lim.min_dialogues}")
    cjk = sum(cjk_count(c) for d in dialogues for _, c in d.turns)
    if cjk < lim.min_dialogue_cjk:
        problems.append(f"dialogues: {cjk} CJK characters, need ≥ {lim.min_dialogue_cjk}")
    multi = sum(1 for d in dialogues if sum(r == "user" for r, _ in d.turns) >= 2)
    if multi < lim.min_multi_turn:
        problems.append(f"dialogues: {multi} with ≥ 2 user turns, need ≥ {lim.min_multi_turn}")
    for d in dialogues:
        roles = [r for r, _ in d.turns]
        if any(r not in ROLES for r in roles):
            problems.append(f"{d.where}: roles {roles}, each must be 'user' or 'assistant'")
        elif not roles or roles != [ROLES[k % 2] for k in range(len(roles))] or len(roles) % 2:
            problems.append(
                f"{d.where}: turns go {'/'.join(roles) or 'nowhere'}; they must alternate "
                "user/assistant, starting with user and ending with assistant"
            )
        problems += [f"{d.where}: turn {k} is empty" for k, (_, c) in enumerate(d.turns, 1) if not c]
    return problems


def check_idioms(idioms: list[tuple[str, str, str]], items: list[Item], lim: Limits) -> list[str]:
    problems = []
    if len(idioms) < lim.min_idioms:
        problems.append(f"idioms: {len(idioms)} entries, need ≥ {lim.min_idioms}")
    seen = {}
    for where, idiom, meaning in idioms:
        if not IDIOM.fullmatch(idiom):
            problems.append(f"{where}: idiom {idiom!r} is not 4 CJK characters")
        if not meaning:
            problems.append(f"{where}: idiom {idiom!r} has no meaning after a tab")
        if idiom in seen:
            problems.append(f"{where}: idiom {idiom!r} already listed at {seen[idiom]}")
        seen.setdefault(idiom, where)
    text = "\n".join(i.text for i in items)
    used = sum(1 for idiom in seen if idiom in text)
    if used < lim.min_idioms_in_pretrain:
        problems.append(
            f"idioms: {used} of them occur in pretraining text, need ≥ {lim.min_idioms_in_pretrain}"
        )
    return problems


def check_duplicates(named: list[tuple[str, str]]) -> list[str]:
    """Exact and near duplicates among (where, text) pairs; each later copy names the first."""
    problems, exact, near = [], {}, {}
    for where, text in named:
        key = near_key(text)
        if text in exact:
            problems.append(f"{where}: exact duplicate of {exact[text]}")
        elif key in near:
            problems.append(f"{where}: near-duplicate of {near[key]} (differs only in punctuation or spaces)")
        exact.setdefault(text, where)
        near.setdefault(key, where)
    return problems


def _turn_problems(where: str, conv) -> list[str]:
    """A pair's "conversations": {"role", "content"} turns alternating user/assistant, first and last user."""
    if not isinstance(conv, list) or not all(
        isinstance(t, dict) and set(t) == {"role", "content"} and isinstance(t["content"], str) for t in conv
    ):
        return [
            f'{where}: "conversations" is not a list of {{"role", "content"}} objects with string content'
        ]
    roles = [t["role"] for t in conv]
    problems = []
    if len(roles) % 2 == 0 or roles != [ROLES[k % 2] for k in range(len(roles))]:
        problems.append(
            f"{where}: turns go {'/'.join(map(str, roles)) or 'nowhere'}; they must alternate "
            "user/assistant, starting and ending with user"
        )
    return problems + [
        f"{where}: turn {k} is empty" for k, t in enumerate(conv, 1) if not t["content"].strip()
    ]


def pair_context(rec: dict) -> str | None:
    """The text a pair answers: its prompt, or its turns one a line; None if neither is well-formed."""
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"].strip()
    conv = rec.get("conversations")
    if isinstance(conv, list) and all(
        isinstance(t, dict) and isinstance(t.get("content"), str) for t in conv
    ):
        return "\n".join(t["content"].strip() for t in conv)
    return None


def _pair_problems(p: Pair) -> list[str]:
    """Keys, context, answers and kind of one pair."""
    rec, w, problems = p.rec, p.where, []
    context = [k for k in ("prompt", "conversations") if k in rec]
    extra = sorted(set(rec) - set(PAIR_KEYS) - {"prompt", "conversations"})
    missing = [k for k in PAIR_KEYS if k not in rec]
    if extra or missing or len(context) != 1:
        problems.append(
            f"{w}: keys {sorted(rec)}; a pair has exactly one of prompt/conversations, and chosen, rejected, kind"
        )
    if "prompt" in rec and (not isinstance(rec["prompt"], str) or not rec["prompt"].strip()):
        problems.append(f'{w}: "prompt" is not a non-empty string')
    if "conversations" in rec:
        problems += _turn_problems(w, rec["conversations"])
    answers = {k: rec[k] for k in ("chosen", "rejected") if k in rec}
    for name, text in answers.items():
        if not isinstance(text, str) or not text.strip():
            problems.append(f'{w}: "{name}" is not a non-empty string')
    keys = [near_key(a) for a in answers.values() if isinstance(a, str) and a.strip()]
    if len(keys) == 2 and keys[0] == keys[1]:
        problems.append(f"{w}: chosen and rejected are the same text (up to punctuation and spaces)")
    if "kind" in rec and rec["kind"] not in PAIR_KINDS:
        problems.append(f"{w}: kind {rec['kind']!r} is not one of {', '.join(PAIR_KINDS)}")
    return problems


def pair_texts(p: Pair) -> list[tuple[str, str, bool]]:
    """(where, text, must_be_long) of every string of a pair: prompt or turns, then chosen and rejected."""
    rec, units = p.rec, []
    if isinstance(rec.get("prompt"), str):
        units.append((f"{p.where} prompt", rec["prompt"], False))
    conv = rec.get("conversations")
    for k, t in enumerate(conv if isinstance(conv, list) else [], 1):
        if isinstance(t, dict) and isinstance(t.get("content"), str):
            units.append((f"{p.where} turn {k}", t["content"], t.get("role") == "assistant"))
    answers = [k for k in ("chosen", "rejected") if isinstance(rec.get(k), str) and rec[k].strip()]
    return units + [(f"{p.where} {k}", rec[k], True) for k in answers]  # a blank one is already a problem


def cjk_share(text: str) -> float:
    """CJK characters among the letters of ``text`` (1.0 when it has no letters: digits and signs only)."""
    letters = sum(1 for c in text if unicodedata.category(c).startswith("L"))
    return cjk_count(text) / letters if letters else 1.0


def check_pairs(pairs: list[Pair], lim: Limits) -> list[str]:
    problems = []
    if len(pairs) < lim.min_pairs:
        problems.append(f"preference pairs: {len(pairs)}, need ≥ {lim.min_pairs}")
    multi = sum(
        1 for p in pairs if isinstance(p.rec.get("conversations"), list) and len(p.rec["conversations"]) >= 3
    )
    if multi < lim.min_pair_conversations:
        problems.append(
            f"preference pairs: {multi} with a multi-turn context, need ≥ {lim.min_pair_conversations}"
        )
    for p in pairs:
        problems += _pair_problems(p)
    counts: dict[str, int] = {}
    for p in pairs:
        if p.rec.get("kind") in PAIR_KINDS:
            counts[p.rec["kind"]] = counts.get(p.rec["kind"], 0) + 1
    for kind, n in sorted(counts.items()):
        if n > lim.max_kind_share * len(pairs):
            problems.append(
                f"preference pairs: kind {kind!r} holds {n}/{len(pairs)} pairs ({n / len(pairs):.0%}), "
                f"more than {lim.max_kind_share:.0%}"
            )
    for where, text, _ in (u for p in pairs for u in pair_texts(p)):
        if (share := cjk_share(text)) < lim.min_cjk_share:
            problems.append(
                f"{where}: {share:.0%} of its letters are Chinese characters, need ≥ {lim.min_cjk_share:.0%}"
            )
    named = [(p.where, c) for p in pairs if (c := pair_context(p.rec)) is not None]
    return problems + check_duplicates(named)


def check_taught(pairs: list[Pair], dialogues: list[Dialogue]) -> list[str]:
    """A pair whose context opens a taught (SFT) dialogue must choose an answer taught after it."""
    taught: dict[str, tuple[str, set]] = {}
    for d in dialogues:
        for k, (role, content) in enumerate(d.turns):
            if role == "assistant" and k:
                where, answers = taught.setdefault("\n".join(c for _, c in d.turns[:k]), (d.where, set()))
                answers.add(content)
    problems = []
    for p in pairs:
        where, answers = taught.get(pair_context(p.rec), (None, None))
        chosen = p.rec.get("chosen")
        if answers and isinstance(chosen, str) and chosen.strip() not in answers:
            problems.append(
                f"{p.where}: its context is taught at {where}, but chosen is not the taught answer"
            )
    return problems


def check_texts(units: list[tuple[str, str, bool]], lim: Limits) -> list[str]:
    """Placeholder artifacts in every (where, text, must_be_long) unit; length where must_be_long."""
    problems = []
    for where, text, must_be_long in units:
        if m := ARTIFACT.search(text):
            problems.append(f"{where}: placeholder artifact {m.group()!r}")
        if must_be_long and len(text.strip()) < lim.min_chars:
            problems.append(f"{where}: text {text!r} is shorter than {lim.min_chars} characters")
    return problems


def check_corpus(root=DEFAULT_ROOT, lim: Limits | None = None) -> list[str]:
    """Every problem of the corpus under ``root``, as one-line messages; empty when it is fit to ship."""
    root, lim, problems = Path(root), lim or Limits(), []
    items = _read(root / "pretrain", _pretrain_item, problems)
    dialogues = _read(root / "sft", _dialogue, problems)
    pairs = _read(root / "dpo", _pair, problems)
    idioms = load_idioms(root / "idioms.tsv", problems)
    problems += check_pretrain(items, lim)
    problems += check_dialogues(dialogues, lim)
    problems += check_pairs(pairs, lim)
    problems += check_taught(pairs, dialogues)
    problems += check_idioms(idioms, items, lim)
    problems += check_duplicates([(i.where, i.text) for i in items])
    problems += check_duplicates([(d.where, "\n".join(c for _, c in d.turns)) for d in dialogues])
    units = [(i.where, i.text, True) for i in items]
    units += [
        (f"{d.where} turn {k}", c, r == "assistant") for d in dialogues for k, (r, c) in enumerate(d.turns, 1)
    ]
    units += [u for p in pairs for u in pair_texts(p)]
    units += [(where, meaning, False) for where, _, meaning in idioms]
    problems += check_texts(units, lim)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=str(DEFAULT_ROOT), help="corpus folder (default: the built-in corpus)"
    )
    root = Path(parser.parse_args(argv).root)
    problems = check_corpus(root)
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {root}" if problems else f"{root}: all corpus checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
