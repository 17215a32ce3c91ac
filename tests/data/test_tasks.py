"""The verifiable tasks: generated problems, their hash split, the rewards of right, wrong and malformed
replies, and the SFT warm-up corpus (read back by the SFT reader)."""

import re
import subprocess
import sys

import pytest

from rgpt.data.corpus import read_dialogues
from rgpt.data.tasks import FORMAT_BONUS, TASKS, Problem, draw, held_out, reward, split, warmup


def find(task, key):
    return next(p for p in TASKS[task].problems() if p.key == key)


def test_arithmetic_problems_are_right_and_phrased_as_the_sft_dialogues():
    probs = TASKS["arithmetic"].problems()
    assert len(probs) == 99 * 99 + 99 * 100 // 2  # every a + b, every a − b ≥ 0, a and b in 1..99
    p = find("arithmetic", "add:3:5")
    assert p.answer == "8" and p.reply == "3加5等于8。"
    assert p.prompt in {
        f.format(a=3, b=5)
        for f in (
            "{a}加{b}等于几？",
            "{a}加{b}是多少？",
            "{a}加{b}等于多少？",
            "帮我算{a}+{b}",
            "{a}+{b}等于几？",
        )
    }
    for p in probs:
        op, a, b = p.key.split(":")
        assert int(p.answer) == (int(a) + int(b) if op == "add" else int(a) - int(b)) >= 0
    assert len({p.prompt.replace("3", "").split("5")[0] for p in probs}) > 5  # several phrasings in use


STEPS_52_7 = "个位12减7得5，十位5减1减0得4，"
WORKED = re.compile(r"个位(\d+)([加减])(\d)得(\d+)，十位(\d)((?:[加减]\d)+)得(\d+)，等于(\d+)。")


def test_every_worked_reply_is_true_step_by_step_and_scores_full_marks():
    """The warm-up's replies: one-digit sums are the fact; the rest work column by column, and every step is
    checked here by parsing it back (the units column's digits are the operands', a borrow adds 10 to them and
    takes 1 from the tens, a carry adds 1, the tens and units make the result)."""
    for p in TASKS["arithmetic"].problems():
        op, a, b = p.key.split(":")
        a, b, sign = int(a), int(b), "加" if op == "add" else "减"
        assert reward(p, p.reply) == 1 + FORMAT_BONUS, p
        if a < 10 and b < 10:
            assert p.reply == f"{a}{sign}{b}等于{p.answer}。"
            continue
        m = WORKED.fullmatch(p.reply)
        assert m, p.reply
        x, s1, y, z, t, rest, u, total = m.groups()
        assert s1 == sign and int(y) == b % 10 and int(x) % 10 == a % 10 and int(t) == a // 10
        assert int(z) == (int(x) + int(y) if op == "add" else int(x) - int(y)) >= 0
        terms = re.findall(r"([加减])(\d)", rest)
        tens = int(t) + sum(int(d) if s2 == "加" else -int(d) for s2, d in terms)
        assert int(u) == tens >= 0 and total == p.answer
        if op == "add":
            assert int(x) == a % 10 and int(total) == 10 * tens + int(z) % 10
            assert [d for _, d in terms] == ([str(b // 10), "1"] if int(z) >= 10 else [str(b // 10)])
        else:
            borrow = int(x) >= 10
            assert int(x) == a % 10 + 10 * borrow and int(total) == 10 * tens + int(z)
            assert [d for _, d in terms] == (["1", str(b // 10)] if borrow else [str(b // 10)])


def test_idiom_problems_blank_one_character():
    probs = TASKS["idiom"].problems()
    assert len(probs) > 500
    for p in probs:
        word = p.prompt.removeprefix("补全成语：")
        assert word.count("__") == 1 and word.replace("__", p.answer) == p.key


@pytest.mark.parametrize(
    "task, key, reply, want",
    [
        ("arithmetic", "add:3:5", "3加5等于8。", 1 + FORMAT_BONUS),  # right, well-formed
        ("arithmetic", "add:3:5", "等于8。可以数一数：3、4、5……", 1.0),  # right, another form
        ("arithmetic", "add:3:5", "8", 1.0),  # right, bare
        ("arithmetic", "sub:52:7", "52减7等于45。", 1 + FORMAT_BONUS),  # the short form is well-formed too
        ("arithmetic", "sub:52:7", STEPS_52_7 + "等于45。", 1 + FORMAT_BONUS),  # worked, as taught
        ("arithmetic", "sub:52:7", STEPS_52_7 + "等于44。", FORMAT_BONUS),  # a slip at the end
        ("arithmetic", "sub:52:7", STEPS_52_7, 0.0),  # cut short: reads 12, malformed
        ("arithmetic", "add:3:5", "3加5等于9。", FORMAT_BONUS),  # wrong, well-formed
        ("arithmetic", "add:3:5", "我不知道。", 0.0),  # malformed: no number
        ("arithmetic", "add:3:5", "3加5等于", 0.0),  # malformed: reads the 3, which is wrong
        ("idiom", "画蛇添足", "足", 1 + FORMAT_BONUS),
        ("idiom", "画蛇添足", "“画蛇添足”。", 1 + FORMAT_BONUS),
        ("idiom", "画蛇添足", "是画蛇添足，比喻做了多余的事。", 1.0),  # right, but too long for the form
        ("idiom", "画蛇添足", "手", FORMAT_BONUS),  # wrong, well-formed
        ("idiom", "画蛇添足", "12", 0.0),  # malformed
        ("idiom", "画蛇添足", "", 0.0),
    ],
)
def test_rewards(task, key, reply, want):
    p = find(task, key)
    if task == "idiom":  # the blank's place is drawn by hash; rebuild the problem with the last one blanked
        p = Problem("idiom", key, "补全成语：画蛇添__", "足", "足")
    assert reward(p, reply) == pytest.approx(want)


def test_split_by_hash_is_stable_and_disjoint():
    for task in TASKS:
        train, val = split(task)
        assert {p.key for p in train}.isdisjoint({p.key for p in val})
        assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
        assert split(task) == (train, val)
    # every phrasing of a held-out problem is held out: the key, not the prompt, decides
    train, _ = split("arithmetic")
    assert all(p.key.startswith(("add:", "sub:")) for p in train)


def test_draw_depends_on_its_key_only_and_mixes_the_tasks():
    pools = [split("arithmetic")[0], split("idiom")[0]]
    assert draw(pools, 8, 1, 0, 5) == draw(pools, 8, 1, 0, 5)
    assert draw(pools, 8, 1, 0, 5) != draw(pools, 8, 1, 0, 6) != draw(pools, 8, 2, 0, 5)
    tasks = [p.task for p in draw(pools, 400, 0)]
    assert 150 < tasks.count("idiom") < 250  # half and half, though arithmetic has 30 times the problems


def test_warmup_corpus_is_read_by_the_sft_reader(tmp_path):
    out = tmp_path / "warmup.jsonl"
    assert warmup(out, per_task=20, seed=3) == 40
    dialogues = list(read_dialogues([out]))
    assert len(dialogues) == 40
    _, val = split("arithmetic")
    held_out = {p.prompt for p in val} | {p.prompt for p in split("idiom")[1]}
    for turns in dialogues:
        (r1, q), (r2, a) = turns
        assert (r1, r2) == ("user", "assistant") and q not in held_out
    cli = tmp_path / "cli.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "rgpt.data.tasks", "warmup", str(cli), "--per-task", "5"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert len(cli.read_text().splitlines()) == 10


def test_held_out_is_each_tasks_val_split_in_a_fixed_mixed_order():
    first = held_out(limit=5)
    assert [p.task for p in first] == ["arithmetic"] * 5 + ["idiom"] * 5
    assert first == held_out(limit=5) and held_out(["idiom"], 5) == first[5:]
    assert len({p.key.split(":")[1] for p in first[:5]}) > 1, "the first ones are not all 1加…"
    assert {p.key for p in held_out()} == {p.key for t in TASKS for p in split(t)[1]}
