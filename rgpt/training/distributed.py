"""Data parallelism over torch.distributed: gloo on CPU, nccl on CUDA, started by torchrun.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op and rgpt runs as one process.
Every collective goes through `Dist`, which turns a peer's death or silence into a one-line `DistError`.
"""

import datetime
import os
import re
from contextlib import contextmanager

import torch
import torch.distributed as dist

from rgpt.settings import ConfigError


class DistError(Exception):
    """A collective failed: a peer process died or stopped answering; the message names this rank."""


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def hydra_overrides() -> list[str]:
    """Extra Hydra overrides for this process: ranks other than 0 write no .hydra/ nor train.log into the
    run directory they share with rank 0 (the run's files are rank 0's alone)."""
    return [] if rank_from_env() == 0 else ["hydra.output_subdir=null", "hydra/job_logging=none"]


class Dist:
    """This process's place in the job: rank, world size, and the few collectives the trainer needs."""

    def __init__(self, rank=0, world=1, local_rank=0, device=None, timeout_s=None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device or torch.device("cpu")  # where collective tensors live (nccl: this rank's GPU)
        self.timeout_s = timeout_s

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str, timeout_s: float = 600.0) -> "Dist":
        """Join the process group torchrun describes in the environment; a lone process stays alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = rank_from_env(), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cpu")
        if device_type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                    f"start at most that many processes per node (torchrun --nproc_per_node)"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        # a peer that stops answering ends the job with a DistError after `timeout` instead of a hang;
        # one that dies is noticed at once (its connections close)
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
        return cls(rank, world, local_rank, device, timeout_s)

    @contextmanager
    def _guard(self, what: str):
        try:
            yield
        except RuntimeError as e:  # gloo/nccl: "Connection closed by peer", "Timed out waiting ...", ...
            why = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip() or type(e).__name__).splitlines()[0])
            raise DistError(
                f"rank {self.rank} of {self.world}: {what} failed: another rank died or did not answer "
                f"within dist_timeout_s={self.timeout_s:g} s ({why.split('. ')[0][:200]})"
            ) from None

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over all ranks, in place: one collective per tensor, so pass flat buffers."""
        if self.world > 1:
            with self._guard("all-reduce"):
                for t in tensors:
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrite `tensor` on every rank with rank 0's."""
        if self.world > 1:
            with self._guard("broadcast"):
                dist.broadcast(tensor, src=0)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on at least one."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        self.all_reduce_sum(t)
        return t.item() > 0

    def barrier(self, what: str = "barrier") -> None:
        if self.world > 1:
            with self._guard(what):
                dist.barrier()

    def first_then_rest(self, fn, what: str = "preparation"):
        """Run fn on rank 0 first (e.g. to fill a cache), then on the others, which then find it filled.

        The others wait at most dist_timeout_s for rank 0 (e.g. tokenizing a new corpus).
        """
        if self.world == 1:
            return fn()
        if self.is_main:
            result = fn()
            self.barrier(f"{what} (waiting for the other ranks)")
        else:
            self.barrier(f"waiting for rank 0's {what}")
            result = fn()
        return result

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
