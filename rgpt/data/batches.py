"""Batches of windows: length-bucketed, padded to the batch's longest window, in an order fixed by (seed, epoch)."""

from dataclasses import dataclass

import numpy as np
import torch

from rgpt.data.dataset import TokenSet
from rgpt.data.tokenizer import PAD_ID
from rgpt.nn.loss import IGNORE_INDEX as IGNORE  # the target value the loss skips

BUCKET_GROUPS = 50  # batches per length-sorted group: padding stays small, order stays random
REPLAY_STREAM = 7  # seeds the replay pool's order apart from the epochs' orders (seed, epoch)


@dataclass
class Batch:
    idx: torch.Tensor  # (B, T) input ids, PAD_ID after each window's end
    targets: torch.Tensor  # (B, T) next ids, IGNORE on padding and on positions not learned
    n_tokens: int  # targets != IGNORE: this micro-batch's weight in a token-weighted loss

    def to(self, device) -> "Batch":
        """The batch on ``device``; the copy is asynchronous when the tensors are in pinned memory."""
        nb = self.idx.is_pinned()
        return Batch(
            self.idx.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb), self.n_tokens
        )


def collate(windows: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    """Stack (ids, loss mask) windows: idx = ids[:-1], targets = ids[1:] where the mask learns them."""
    T = max(len(ids) for ids, _ in windows) - 1
    idx = torch.full((len(windows), T), PAD_ID, dtype=torch.long)
    targets = torch.full((len(windows), T), IGNORE, dtype=torch.long)
    for row, (ids, mask) in enumerate(windows):
        n = len(ids) - 1
        idx[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:].masked_fill(~mask[1:], IGNORE)
    return Batch(idx, targets, int((targets != IGNORE).sum()))


class Batcher:
    """Batches of a TokenSet, the same ones in the same order for the same (seed, epoch).

    Bucketing: shuffle, cut into groups of BUCKET_GROUPS batches, sort each group by length, cut it into
    batches, shuffle the batches. ``pin_memory`` (for training on cuda) lets Batch.to copy asynchronously.

    Replay (sft): with a ``replay`` pool, every epoch also learns ``replay_windows`` of its windows, the next
    ones of a fixed shuffled order of the pool, wrapping around: epoch e takes positions
    [e·k, (e+1)·k) mod n, so consecutive epochs learn different text until the pool is used up. Window i of
    the epoch is the dataset's for i < len(ds), else the pool's (i - len(ds)).
    """

    def __init__(
        self,
        ds: TokenSet,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        bucket: bool = True,
        pin_memory: bool = False,
        replay: TokenSet | None = None,
        replay_windows: int = 0,
    ):
        self.ds, self.batch_size, self.seed = ds, batch_size, seed
        self.shuffle, self.bucket, self.pin_memory = shuffle, bucket, pin_memory
        self.replay, self.replay_windows = replay, replay_windows if replay is not None else 0
        if self.replay_windows:
            self.pool = np.random.default_rng([seed, REPLAY_STREAM]).permutation(len(replay))

    def __len__(self) -> int:
        return -(-(len(self.ds) + self.replay_windows) // self.batch_size)

    def replayed(self, epoch: int) -> np.ndarray:
        """Pool indices of the windows ``epoch`` replays."""
        k = self.replay_windows
        if k == 0:
            return np.zeros(0, np.int64)
        return self.pool[(epoch * k + np.arange(k)) % len(self.pool)]

    def _lengths(self, items: np.ndarray) -> np.ndarray:
        n, out = len(self.ds), np.empty(len(items), np.int64)
        own = items < n
        out[own] = self.ds.lengths[items[own]]
        if not own.all():
            out[~own] = self.replay.lengths[items[~own] - n]
        return out

    def _get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.ds)
        return self.ds.get(i) if i < n else self.replay.get(i - n)

    def order(self, epoch: int) -> list[np.ndarray]:
        """Window indices of every batch of the epoch, in order."""
        B = self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        items = np.concatenate([np.arange(len(self.ds)), len(self.ds) + self.replayed(epoch)])
        if self.shuffle:
            items = items[rng.permutation(len(items))]
        if not self.bucket:
            return [items[i : i + B] for i in range(0, len(items), B)]
        batches = []
        for g in range(0, len(items), BUCKET_GROUPS * B):
            group = items[g : g + BUCKET_GROUPS * B]
            group = group[np.argsort(-self._lengths(group), kind="stable")]
            batches += [group[i : i + B] for i in range(0, len(group), B)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def epoch(self, epoch: int, start: int = 0):
        """Batches of ``epoch`` from the ``start``-th on (resuming after ``start`` batches replays the rest exactly)."""
        for indices in self.order(epoch)[start:]:
            batch = collate([self._get(int(i)) for i in indices])
            if self.pin_memory:
                batch = Batch(batch.idx.pin_memory(), batch.targets.pin_memory(), batch.n_tokens)
            yield batch
