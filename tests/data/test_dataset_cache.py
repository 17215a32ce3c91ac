"""Token sets: windows, splits, and the on-disk cache (hit, miss, invalidation)."""

import json
from dataclasses import replace

import numpy as np
import pytest

import rgpt.data.dataset as dataset
from rgpt.data import CorpusError, DataConfig, build_tokenizer, prepare
from rgpt.data.tokenizer import BOS_ID, EOS_ID, Tokenizer

DOCS = [f"第{i}篇：今天天气很好，我们去公园散步，看见了{i % 7}只小猫。" for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.build(DOCS + ["用户助手问答好的"], min_freq=2, idioms=())


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


class Log(list):
    def __call__(self, msg):
        self.append(msg)


def run(cfg, tok, tmp_path, block_size=64):
    log = Log()
    train, val = prepare(replace(cfg, cache_dir=tmp_path / "cache"), tok, block_size, log=log)
    assert len(log) == 1, f"expected one log line, got {log}"
    return train, val, log[0]


def all_ids(ds):
    return [ds.get(i)[0].tolist() for i in range(len(ds))]


def test_second_run_is_a_cache_hit_that_reads_no_corpus(tmp_path, tok, monkeypatch):
    cfg = DataConfig([write_lines(tmp_path / "p.txt", DOCS)], "pretrain", val_fraction=0.2)
    train, val, msg = run(cfg, tok, tmp_path)
    assert msg.startswith("tokenized 40 docs") and "chars/s" in msg and "<unk> rate 0.000%" in msg, msg
    assert len(train) + len(val) == 40 and len(val) > 0
    assert isinstance(train.ids, np.memmap) and train.ids.dtype == np.int32
    assert train.mask.dtype == np.uint8 and train.offsets.dtype == np.int64

    monkeypatch.setattr(
        dataset, "read_pretrain", lambda paths: pytest.fail("cache hit must not read the corpus")
    )
    train2, val2, msg2 = run(cfg, tok, tmp_path)
    assert msg2.startswith("data cache hit") and "tokenization skipped" in msg2, msg2
    assert all_ids(train2) == all_ids(train) and all_ids(val2) == all_ids(val)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [train.root.name], "temp dir left behind"


@pytest.mark.parametrize(
    "change",
    ["file", "block_size", "val_fraction", "tokenizer", "assistant_only_loss", "file_order", "pack"],
)
def test_any_change_invalidates_the_cache(tmp_path, tok, change):
    a = write_lines(tmp_path / "a.txt", DOCS[:20])
    b = write_lines(tmp_path / "b.txt", DOCS[20:])
    cfg = DataConfig([a, b], "pretrain", val_fraction=0.2)
    run(cfg, tok, tmp_path)
    block_size = 64
    if change == "file":
        write_lines(tmp_path / "b.txt", DOCS[20:] + ["新加的一篇文章。"])
    elif change == "block_size":
        block_size = 32
    elif change == "val_fraction":
        cfg.val_fraction = 0.3
    elif change == "tokenizer":
        tok = Tokenizer.build(DOCS, min_freq=3, idioms=())
    elif change == "assistant_only_loss":
        cfg.assistant_only_loss = False
    elif change == "file_order":
        cfg.files = [b, a]
    elif change == "pack":
        cfg.pack = True
    _, _, msg = run(cfg, tok, tmp_path, block_size)
    assert msg.startswith("tokenized"), f"changing {change} did not invalidate the cache: {msg}"


def test_long_documents_become_overlapping_windows(tmp_path, tok):
    long_doc = "".join(DOCS[:5])
    cfg = DataConfig(
        [write_lines(tmp_path / "t.txt", [long_doc])],
        "pretrain",
        val_files=[write_lines(tmp_path / "v.txt", DOCS[:1])],
    )
    block_size = 16
    train, _, _ = run(cfg, tok, tmp_path, block_size)
    whole = tok.encode_pretrain(long_doc)
    windows = all_ids(train)
    assert len(windows) == -(-(len(whole) - 1) // block_size) > 1
    assert max(map(len, windows)) == block_size + 1
    assert windows[0][0] == BOS_ID and windows[-1][-1] == EOS_ID
    assert all(w[0] != BOS_ID for w in windows[1:]) and all(w[-1] != EOS_ID for w in windows[:-1])
    for w, nxt in zip(windows, windows[1:]):
        assert w[-1] == nxt[0], "consecutive windows must overlap by exactly one token"
    rebuilt = windows[0] + [t for w in windows[1:] for t in w[1:]]
    assert rebuilt == whole, (
        "windows do not reassemble the document: every target must be predicted exactly once"
    )
    assert train.stats["n_targets"] == len(whole) - 1


def test_validation_split_is_by_document_hash(tmp_path, tok):
    cfg = DataConfig([write_lines(tmp_path / "a.txt", DOCS)], "pretrain", val_fraction=0.25)
    _, val, _ = run(cfg, tok, tmp_path)
    before = {tuple(ids) for ids in all_ids(val)}
    extra = [f"另外一篇，编号{i}，天气很好。" for i in range(30)]
    cfg.files.append(write_lines(tmp_path / "b.txt", extra))
    _, val2, _ = run(cfg, tok, tmp_path)
    after = {tuple(ids) for ids in all_ids(val2)}
    assert before <= after and len(after) > len(before), "adding a file moved documents between splits"
    assert 0.1 < len(val2) / 70 < 0.4, f"val share {len(val2) / 70:.2f} far from val_fraction 0.25"


def test_val_files_are_the_validation_set(tmp_path, tok):
    cfg = DataConfig(
        [write_lines(tmp_path / "t.txt", DOCS[:30])],
        "pretrain",
        val_files=[write_lines(tmp_path / "v.txt", DOCS[30:])],
    )
    train, val, _ = run(cfg, tok, tmp_path)
    assert (len(train), len(val)) == (30, 10)
    assert val.n_chars == sum(len(d) for d in DOCS[30:])


@pytest.mark.parametrize("fraction, split", [(1e-12, "val"), (1 - 1e-12, "train")])
def test_empty_split_is_an_error(tmp_path, tok, fraction, split):
    cfg = DataConfig([write_lines(tmp_path / "t.txt", DOCS)], "pretrain", val_fraction=fraction)
    with pytest.raises(CorpusError, match=f"empty {split} split of .*t.txt"):
        prepare(replace(cfg, cache_dir=tmp_path / "cache"), tok, 64, log=lambda m: None)
    assert list((tmp_path / "cache").iterdir()) == [], "a failed preparation left files in the cache"


def test_sft_masks_and_learned_characters(tmp_path, tok):
    conv = {"conversations": [{"role": "user", "content": "问答"}, {"role": "assistant", "content": "好的"}]}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(conv, ensure_ascii=False) + "\n", encoding="utf-8")
    for only, n_chars in ((True, 2), (False, 4)):
        cfg = DataConfig([str(path)], "sft", val_files=[str(path)], assistant_only_loss=only)
        train, _, _ = run(cfg, tok, tmp_path)
        ids, mask = train.get(0)
        want_ids, want_mask = tok.encode_dialogue([("user", "问答"), ("assistant", "好的")])
        assert ids.tolist() == want_ids
        assert mask.tolist() == (want_mask if only else [True] * len(want_ids))
        assert train.n_chars == n_chars


def test_build_tokenizer_is_cached(tmp_path):
    p = write_lines(tmp_path / "p.txt", DOCS)
    log = Log()
    a = build_tokenizer({"pretrain": [p]}, 2, 500, False, tmp_path / "cache", log=log, idioms=())
    b = build_tokenizer({"pretrain": [p]}, 2, 500, False, tmp_path / "cache", log=log, idioms=())
    assert log[0].startswith("built vocabulary") and log[1].startswith("tokenizer cache hit"), log
    assert a.fingerprint == b.fingerprint
    c = build_tokenizer({"pretrain": [p]}, 3, 500, False, tmp_path / "cache", log=log, idioms=())
    assert log[2].startswith("built vocabulary") and c.fingerprint != a.fingerprint
    d = build_tokenizer(
        {"pretrain": [p]}, 2, 500, False, tmp_path / "cache", log=log, idioms=(), split_digits=True
    )
    assert log[3].startswith("built vocabulary") and d.split_digits and d.fingerprint != a.fingerprint


def test_replay_puts_whole_documents_in_a_pool_beside_the_sft_splits(tmp_path, tok):
    dialogues = [f"用户：第{i}个问题？助手：好的，我们去公园。" for i in range(30)]
    sft = write_lines(tmp_path / "d.txt", dialogues)
    pre = write_lines(tmp_path / "p.txt", DOCS)
    base = DataConfig([sft], "sft", val_fraction=0.2)
    train0, val0, _ = run(base, tok, tmp_path)
    assert dataset.replay_set(train0) is None
    cfg = DataConfig([sft], "sft", val_fraction=0.2, replay_files=[pre], replay_fraction=0.5)
    train, val, _ = run(cfg, tok, tmp_path)
    picked = [d for d in DOCS if dataset.in_val(d, 0.5, salt="replay:")]
    assert 5 < len(picked) < 35, "the test corpus should have a real share picked"
    assert train.stats == train0.stats and all_ids(train) == all_ids(train0), "replay must not touch train"
    assert val.stats == val0.stats and all_ids(val) == all_ids(val0), "replay must not touch validation"
    pool = dataset.replay_set(train)
    assert pool.stats["n_docs"] == len(picked)
    # the pool is the picked documents, learned whole, packed: one stream of their tokens in order
    stream = [t for d in picked for t in tok.encode_pretrain(d)]
    got = [t for i in range(len(pool)) for t in pool.get(i)[0].tolist()[(i > 0) :]]
    assert got == stream
    assert all(bool(pool.get(i)[1].all()) for i in range(len(pool)))
    assert all(n == 64 + 1 for n in pool.lengths[:-1]), "every window but the last is full"
    # the replay ratio only sets how much of the pool an epoch learns: same cache
    again = DataConfig(
        [sft], "sft", val_fraction=0.2, replay_files=[pre], replay_fraction=0.5, replay_ratio=3
    )
    assert run(again, tok, tmp_path)[0].root == train.root
    k = dataset.replay_windows(train, pool, 1.0)
    assert abs(k * pool.n_tokens / len(pool) - train.n_tokens) <= pool.n_tokens / len(pool)


def test_replay_is_for_sft_only(tmp_path, tok):
    pre = write_lines(tmp_path / "p.txt", DOCS)
    with pytest.raises(ValueError, match="sft only"):
        prepare(
            DataConfig([pre], "pretrain", replay_files=[pre], replay_fraction=0.1, cache_dir=tmp_path),
            tok,
            64,
        )
