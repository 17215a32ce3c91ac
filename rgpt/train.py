"""python -m rgpt.train stage=pretrain|sft [key=value ...]  (see conf/config.yaml for every key)."""

import sys

import torch

from rgpt.cli import ConfigError, hydra_main, resolve_device
from rgpt.config import RunConfig
from rgpt.distributed import Dist


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
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.set_grad_enabled(False)  # rgpt computes every gradient by hand
    from rgpt.trainer import Stop, Trainer

    dist = Dist.from_env(device.type)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        result = Trainer(run, device, dist).run()
    except Stop as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        dist.close()
    if result["interrupted"]:
        sys.exit(130)


if __name__ == "__main__":
    main()
