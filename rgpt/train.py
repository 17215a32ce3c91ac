"""python -m rgpt.train stage=pretrain|sft|dpo|lora [key=value ...]  (see conf/config.yaml for every key).

What training prints goes through the `rgpt` logger: to the console and, via Hydra's job logging
(conf/hydra/job_logging/rgpt.yaml), to the run directory's train.log as it goes.
"""

import logging
import os
import sys
from pathlib import Path

import torch

from rgpt.cli import ConfigError, hydra_main, resolve_precision, setup_runtime
from rgpt.config import RunConfig
from rgpt.distributed import Dist, DistError, hydra_overrides

log = logging.getLogger("rgpt").info


def load_run_config(cfg) -> RunConfig:
    """Hydra's composed config -> validated plain dataclasses (the only place omegaconf is touched)."""
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve, e.g. a typo in ${...}
        raise ConfigError(str(e).splitlines()[0]) from None
    run = RunConfig.from_dict(raw)
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


def trainer_class(stage: str):
    """The training loop of a stage: rgpt.trainer's, or a subclass with the stage's data and loss."""
    if stage == "dpo":
        from rgpt.dpo_trainer import DPOTrainer

        return DPOTrainer
    if stage == "lora":
        from rgpt.lora_trainer import LoRATrainer

        return LoRATrainer
    from rgpt.trainer import Trainer

    return Trainer


@hydra_main("config")
def main(cfg) -> None:
    run = load_run_config(cfg)
    device = setup_runtime(run.device, run.threads, run.allocator)
    run.precision = resolve_precision(run.precision, device, log=log)
    torch.set_grad_enabled(False)  # rgpt computes every gradient by hand
    from rgpt.trainer import Stop

    dist = Dist.from_env(device.type, run.dist_timeout_s)  # under torchrun: join the other ranks
    if dist.world > 1 and device.type == "cuda":
        device = dist.device  # each rank on cuda:LOCAL_RANK
    if dist.is_main and run.train.grad_accum % dist.world:
        log(
            f"notice: train.grad_accum={run.train.grad_accum} micro-batches per step do not split evenly over "
            f"{dist.world} processes: some wait idle every step (use a multiple of {dist.world})"
        )
    try:
        result = trainer_class(run.stage)(run, device, dist, log=log).run()
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
