"""What a run reports: a tqdm bar, TensorBoard scalars and text, and a timing report at the end."""

import math
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

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


# what the progress bar shows of a step's metrics: tag -> (label, format)
BAR = {
    "train/loss": ("loss", ".3f"),
    "train/ppl": ("ppl", ".1f"),
    "train/lr": ("lr", ".2e"),
    "train/grad_norm": ("gnorm", ".2f"),
    "train/tokens_per_sec": ("tok/s", ".0f"),
}


def histogram(values: torch.Tensor, bins: int = 64) -> dict:
    """The fields of a TensorBoard histogram of `values`: range, count, sums, bucket limits and counts."""
    v = values.detach().reshape(-1).float()
    lo, hi = (float(x) for x in torch.aminmax(v))
    if hi > lo:
        counts = torch.histc(v, bins=bins, min=lo, max=hi).tolist()
        limits = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:].tolist()
    else:  # every value the same (a bias still at zero): one bucket
        counts, limits = [float(v.numel())], [hi]
    return {
        "min": lo,
        "max": hi,
        "num": v.numel(),
        "sum": float(v.sum(dtype=torch.float64)),
        "sum_squares": float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2,
        "bucket_limits": limits,
        "bucket_counts": counts,
    }


def ppl(loss: float) -> float:
    """Perplexity of a mean loss in nats, capped so that a diverged run logs a number, not an overflow."""
    return math.exp(min(loss, 50))


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

    def histograms(self, step: int, values: dict) -> None:
        """Tensors by tag, as TensorBoard histograms of 64 equal bins, counted by torch: add_histogram's
        numpy path took 1.1 s for model=small's 14 M values and gradients, this one a tenth of that."""
        if self.writer:
            for tag, value in values.items():
                self.writer.add_histogram_raw(tag, **histogram(value), global_step=step)

    def image(self, tag: str, picture, step: int) -> None:
        """An RGB picture, (height, width, 3) uint8."""
        if self.writer:
            self.writer.add_image(tag, picture, step, dataformats="HWC")

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

    def step(self, step: int, metrics: dict, batches: int, eta: "Eta") -> None:
        """One optimizer step's metrics: every one to TensorBoard, the usual few and the ETA on the bar."""
        self.scalars(step, metrics)
        if self.bar is not None:
            shown = [f"{name} {metrics[tag]:{spec}}" for tag, (name, spec) in BAR.items() if tag in metrics]
            self.bar.set_postfix_str("  ".join(shown) + f" | eta {eta.text()}", refresh=False)
            self.bar.update(batches)

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


@dataclass
class Eta:
    """Seconds to the end of the epoch and to the end of the run, and which budget ends the run.

    `may_stop_early`: early stopping could end the run before that budget, so `run` is an upper bound.
    `early_stop`: set while the monitored loss has stopped improving; early stopping then ends the run
    within that many seconds unless the loss improves again.
    """

    epoch: float
    run: float
    budget: str  # max_epochs | max_steps | max_tokens | max_minutes
    may_stop_early: bool = False
    early_stop: float | None = None

    def text(self) -> str:
        run = format_seconds(self.run)
        out = f"epoch {format_seconds(self.epoch)}, " + (
            f"run <= {run} ({self.budget}, or early stopping)"
            if self.may_stop_early
            else f"run {run} ({self.budget})"
        )
        if self.early_stop is not None:
            out += f", early stop <= {format_seconds(self.early_stop)}"
        return out


def estimate_eta(
    t,
    *,
    epoch: int,
    pos: int,
    batches: int,
    step: int,
    tokens: int,
    sec_per_batch: float,
    tokens_per_sec: float,
    seconds_left: float,
    bad_epochs: int,
    eval_interval: int | None = None,
    to_next_eval: int | None = None,
) -> Eta:
    """The ETA of a run with train settings `t` (max_epochs, max_steps, max_tokens, max_minutes, grad_accum,
    patience), standing at micro-batch `pos` of `batches` in 0-based `epoch`, optimizer `step` and `tokens`
    seen, going at the measured rates; `seconds_left` is what max_minutes leaves (inf without it).
    With train.eval_every, evaluations come every `eval_interval` micro-batches, the next in `to_next_eval`.

    Every budget is projected at the same pace and the soonest one is the run's end: the bar never shows the
    time to max_epochs=500 when max_minutes or max_tokens will end the run first.
    """
    left = {"max_epochs": ((t.max_epochs - epoch) * batches - pos) * sec_per_batch}
    if t.max_steps is not None:
        left["max_steps"] = (t.max_steps - step) * t.grad_accum * sec_per_batch
    if t.max_tokens is not None:
        left["max_tokens"] = (t.max_tokens - tokens) / max(tokens_per_sec, 1e-9)
    if math.isfinite(seconds_left):
        left["max_minutes"] = seconds_left
    budget = min(left, key=left.get)
    run = max(left[budget], 0.0)
    epoch_left = min((batches - pos) * sec_per_batch, run)
    # early stopping ends a run at an evaluation (an epoch's end, or every eval_interval micro-batches with
    # train.eval_every), `patience - bad_epochs` evaluations from now at the latest (the next one included)
    # if the monitored loss does not improve before
    interval = batches if eval_interval is None else eval_interval
    to_next = batches - pos if to_next_eval is None else to_next_eval
    early = (to_next + (t.patience - bad_epochs - 1) * interval) * sec_per_batch
    may_stop_early = early < run
    shown = early if may_stop_early and bad_epochs > 0 else None  # likely: it has stopped improving
    return Eta(epoch_left, run, budget, may_stop_early, shown)


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
