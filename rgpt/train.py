"""python -m rgpt.train stage=pretrain|sft|dpo|lora [key=value ...]  (`--cfg job` prints every key).

What training prints goes through the `rgpt` logger: to the console and, via Hydra's job logging
(rgpt/conf/hydra/job_logging/rgpt.yaml), to the run directory's train.log as it goes.
"""

import logging
import os
import sys
from pathlib import Path

import torch

from rgpt.cli import hydra_main, settings
from rgpt.runtime.device import resolve_precision
from rgpt.stages import STAGES
from rgpt.training.distributed import Dist, DistError, hydra_overrides
from rgpt.training.settings import RunConfig, schema

log = logging.getLogger("rgpt").info


def load_run_config(cfg) -> RunConfig:
    """Hydra's composed config -> validated plain dataclasses (the only place omegaconf is touched)."""
    run = settings(RunConfig, cfg, stages=STAGES)
    run.job = sweep_job(run)
    return run


def sweep_job(run: RunConfig) -> str | None:
    """Under a Hydra sweep (-m), this job's directory below the run directory (named by its overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    job = os.path.relpath(Path(HydraConfig.get().runtime.output_dir).resolve(), run.run_dir.resolve())
    return None if job == "." else job


@hydra_main("config", schema(STAGES))
def main(cfg) -> None:
    run = load_run_config(cfg)
    device = run.runtime.apply()
    run.precision = resolve_precision(run.precision, device, log=log)
    torch.set_grad_enabled(False)  # rgpt computes every gradient by hand
    from rgpt.training.loop import Stop, Trainer

    dist = Dist.from_env(device.type, run.dist_timeout_s)  # under torchrun: join the other ranks
    if dist.world > 1 and device.type == "cuda":
        device = dist.device  # each rank on cuda:LOCAL_RANK
    if dist.is_main and run.train.grad_accum % dist.world:
        log(
            f"notice: train.grad_accum={run.train.grad_accum} micro-batches per step do not split evenly over "
            f"{dist.world} processes: some wait idle every step (use a multiple of {dist.world})"
        )
    try:
        result = Trainer(run, STAGES[run.stage], device, dist, log=log).run()
        # leave together: once one rank exits non-zero (130 after a signal) torchrun kills the others,
        # which must not catch rank 0 in the middle of saving `last`
        dist.barrier("waiting for rank 0's last save")
    except (Stop, DistError) as e:
        if dist.is_main or isinstance(e, DistError):  # every rank stops alike; a DistError is this rank's own
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        dist.close()
    if result["interrupted"]:
        sys.exit(130)


if __name__ == "__main__":
    sys.argv += hydra_overrides()  # under torchrun only rank 0 writes Hydra's files into the run directory
    main()
