"""What monitor.diagnostics and monitor.gradcheck_every cost, measured on real training steps.

    python scripts/inspect_cost.py [--model small|base|tiny] [--threads 1] [--rounds 8] [--every 100]

Builds the trainer of `python -m rgpt.train` (built-in corpus, the model chosen) and times, on the same
micro-batches in turn (so machine noise hits both alike): a plain step, and a step with diagnostics (their
statistics and the TensorBoard writes of the scalars and histograms included). Then one live gradient check
of a micro-batch. Prints the medians and the share of training time each costs at its interval.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rgpt.cli import CONF_DIR


def trainer_for(model: str, threads: int, out_dir: Path):
    from hydra import compose, initialize_config_dir

    from rgpt.train import load_run_config  # registers the ${corpus:...} resolver
    from rgpt.training.loop import Trainer

    overrides = [f"model={model}", f"out_dir={out_dir}", "checkpoint.strategy=none", "monitor.progress=false"]
    overrides += ["monitor.diagnostics_every=1", f"threads={threads}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = load_run_config(compose(config_name="config", overrides=overrides))
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    return Trainer(cfg, torch.device("cpu"), log=lambda *a: None)


def timed_step(trainer, group, diagnostics: bool) -> float:
    trainer.cfg.monitor.diagnostics = diagnostics
    t0 = time.perf_counter()
    trainer.train_step(group)
    if trainer._probe is not None:  # what _log_step does with them
        trainer.monitor.scalars(trainer.step, trainer._probe.scalars)
        trainer.monitor.histograms(trainer.step, trainer._probe.histograms)
        trainer.monitor.writer.flush()
        trainer._probe = None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--every", type=int, default=100, help="the diagnostics interval to report the share at")
    ap.add_argument("--gradcheck-every", type=int, default=1000)
    args = ap.parse_args()
    from rgpt.training.gradcheck import gradient_check
    from rgpt.training.monitor import Monitor

    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args.model, args.threads, Path(tmp))
        trainer.monitor = Monitor(Path(tmp) / "tb", progress=False, log=lambda *a: None)
        batches = trainer.batches.epoch(0)
        accum = trainer.cfg.train.grad_accum
        plain, diag = [], []
        for r in range(args.rounds + 1):
            group = [next(batches) for _ in range(accum)]
            order = (False, True) if r % 2 else (True, False)
            times = {d: timed_step(trainer, group, d) for d in order}
            if r:  # round 0 warms up
                plain.append(times[False])
                diag.append(times[True])
        step, extra = statistics.median(plain), statistics.median(d - p for d, p in zip(diag, plain))
        b = next(batches)
        report = gradient_check(trainer.model, b.idx, b.targets)
        trainer.monitor.close()
    n = trainer.model.num_params()
    print(f"model={args.model} ({n:,} parameters), threads={args.threads}, {args.rounds} rounds")
    print(f"plain step {step:.3f} s (median); a diagnostics step costs {extra:.3f} s more")
    print(f"diagnostics every {args.every} steps: {100 * extra / (args.every * step):.2f}% of training time")
    print(
        f"gradient check of one micro-batch: {report.seconds:.1f} s = {report.seconds / step:.1f} steps; every "
        f"{args.gradcheck_every} steps: {100 * report.seconds / (args.gradcheck_every * step):.2f}%"
    )
    print(report.summary())


if __name__ == "__main__":
    sys.exit(main())
