"""Segmenting in parts and in worker processes gives exactly what one pass in one process gives."""

import json
from dataclasses import replace

import numpy as np
import pytest

import rgpt.data.encode as encode
from rgpt.data import DataConfig, build_tokenizer, corpus_texts, prepare
from rgpt.data.tokenizer import Tokenizer

# documents with repeated words, a few rare ones, Latin text and numbers, so min_freq and ties matter
DOCS = [
    f"第{i}章：{'春天来了，' * (i % 3)}河流穿过城市，人们在岸边散步。编号 {i * 37} 的 model 写于{1900 + i}年。"
    for i in range(120)
] + ["罕见的麒麟只出现一次。", "独一无二的词语。"]
DIALOGUES = [
    {
        "conversations": [
            {"role": "user", "content": f"第{i}个问题是什么？"},
            {"role": "assistant", "content": f"答案是{i}。"},
        ]
    }
    for i in range(30)
]


def _corpus(tmp_path):
    (tmp_path / "pre").mkdir()
    for k in range(3):  # three shards, as a fetched corpus has
        (tmp_path / "pre" / f"{k:05d}.txt").write_text("\n".join(DOCS[k::3]) + "\n", encoding="utf-8")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in DIALOGUES) + "\n", encoding="utf-8")
    return {"pretrain": [str(tmp_path / "pre")], "sft": [str(sft)]}


def test_counts_of_parts_add_up_to_counts_of_the_whole():
    whole = Tokenizer.count(DOCS, (), False)
    parts = [Tokenizer.count(DOCS[i : i + 7], (), False) for i in range(0, len(DOCS), 7)]
    chars, words = sum((p[0] for p in parts), type(whole[0])()), sum((p[1] for p in parts), type(whole[1])())
    assert chars == whole[0] and words == whole[1]
    assert words["河流"] == len(DOCS) - 2 and words["麒麟"] == 1, (
        "the test corpus lost its repeated/rare words"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_vocabulary_equals_the_one_shot_vocabulary(tmp_path, monkeypatch, workers):
    files = _corpus(tmp_path)
    monkeypatch.setattr(encode, "CHUNK_CHARS", 200)  # many small chunks, merged out of one process or two
    built = build_tokenizer(
        files, 2, 20000, False, tmp_path / "cache", log=lambda m: None, idioms=(), workers=workers
    )
    texts = [t for kind in ("pretrain", "sft") for t in corpus_texts(files[kind], kind)]
    one_shot = Tokenizer.build(texts, min_freq=2, max_size=20000, idioms=())
    assert built.tokens == one_shot.tokens
    assert "河流" in built.tokens and "麒麟" not in built.tokens, "min_freq was not applied"
    capped = build_tokenizer(
        files, 2, 60, False, tmp_path / "cache", log=lambda m: None, idioms=(), workers=workers
    )
    assert capped.tokens == Tokenizer.build(texts, min_freq=2, max_size=60, idioms=()).tokens


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_tokenizing_in_two_processes_writes_the_same_arrays_as_one(tmp_path, monkeypatch, kind):
    files = _corpus(tmp_path)
    tok = Tokenizer.build([t for k in files for t in corpus_texts(files[k], k)], min_freq=2, idioms=())
    monkeypatch.setattr(encode, "CHUNK_CHARS", 150)
    cfg = DataConfig(files[kind], kind, val_fraction=0.2, pack=kind == "pretrain")
    out = {}
    for workers in (1, 2):
        log = []
        here = replace(cfg, cache_dir=tmp_path / f"cache{workers}", workers=workers)
        out[workers] = prepare(here, tok, 24, log=log.append)
        assert log[-1].startswith("tokenized") and "chars/s" in log[-1], log
    for one, two in zip(out[1], out[2]):
        assert one.n_seqs > 1 and one.stats == two.stats
        for name in ("ids", "mask", "offsets"):
            assert np.array_equal(getattr(one, name), getattr(two, name)), name


def test_chunks_are_bounded_and_keep_every_item_in_order():
    items = ["a" * n for n in (1, 5, 3, 9, 2, 2, 2, 7)]
    chunks = list(encode.chunked(items, len, 6))
    assert [x for c in chunks for x in c] == items
    assert all(sum(map(len, c[:-1])) < 6 for c in chunks), "a chunk went on past its size"
    assert [len(c) for c in chunks] == [2, 2, 3, 1]


def test_auto_workers_uses_one_process_for_a_small_corpus():
    assert encode.auto_workers(None, 1000) == 1
    assert encode.auto_workers(None, encode.AUTO_MIN_BYTES) >= 1
    assert encode.auto_workers(3, 10) == 3
