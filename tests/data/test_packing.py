"""Packed pretraining windows (data.pack): one stream per split, full windows, targets across documents."""

from dataclasses import replace

import pytest
import torch

from rgpt.data import IGNORE, Batcher, DataConfig, prepare
from rgpt.data.dataset import in_val
from rgpt.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, normalise

# lengths from a few tokens to several windows, so windows hold many documents and documents span windows
DOCS = [f"第{i}篇：{'今天天气很好，' * (i % 9 + 1)}我们看见了{i % 7}只小猫。" for i in range(40)]
BLOCK = 16
VAL_FRACTION = 0.3


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.build(DOCS, min_freq=2, idioms=())


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tok):
    """(train, val) token sets of DOCS, packed."""
    tmp = tmp_path_factory.mktemp("packed")
    (tmp / "p.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    cfg = DataConfig([str(tmp / "p.txt")], "pretrain", val_fraction=VAL_FRACTION, pack=True)
    return prepare(replace(cfg, cache_dir=tmp / "cache"), tok, BLOCK, log=lambda m: None)


def windows(ds):
    return [ds.get(i)[0].tolist() for i in range(len(ds))]


def stream(tok, docs):
    """``<bos> d1 <eos> <bos> d2 <eos> …``"""
    return [t for d in docs for t in tok.encode_pretrain(d)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_packed_windows_are_full_overlap_by_one_and_reassemble_the_split(packed, tok, split):
    ds = packed[0] if split == "train" else packed[1]
    ws = windows(ds)
    assert len(ws) > 2, f"{split}: only {len(ws)} windows, the test needs several"
    lengths = [len(w) for w in ws]
    assert all(n == BLOCK + 1 for n in lengths[:-1]), f"{split}: window lengths {lengths}"
    assert 2 <= lengths[-1] <= BLOCK + 1
    for i, (w, nxt) in enumerate(zip(ws, ws[1:])):
        assert w[-1] == nxt[0], f"{split}: windows {i} and {i + 1} do not overlap by exactly one token"
    rebuilt = ws[0] + [t for w in ws[1:] for t in w[1:]]
    # the split is decided per document, before packing: each document lands whole in one stream
    docs = [d for d in DOCS if in_val(normalise(d), VAL_FRACTION) == (split == "val")]
    want = stream(tok, docs)
    assert rebuilt == want, (
        f"{split}: windows reassemble {len(rebuilt)} tokens, the split's documents are {len(want)}; "
        f"first difference at {next((i for i, (a, b) in enumerate(zip(rebuilt, want)) if a != b), None)}"
    )
    assert ds.stats["n_docs"] == len(docs) and ds.stats["n_targets"] == len(want) - 1
    assert all(bool(ds.get(i)[1].all()) for i in range(len(ds))), "pretraining masks must be all ones"


def test_splits_partition_the_documents(packed):
    train, val = packed
    n_val = sum(in_val(normalise(d), VAL_FRACTION) for d in DOCS)
    assert 0 < n_val < len(DOCS), "the test needs documents on both sides"
    assert (train.stats["n_docs"], val.stats["n_docs"]) == (len(DOCS) - n_val, n_val)


def test_targets_cross_document_boundaries_through_the_batcher(packed):
    train = packed[0]
    ws = windows(train)
    batches = list(Batcher(train, batch_size=4, seed=0, shuffle=False, bucket=False).epoch(0))
    boundaries = 0
    for b, batch in enumerate(batches):
        for row in range(batch.idx.shape[0]):
            w = torch.tensor(ws[4 * b + row])
            n = len(w) - 1
            assert torch.equal(batch.idx[row, :n], w[:-1]) and torch.equal(batch.targets[row, :n], w[1:])
            assert (batch.targets[row, n:] == IGNORE).all(), "padding must not be learned"
            at_eos = (batch.idx[row] == EOS_ID).nonzero().flatten().tolist()
            for t in at_eos:
                assert batch.targets[row, t] == BOS_ID, (
                    f"batch {b} row {row}: <eos> at {t} not followed by <bos>"
                )
                if t + 1 < n:
                    assert batch.idx[row, t + 1] == BOS_ID
                    assert batch.targets[row, t + 1] == w[t + 2], "the next document's first token"
                    boundaries += 1
    assert boundaries > 5, f"only {boundaries} document boundaries inside windows"
    assert sum(b.n_tokens for b in batches) == train.stats["n_targets"]
    padded = sum(int((b.targets == IGNORE).sum()) for b in batches)
    assert padded == BLOCK + 1 - len(ws[-1]), f"{padded} padded positions; only the last window may be short"


def test_pack_is_refused_for_sft(tmp_path, tok):
    path = tmp_path / "s.jsonl"
    path.write_text('{"conversations": [{"role": "user", "content": "你好"}]}\n', encoding="utf-8")
    cfg = DataConfig([str(path)], "sft", val_files=[str(path)], pack=True)
    with pytest.raises(ValueError, match="data.pack=True: applies to pretraining only"):
        prepare(replace(cfg, cache_dir=tmp_path / "cache"), tok, BLOCK, log=lambda m: None)
