"""Batches: targets and masks on a hand-made example, padding, bucketing, deterministic order, resume."""

import json
from dataclasses import replace

import pytest
import torch

from rgpt.data import IGNORE, Batcher, DataConfig, prepare
from rgpt.data.tokenizer import SPECIALS, Tokenizer

BLOCK = 8


def sft_set(tmp_path, dialogues, assistant_only_loss=True):
    """A train TokenSet holding ``dialogues`` in order, and the tokenizer it was made with."""
    tok = Tokenizer.build(["你好", "谢谢"], min_freq=1, idioms=())
    path = tmp_path / "chat.jsonl"
    lines = [{"conversations": [{"role": r, "content": c} for r, c in d]} for d in dialogues]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    cfg = DataConfig([str(path)], "sft", val_files=[str(path)], assistant_only_loss=assistant_only_loss)
    train, _ = prepare(replace(cfg, cache_dir=tmp_path / "cache"), tok, BLOCK, log=lambda m: None)
    return train, tok


def test_targets_and_assistant_only_mask_on_a_hand_made_example(tmp_path):
    train, tok = sft_set(
        tmp_path, [[("user", "你好"), ("assistant", "谢谢")], [("user", "你好谢"), ("assistant", "好")]]
    )
    assert tok.tokens == [
        *SPECIALS,
        "谢",
        "你",
        "好",
        "你好",
        "谢谢",
    ]  # ids 6..10, so the numbers below mean:
    # <bos>=2 <user>=4 你好=9 <assistant>=5 谢谢=10 <eos>=3  |  <bos> <user> 你好 谢=6 <assistant> 好=8 <eos>
    (batch,) = Batcher(train, batch_size=2, seed=0, shuffle=False, bucket=False).epoch(0)
    assert batch.idx.tolist() == [[2, 4, 9, 5, 10, 0], [2, 4, 9, 6, 5, 8]]
    assert batch.targets.tolist() == [
        [IGNORE, IGNORE, IGNORE, 10, 3, IGNORE],
        [IGNORE, IGNORE, IGNORE, IGNORE, 8, 3],
    ]
    assert batch.n_tokens == 4


def test_without_assistant_only_loss_every_real_target_counts(tmp_path):
    train, _ = sft_set(tmp_path, [[("user", "你好"), ("assistant", "谢谢")]], assistant_only_loss=False)
    (batch,) = Batcher(train, batch_size=1, seed=0).epoch(0)
    assert batch.targets.tolist() == [[4, 9, 5, 10, 3]]
    assert batch.n_tokens == 5


@pytest.fixture(scope="module")
def pretrain_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    docs = [f"{'今天天气很好' * (i % 13 + 1)}，第{i}天。" for i in range(300)]
    tok = Tokenizer.build(docs, min_freq=2, idioms=())
    (tmp / "p.txt").write_text("\n".join(docs), encoding="utf-8")
    cfg = DataConfig([str(tmp / "p.txt")], "pretrain", val_fraction=0.1, cache_dir=tmp / "c")
    train, _ = prepare(cfg, tok, 32, log=lambda m: None)
    return train


def flat(batches):
    return [(b.idx.tolist(), b.targets.tolist()) for b in batches]


def test_order_is_deterministic_from_seed_and_epoch(pretrain_set):
    batcher = Batcher(pretrain_set, batch_size=8, seed=3)
    first = flat(batcher.epoch(0))
    assert first == flat(Batcher(pretrain_set, batch_size=8, seed=3).epoch(0)), (
        "same (seed, epoch), different batches"
    )
    assert first != flat(batcher.epoch(1)), "epoch 1 replays epoch 0's order"
    assert first != flat(Batcher(pretrain_set, batch_size=8, seed=4).epoch(0)), "seed has no effect"
    assert len(first) == len(batcher)


def test_resume_from_start_replays_the_rest_exactly(pretrain_set):
    batcher = Batcher(pretrain_set, batch_size=8, seed=3)
    full = flat(batcher.epoch(2))
    assert flat(batcher.epoch(2, start=5)) == full[5:]


@pytest.mark.parametrize("shuffle, bucket", [(True, True), (True, False), (False, True), (False, False)])
def test_every_window_appears_once_per_epoch(pretrain_set, shuffle, bucket):
    batcher = Batcher(pretrain_set, batch_size=7, seed=0, shuffle=shuffle, bucket=bucket)
    seen = sorted(int(i) for b in batcher.order(0) for i in b)
    assert seen == list(range(len(pretrain_set)))
    assert len(batcher.order(0)) == len(batcher)


def test_bucketing_cuts_padding_and_batches_fit_the_block(pretrain_set):
    def padding(bucket):
        batches = list(Batcher(pretrain_set, batch_size=8, seed=0, bucket=bucket).epoch(0))
        assert max(b.idx.shape[1] for b in batches) <= 32, "a batch is longer than block_size"
        return sum(int((b.targets == IGNORE).sum()) for b in batches)

    bucketed, plain = padding(True), padding(False)
    assert bucketed < plain / 2, f"bucketing left {bucketed} padded targets vs {plain} without it"


def test_batch_moves_to_a_device(pretrain_set):
    batch = next(Batcher(pretrain_set, batch_size=4, seed=0).epoch(0))
    moved = batch.to("cpu")
    assert torch.equal(moved.idx, batch.idx) and torch.equal(moved.targets, batch.targets)
    assert moved.n_tokens == batch.n_tokens == int((batch.targets != IGNORE).sum())
    if torch.cuda.is_available():
        pinned = next(Batcher(pretrain_set, batch_size=4, seed=0, pin_memory=True).epoch(0))
        assert pinned.idx.is_pinned()
        assert torch.equal(pinned.to("cuda").targets.cpu(), batch.targets)


def test_replay_learns_the_pools_next_windows_each_epoch(pretrain_set):
    n, k, B = len(pretrain_set), 10, 7
    pool = pretrain_set  # any TokenSet can be the pool; its windows are numbered n, n+1, ... in an epoch
    batcher = Batcher(pretrain_set, batch_size=B, seed=0, replay=pool, replay_windows=k)
    assert len(batcher) == -(-(n + k) // B)
    replayed = []
    for epoch in range(-(-len(pool) // k)):
        seen = [int(i) for b in batcher.order(epoch) for i in b]
        assert sorted(i for i in seen if i < n) == list(range(n)), "every dialogue window once an epoch"
        mine = sorted(i - n for i in seen if i >= n)
        assert len(mine) == k and mine == sorted(batcher.replayed(epoch).tolist())
        replayed += batcher.replayed(epoch).tolist()  # in the pool's order
    # until the pool is used up, no window is replayed twice; then every one has been
    assert sorted(replayed[: len(pool)]) == list(range(len(pool)))
    assert len(set(batcher.replayed(0)) & set(batcher.replayed(1))) == 0
    # the windows themselves: a replayed one is the pool's, whole
    got = flat(
        Batcher(pretrain_set, 1, seed=0, shuffle=False, bucket=False, replay=pool, replay_windows=k).epoch(0)
    )
    for row, j in zip(got[n:], batcher.replayed(0)):
        ids, mask = pool.get(int(j))
        assert row[0] == [ids[:-1].tolist()] and row[1] == [ids[1:].masked_fill(~mask[1:], IGNORE).tolist()]
    # deterministic, and resuming mid-epoch gives the rest exactly
    again = Batcher(pretrain_set, batch_size=B, seed=0, replay=pool, replay_windows=k)
    assert flat(again.epoch(3)) == flat(batcher.epoch(3))
    assert flat(batcher.epoch(3, start=4)) == flat(batcher.epoch(3))[4:]


def test_without_replay_the_order_is_unchanged(pretrain_set):
    """A batcher given a pool but no replay windows, or none at all, orders batches as before replay."""
    plain = Batcher(pretrain_set, batch_size=8, seed=5)
    assert [b.tolist() for b in plain.order(2)] == [
        b.tolist() for b in Batcher(pretrain_set, batch_size=8, seed=5, replay=pretrain_set).order(2)
    ]
