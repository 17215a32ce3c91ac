"""Corpus quality: the built-in corpus passes scripts/check_corpus.py, and the checker catches each defect."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "check_corpus", Path(__file__).parents[2] / "scripts" / "check_corpus.py"
)
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)

# Limits a tiny corpus can meet, so that each test below shows exactly the problems its defect causes.
TINY = cc.Limits(
    min_pretrain_items=8,
    min_pretrain_cjk=50,
    max_topic_share=0.15,
    min_dialogues=3,
    min_dialogue_cjk=20,
    min_multi_turn=1,
    min_idioms=3,
    min_idioms_in_pretrain=1,
    min_pairs=5,
    min_pair_conversations=1,
    max_kind_share=0.45,
    min_cjk_share=0.5,
)
TOPICS = ["历史", "地理", "科学", "文学", "健康", "社会", "艺术", "体育"]
PRETRAIN = [{"text": f"这是关于{t}的第一篇短文，内容完整而且通顺。", "topic": t} for t in TOPICS]
PRETRAIN[0]["text"] = "他做事总是画蛇添足，反而把事情弄糟了。"
DIALOGUES = [
    [("user", "你好，请介绍一下自己。"), ("assistant", "我是一个小小的中文语言模型。")],
    [("user", "北京是哪个国家的首都？"), ("assistant", "北京是中国的首都。")],
    [
        ("user", "打折后多少钱？"),
        ("assistant", "请告诉我原价。"),
        ("user", "兔子。"),
        ("assistant", "兔子不是价格，请再说一次。"),
    ],
]
IDIOMS = "画蛇添足\t比喻做了多余的事。\n守株待兔\t比喻死守经验。\n亡羊补牢\t出了问题及时补救。\n"


def conv(turns):
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


def pair(prompt, chosen, rejected, kind):
    context = {"prompt": prompt} if isinstance(prompt, str) else conv(prompt)
    return {**context, "chosen": chosen, "rejected": rejected, "kind": kind}


# One pair of each kind; the multi-turn one continues a dialogue that is not taught, so any chosen goes.
PAIRS = [
    pair("法国的首都是哪里？", "法国的首都是巴黎。", "法国的首都是里昂。", "wrong_fact"),
    pair("怎么煮鸡蛋？", "水开后再煮八分钟左右。", "这个问题我不能回答。", "refusal"),
    pair("一加一等于几？", "一加一等于二。", "数学是一门古老的学科，历史很悠久。", "rambling"),
    pair("写一句描写春天的话。", "春风吹绿了柳枝。", "春天春天春天春天春天。", "repetition"),
    pair(
        [("user", "今天吃什么？"), ("assistant", "你想吃米饭还是面条？"), ("user", "面条。")],
        "可以煮一碗番茄鸡蛋面。",
        "吃什么都行吧。",
        "unhelpful",
    ),
]


def make(root: Path, pretrain=None, dialogues=None, idioms=IDIOMS, pairs=None) -> Path:
    (root / "pretrain").mkdir(parents=True)
    (root / "sft").mkdir()
    (root / "dpo").mkdir()
    lines = [json.dumps(x, ensure_ascii=False) for x in (PAIRS if pairs is None else pairs)]
    (root / "dpo" / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = [json.dumps(x, ensure_ascii=False) for x in (PRETRAIN if pretrain is None else pretrain)]
    (root / "pretrain" / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = [json.dumps(conv(d), ensure_ascii=False) for d in (DIALOGUES if dialogues is None else dialogues)]
    (root / "sft" / "s.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "idioms.tsv").write_text(idioms, encoding="utf-8")
    return root


def only_problem(root, expect, lim=TINY):
    problems = cc.check_corpus(root, lim)
    assert len(problems) == 1 and expect in problems[0], (
        f"expected one problem containing {expect!r}, got {problems}"
    )


def test_builtin_corpus_passes_every_check():
    problems = cc.check_corpus(cc.DEFAULT_ROOT)
    assert not problems, f"{len(problems)} corpus problems, first ones:\n" + "\n".join(problems[:30])


def test_tiny_good_corpus_passes(tmp_path):
    assert cc.check_corpus(make(tmp_path), TINY) == []
    assert cc.main(["--root", str(tmp_path)]) == 1, "the default limits must reject a tiny corpus"


@pytest.mark.parametrize(
    "limit, expect",
    [
        ("min_pretrain_items", "pretraining: 8 distinct items, need ≥ 9"),
        ("min_dialogues", "dialogues: 3, need ≥ 4"),
        ("min_multi_turn", "dialogues: 1 with ≥ 2 user turns, need ≥ 2"),
        ("min_idioms", "idioms: 3 entries, need ≥ 4"),
        ("min_idioms_in_pretrain", "idioms: 1 of them occur in pretraining text, need ≥ 2"),
        ("min_pairs", "preference pairs: 5, need ≥ 6"),
        ("min_pair_conversations", "preference pairs: 1 with a multi-turn context, need ≥ 2"),
    ],
)
def test_counts_below_the_limit(tmp_path, limit, expect):
    only_problem(make(tmp_path), expect, replace(TINY, **{limit: getattr(TINY, limit) + 1}))


def test_cjk_character_counts(tmp_path):
    problems = cc.check_corpus(make(tmp_path), replace(TINY, min_pretrain_cjk=10**6, min_dialogue_cjk=10**6))
    assert [p.split(":")[0] + ": " + p.split(" ")[-1] for p in problems] == [
        "pretraining: 1000000",
        "dialogues: 1000000",
    ]


def test_topic_imbalance_and_missing_topic(tmp_path):
    pre = [dict(p) for p in PRETRAIN]
    pre[1]["topic"] = pre[0]["topic"]
    only_problem(make(tmp_path / "a", pretrain=pre), "topic '历史' holds 2/8 items (25%), more than 15%")
    del pre[1]["topic"]
    only_problem(make(tmp_path / "b", pretrain=pre), 'p.jsonl:2: no "topic" field')


def test_exact_and_near_duplicates(tmp_path):
    dup = {"text": PRETRAIN[1]["text"], "topic": "经济"}
    near = {"text": PRETRAIN[2]["text"].replace("，", " ").replace("。", "！"), "topic": "音乐"}
    problems = cc.check_corpus(make(tmp_path, pretrain=PRETRAIN + [dup, near]), TINY)
    assert problems == [
        f"{tmp_path}/pretrain/p.jsonl:9: exact duplicate of {tmp_path}/pretrain/p.jsonl:2",
        f"{tmp_path}/pretrain/p.jsonl:10: near-duplicate of {tmp_path}/pretrain/p.jsonl:3 (differs only in punctuation or spaces)",
    ]
    only_problem(make(tmp_path / "d", dialogues=DIALOGUES + [DIALOGUES[0]]), "s.jsonl:4: exact duplicate of")


@pytest.mark.parametrize(
    "turns, expect",
    [
        ([("assistant", "我先说一句话。"), ("user", "好的好的。")], "turns go assistant/user"),
        (
            [("user", "你好你好。"), ("user", "在吗在吗？"), ("assistant", "我在这里呢。")],
            "turns go user/user/assistant",
        ),
        (
            [("user", "你好你好。"), ("assistant", "你好呀朋友。"), ("user", "再见再见。")],
            "turns go user/assistant/user",
        ),
        ([("user", "你好你好。"), ("system", "规则如下。")], "each must be 'user' or 'assistant'"),
        ([], "turns go nowhere"),
        ([("user", ""), ("assistant", "你想问什么？")], "s.jsonl:4: turn 1 is empty"),
    ],
)
def test_dialogue_shape(tmp_path, turns, expect):
    only_problem(make(tmp_path, dialogues=DIALOGUES + [turns]), expect)


@pytest.mark.parametrize(
    "line, expect",
    [
        ("画蛇添\t三个字。\n", "idiom '画蛇添' is not 4 CJK characters"),
        ("abcd\t拉丁字母。\n", "idiom 'abcd' is not 4 CJK characters"),
        ("对牛弹琴\n", "idiom '对牛弹琴' has no meaning"),
        ("守株待兔\t又一次。\n", "idiom '守株待兔' already listed at"),
    ],
)
def test_bad_idiom_entries(tmp_path, line, expect):
    only_problem(make(tmp_path, idioms=IDIOMS + line), expect)


@pytest.mark.parametrize("artifact", ["XXX", "TODO", "{name}", "Lorem", "xxxx", "placeholder"])
def test_placeholder_artifacts(tmp_path, artifact):
    pre = [dict(p) for p in PRETRAIN]
    pre[3]["text"] = f"这是一段{artifact}还没有写完的文字。"
    only_problem(make(tmp_path, pretrain=pre), f"p.jsonl:4: placeholder artifact {artifact!r}")


def test_latin_words_containing_placeholder_letters_are_fine(tmp_path):
    pre = [dict(p) for p in PRETRAIN]
    pre[3]["text"] = "英文单词 today 和 Texas 以及 toxxxic 都不是占位符。"
    assert cc.check_corpus(make(tmp_path, pretrain=pre), TINY) == []


def test_short_texts(tmp_path):
    pre = [dict(p) for p in PRETRAIN]
    pre[4]["text"] = "好。"
    only_problem(make(tmp_path / "a", pretrain=pre), "p.jsonl:5: text '好。' is shorter than 4 characters")
    short_answer = [("user", "你是谁？"), ("assistant", "我。")]
    only_problem(
        make(tmp_path / "b", dialogues=DIALOGUES + [short_answer]), "s.jsonl:4 turn 2: text '我。' is shorter"
    )


def test_unreadable_files_are_problems_not_crashes(tmp_path):
    root = make(tmp_path)
    with open(root / "pretrain" / "p.jsonl", "ab") as f:
        f.write('{"text": "坏'.encode() + b"\xff\xfe" + b'", "topic": "x"}\n')
    (root / "sft" / "t.jsonl").write_text('{"conversations": [}\n', encoding="utf-8")
    problems = cc.check_corpus(root, TINY)
    assert any("p.jsonl:9: not valid UTF-8 at byte offset" in p for p in problems), problems
    assert any("t.jsonl:1:20: malformed JSON" in p for p in problems), problems


def test_builtin_preference_set_is_large_balanced_and_partly_taught():
    pairs = cc._read(cc.DEFAULT_ROOT / "dpo", cc._pair, [])
    kinds = [p.rec["kind"] for p in pairs]
    assert len(pairs) >= 300 and set(kinds) == set(cc.PAIR_KINDS), (len(pairs), set(kinds))
    assert max(map(kinds.count, cc.PAIR_KINDS)) == kinds.count("wrong_fact"), (
        "wrong facts are the largest share"
    )
    assert sum("conversations" in p.rec for p in pairs) >= 30
    dialogues = cc._read(cc.DEFAULT_ROOT / "sft", cc._dialogue, [])
    taught = {"\n".join(c for _, c in d.turns[:k]) for d in dialogues for k in range(1, len(d.turns), 2)}
    share = sum(cc.pair_context(p.rec) in taught for p in pairs) / len(pairs)
    assert 0.3 < share < 0.7, f"{share:.0%} of the pairs continue a taught dialogue; about half should"


def bad_pair(**changes):
    """A fresh, valid pair (its own prompt) with ``changes`` applied; a value of None drops that key."""
    rec = pair("中国的首都是哪里？", "中国的首都是北京。", "中国的首都是上海。", "wrong_fact") | changes
    return {k: v for k, v in rec.items() if v is not None}


TURNS = [("user", "在吗？"), ("assistant", "在的，有什么事？"), ("user", "借我一支笔。")]


@pytest.mark.parametrize(
    "rec, expect",
    [
        (
            bad_pair(extra="多余"),
            "d.jsonl:6: keys ['chosen', 'extra', 'kind', 'prompt', 'rejected']; a pair has",
        ),
        (bad_pair(kind=None), "d.jsonl:6: keys ['chosen', 'prompt', 'rejected']; a pair has exactly one"),
        (bad_pair(**conv(TURNS)), "keys ['chosen', 'conversations', 'kind', 'prompt', 'rejected']"),
        (bad_pair(prompt=None), "d.jsonl:6: keys ['chosen', 'kind', 'rejected']"),
        (bad_pair(prompt="  "), 'd.jsonl:6: "prompt" is not a non-empty string'),
        (bad_pair(chosen=""), 'd.jsonl:6: "chosen" is not a non-empty string'),
        (bad_pair(rejected=7), 'd.jsonl:6: "rejected" is not a non-empty string'),
        (bad_pair(rejected="中国的首都是北京！"), "d.jsonl:6: chosen and rejected are the same text"),
        (bad_pair(kind="rude"), "d.jsonl:6: kind 'rude' is not one of wrong_fact, refusal, rambling"),
        (bad_pair(rejected="I do not know."), "d.jsonl:6 rejected: 0% of its letters are Chinese characters"),
        (bad_pair(chosen="中国的首都是北京，TODO。"), "d.jsonl:6 chosen: placeholder artifact 'TODO'"),
        (bad_pair(rejected="上海。"), "d.jsonl:6 rejected: text '上海。' is shorter than 4 characters"),
        (bad_pair(prompt=PAIRS[0]["prompt"]), "d.jsonl:6: exact duplicate of"),
        (bad_pair(prompt="法国的首都是哪里"), "d.jsonl:6: near-duplicate of"),
        (bad_pair(prompt="你好，请介绍一下自己。"), "d.jsonl:6: its context is taught at"),
    ],
)
def test_pair_defects(tmp_path, rec, expect):
    only_problem(make(tmp_path, pairs=PAIRS + [rec]), expect)


@pytest.mark.parametrize(
    "turns, expect",
    [
        (
            TURNS[:2],
            "turns go user/assistant; they must alternate user/assistant, starting and ending with user",
        ),
        (TURNS[1:], "turns go assistant/user"),
        ([TURNS[0], ("system", "规则如下。"), TURNS[2]], "turns go user/system/user"),
        ([], "turns go nowhere"),
        ([("user", "")], "d.jsonl:6: turn 1 is empty"),
    ],
)
def test_pair_conversation_shape(tmp_path, turns, expect):
    only_problem(make(tmp_path, pairs=PAIRS + [bad_pair(prompt=None, **conv(turns))]), expect)


@pytest.mark.parametrize(
    "conversations",
    ["在吗？", ["在吗？"], [{"role": "user"}], [{"role": "user", "content": "在吗？", "name": "甲"}]],
)
def test_pair_conversations_not_turn_objects(tmp_path, conversations):
    rec = bad_pair(prompt=None, conversations=conversations)
    only_problem(
        make(tmp_path, pairs=PAIRS + [rec]), '"conversations" is not a list of {"role", "content"} objects'
    )


def test_kind_imbalance(tmp_path):
    pairs = [dict(p) for p in PAIRS]
    pairs[1]["kind"] = pairs[2]["kind"] = "wrong_fact"
    only_problem(make(tmp_path, pairs=pairs), "kind 'wrong_fact' holds 3/5 pairs (60%), more than 45%")


def test_preference_text_files_and_a_missing_folder(tmp_path):
    root = make(tmp_path / "a")
    (root / "dpo" / "e.txt").write_text("用户：你好\n", encoding="utf-8")
    only_problem(root, "e.txt:1: a preference pair must be a JSON object, not a line of text")
    root = make(tmp_path / "b")
    (root / "dpo" / "d.jsonl").unlink()
    (root / "dpo").rmdir()
    problems = cc.check_corpus(root, TINY)
    assert problems[0] == f"{root}/dpo: no such file or directory", problems
    assert problems[1:] == [
        "preference pairs: 0, need ≥ 5",
        "preference pairs: 0 with a multi-turn context, need ≥ 1",
    ]
