"""python -m rgpt.eval on the tiny trained checkpoint: the JSON line against numbers computed here by
hand, the sliding window, the SFT reply metrics and the error cases."""

import json
import math
import random

import pytest
import torch

from rgpt.data import CorpusError
from rgpt.data.tasks import held_out
from rgpt.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer
from rgpt.inference.evaluate import EvalConfig, EvalData, Scorer, char_f1, evaluate, windows
from rgpt.inference.generate import DecodeConfig, generate
from rgpt.inference.verify import answers
from rgpt.nn.model import GPT, GPTConfig
from rgpt.settings import ConfigError, load
from tests import fixtures_ckpt
from tests.fixtures_ckpt import ANSWERS, run_cli, trained
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread

KEYS = ["tokens", "chars", "loss", "ppl", "bpc", "unk_rate"]


def last_json(stdout: str) -> dict:
    lines = stdout.rstrip("\n").split("\n")
    assert len(lines) > 1, "a human-readable summary comes before the JSON line"
    return json.loads(lines[-1])


def expected_lm(passages):
    """The metrics computed directly: one full forward per passage (each fits the 64-token window)."""
    model, tok, _ = trained()
    nll, tokens, unk, chars = 0.0, 0, 0, 0
    for text in passages:
        ids = [BOS_ID, *tok.encode(text), EOS_ID]
        logp = torch.log_softmax(model.forward(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
        nll -= float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        tokens, unk, chars = tokens + len(ids) - 1, unk + ids.count(UNK_ID), chars + len(text)
    return {"tokens": tokens, "chars": chars, "loss": nll / tokens, "bpc": nll / math.log(2) / chars}, unk


def test_lm_json_line_on_a_file_with_known_content(tiny_run, tmp_path):
    out_dir, _ = tiny_run
    passages = [ANSWERS["山脉是如何形成的？"], "一年有四个季节。", "龘的沸点"]  # 龘 is not in the vocabulary
    (tmp_path / "val.txt").write_text(
        "\n".join(passages[:2]) + "\n\n  \n" + passages[2] + "\n", encoding="utf-8"
    )
    proc = run_cli("eval", f"out_dir={out_dir}", "data.path=val.txt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = last_json(proc.stdout)
    assert list(got) == KEYS
    want, unk = expected_lm(passages)
    assert (got["tokens"], got["chars"]) == (want["tokens"], want["chars"]) == (want["tokens"], 8 + 14 + 4)
    for key in ("loss", "bpc"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["ppl"] == pytest.approx(math.exp(want["loss"]), rel=1e-5)
    assert unk == 1 and got["unk_rate"] == pytest.approx(1 / want["tokens"])
    assert "3 passages" in proc.stdout and "bits/character" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.txt"], "eval must write no files"


@pytest.mark.parametrize(
    "how", [[], ["reply_batch=1"], ["precision=bf16"]], ids=["batched", "one-by-one", "bf16"]
)
def test_sft_reports_exact_match_and_char_f1(tiny_run, tmp_path, how):
    """The replies decoded 32 at a time (the default), one by one, and in bf16: the same scores."""
    out_dir, ckpt = tiny_run
    dialogues = [d for d in fixtures_ckpt.DIALOGUES if len(d) == 2 and d[0][1] != "一年有几个季节？"]
    dialogues += [[("user", "一年有几个季节？"), ("assistant", "一年有五个季节。")]]  # a wrong reference
    dialogues += [fixtures_ckpt.DIALOGUES[-1]]  # two turns: two prompts, the second with history
    lines = [
        json.dumps({"conversations": [{"role": r, "content": c} for r, c in d]}, ensure_ascii=False)
        for d in dialogues
    ]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_cli("eval", f"checkpoint={ckpt}", "data.path=sft.jsonl", "task=sft", *how, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = last_json(proc.stdout)
    assert list(got) == KEYS + ["exact_match", "char_f1"]
    n = len(dialogues) + 1  # prompts
    assert got["exact_match"] == pytest.approx((n - 1) / n), proc.stdout
    assert got["char_f1"] == pytest.approx((n - 1 + 7 / 8) / n), "四 vs 五: 7 of 8 characters shared"
    assert got["unk_rate"] > 0, "五 is outside the vocabulary"
    assert f"over {n} prompts" in proc.stdout


def test_bare_command_scores_the_builtin_corpus(tiny_run, tmp_path):
    """`python -m rgpt.eval` as users type it: the built-in pretraining text, the newest run's model."""
    out_dir, _ = tiny_run
    proc = run_cli("eval", f"out_dir={out_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = last_json(proc.stdout)
    assert got["chars"] > 50_000 and got["tokens"] > 0 and "corpus/pretrain" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.path=null"], "data.path is required"),
        (["data.path=nothing.txt"], "nothing.txt: no such file or directory"),
        (["data.path=sft.jsonl"], "for an instruction set use task=sft"),
        (["data.path=sft.jsonl", "out_dir=nowhere", "checkpoint=null"], "python -m rgpt.train"),
    ],
)
def test_errors_are_a_clear_message_and_status_1(tiny_run, tmp_path, args, message):
    out_dir, _ = tiny_run
    (tmp_path / "sft.jsonl").write_text(
        '{"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}\n',
        encoding="utf-8",
    )
    proc = run_cli("eval", f"out_dir={out_dir}", *args, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_verify_reports_each_tasks_held_out_accuracy(tiny_run, tmp_path):
    out_dir, ckpt = tiny_run
    proc = run_cli(
        "eval", f"checkpoint={ckpt}", "task=verify", "max_problems=3", "max_new_tokens=6", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    got = last_json(proc.stdout)
    assert list(got) == ["arithmetic", "idiom"], got
    for r in got.values():
        assert r["n"] == 3 and 0 <= r["accuracy"] <= 1 and 0 <= r["reward"] <= 1.1, got
    assert "over 3 held-out problems" in proc.stdout and list(tmp_path.iterdir()) == []


def test_bad_settings_name_the_key():
    for bad, key in [
        ({"task": "qa"}, "task"),
        ({"batch_size": 0}, "batch_size"),
        ({"task": "verify", "max_problems": 0}, "max_problems"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
        ({"colour": 1}, "colour"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load(EvalConfig, {"data": {"path": "x.txt"}, **bad})


def test_empty_corpus_is_a_corpus_error(tmp_path):
    model, tok, _ = trained()
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty corpus"):
        evaluate(model, tok, EvalConfig(data=EvalData(str(tmp_path / "empty.txt"))), progress=False)


# ---- the sliding window ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, block", [(1, 8), (2, 8), (9, 8), (10, 8), (30, 8), (101, 16), (7, 1), (40, 3)])
def test_windows_score_every_token_once_with_half_a_window_of_context(n, block):
    rng = random.Random(n * 100 + block)
    ids = [rng.randrange(6, 50) for _ in range(n)]
    scored = [False] + [rng.random() < 0.8 for _ in range(n - 1)]
    seen, start = [], 0
    for k, (inputs, targets) in enumerate(windows(ids, scored, block)):
        assert 1 <= len(inputs) == len(targets) <= block
        start = next(s for s in range(n) if ids[s : s + len(inputs)] == inputs and s >= start)
        for j, t in enumerate(targets):
            if t != -100:
                i = start + j + 1  # the position this target predicts
                assert t == ids[i] and scored[i]
                assert k == 0 or j + 1 >= block // 2, (
                    f"position {i} scored with only {j + 1} tokens of context"
                )
                seen.append(i)
    assert sorted(seen) == [i for i in range(1, n) if scored[i]], "each scored position exactly once"


def test_scorer_batching_and_sliding_agree_with_direct_computation():
    cfg = GPTConfig(vocab_size=30, n_embd=16, n_head=2, n_layer=2, n_hidden=24, block_size=10, dropout=0.0)
    model = GPT(cfg, dtype=torch.float64)
    model.eval()
    seqs = [torch.randint(0, 30, (n,)).tolist() for n in (2, 11, 5, 37, 10, 64)]
    results = []
    for batch_size in (1, 4):
        scorer = Scorer(model, batch_size)
        for ids in seqs:
            scorer.add(ids, [False] + [True] * (len(ids) - 1))
        scorer.flush()
        results.append((scorer.nll, scorer.tokens))
    assert results[0][1] == results[1][1] == sum(len(s) - 1 for s in seqs)
    assert_close(results[0][0], results[1][0], "NLL with batch 1 vs batch 4 (padding must not leak)")
    short = Scorer(model, 2)  # what fits the window: one forward, every token scored
    short.add(seqs[1], [False] + [True] * 10)
    short.flush()
    logp = torch.log_softmax(model.forward(torch.tensor([seqs[1][:-1]])), dim=-1)[0]
    assert_close(short.nll, -logp.gather(1, torch.tensor(seqs[1][1:])[:, None]).sum(), "NLL vs forward")


def test_a_passage_longer_than_the_window_is_scored_in_full(tmp_path):
    model, tok, _ = trained()
    text = "山脉主要由板块碰撞挤压形成。一年有四个季节。" * 8  # 104 tokens through a 64-token window
    (tmp_path / "long.txt").write_text(text + "\n", encoding="utf-8")
    got = evaluate(model, tok, EvalConfig(data=EvalData(str(tmp_path / "long.txt"))), progress=False)
    assert got["tokens"] == len(tok.encode(text)) + 1 > 64 + 32 and got["chars"] == len(text)
    assert math.isfinite(got["loss"]) and got["bpc"] == pytest.approx(
        got["loss"] * got["tokens"] / math.log(2) / len(text)
    )


# ---- reply metrics --------------------------------------------------------------------------------------
def test_char_f1():
    assert char_f1("一年有四个季节。", "一年有四个季节。") == 1.0
    assert char_f1("一年有四个季节。", "一年有五个季节。") == pytest.approx(7 / 8)
    assert char_f1("好好", "好") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))  # multiset: one 好 shared
    assert char_f1("", "答案") == 0.0 and char_f1("", "") == 1.0 and char_f1("甲", "乙") == 0.0


def test_every_decoding_setting_reaches_eval_from_the_one_list():
    """DecodeConfig's fields are eval's keys too: no second list to forget one in."""
    cfg = load(
        EvalConfig,
        {
            "data": {"path": "x.txt"},
            "method": "beam",
            "beam_width": 3,
            "min_new_tokens": 2,
            "max_new_tokens": 7,
        },
    )
    assert (cfg.decode.method, cfg.decode.beam_width, cfg.decode.min_new_tokens) == ("beam", 3, 2)
    assert cfg.decode.max_new_tokens == 7
    assert load(EvalConfig, {"data": {"path": "x.txt"}}).decode == DecodeConfig(), "defaults: greedy"


def test_verify_decodes_together_what_it_decodes_one_by_one():
    """task=verify's replies come from the batched decoder: the same replies as greedy generate() one problem
    at a time (slots 1, 3 and 32), prompts near the block size cut shorter, in the problems' order."""
    problems = held_out(limit=12)
    tok = Tokenizer.build([t for p in problems for t in (p.prompt, p.reply)], min_freq=1, idioms=())
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_embd=32, n_head=4, n_layer=2, n_hidden=64, block_size=16)
    model = GPT(cfg, dtype=torch.float64)
    for w in model.params.values():  # untrained matrices 15 times larger: replies that differ
        if w.dim() > 1:
            w.normal_(0, 0.3)
    model.eval()
    want, cuts = [], []
    for p in problems:
        prompt = tok.encode_prompt([("user", p.prompt)])
        cuts.append(max(1, min(8, cfg.block_size + 1 - len(prompt))))
        greedy = DecodeConfig(method="greedy", max_new_tokens=cuts[-1])
        want.append(tok.decode(generate(model, prompt, greedy)))
    # distinct replies; some prompts near the block size cut short, the others not
    assert len(set(want)) > 12 and min(cuts) < max(cuts) == 8, (want, cuts)
    for slots in (1, 3, 32):
        assert answers(model, tok, problems, 8, slots) == want, slots
