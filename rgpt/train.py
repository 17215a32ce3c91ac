"""python -m rgpt.train stage=pretrain|sft [key=value ...]  (see conf/config.yaml for every key)."""

import sys

import torch

from rgpt.cli import ConfigError, hydra_main, resolve_device, resolve_precision, set_allocator
from rgpt.config import RunConfig
from rgpt.distributed import Dist, DistError, hydra_overrides


def load_run_config(cfg) -> RunConfig:
    """Hydra's composed config -> validated plain dataclasses (the only place omegaconf is touched)."""
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve, e.g. a typo in ${...}
        raise ConfigError(str(e).splitlines()[0]) from None
    return RunConfig.from_dict(raw)


@hydra_main("config")
def main(cfg) -> None:
    run = load_run_config(cfg)
    device = resolve_device(run.device)  # before any work: device=cuda without a GPU fails here
    run.precision = resolve_precision(run.precision, device)
    if run.threads:
        torch.set_num_threads(run.threads)
    set_allocator(run.allocator)
    torch.set_grad_enabled(False)  # rgpt computes every gradient by hand
    from rgpt.trainer import Stop, Trainer

    dist = Dist.from_env(device.type, run.dist_timeout_s)  # under torchrun: join the other ranks
    if dist.world > 1 and device.type == "cuda":
        device = dist.device  # each rank on cuda:LOCAL_RANK
    if dist.is_main and run.train.grad_accum % dist.world:
        print(
            f"notice: train.grad_accum={run.train.grad_accum} micro-batches per step do not split evenly over "
            f"{dist.world} processes: some wait idle every step (use a multiple of {dist.world})"
        )
    try:
        result = Trainer(run, device, dist).run()
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
