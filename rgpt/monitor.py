"""What a run reports: a tqdm bar, TensorBoard scalars and text, and a timing report at the end."""

import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from tqdm import tqdm


class Timers:
    """Wall-clock seconds per named phase (data, forward, backward, optimizer, checkpoint, validation)."""

    def __init__(self, device):
        self.total = defaultdict(float)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()  # on CUDA, charge queued kernels to the phase that launched them
            self.total[name] += time.perf_counter() - t0


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Monitor:
    """Console and TensorBoard output; a no-op on ranks other than 0 so only one process writes."""

    def __init__(self, run_dir, *, enabled=True, progress=True, purge_step=None, log=print):
        self.enabled, self.progress, self.log = enabled, progress and enabled, log
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it loads tensorboard

            # purge_step drops events at or after that step left by an earlier run of this directory,
            # so a resumed (or restarted) run's curves continue instead of doubling back
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        self.bar = None

    def scalars(self, step: int, values: dict) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def start_epoch(self, epoch: int, total: int, initial: int) -> None:
        if self.progress:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=f"epoch {epoch + 1}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
            )

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("  ".join(f"{k} {v}" for k, v in postfix.items()), refresh=False)
            self.bar.update(n)

    def end_epoch(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            self.log(summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer:
            self.writer.close()


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
