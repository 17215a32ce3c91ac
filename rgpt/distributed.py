"""Data parallelism over torch.distributed: gloo on CPU, nccl on CUDA, started by torchrun.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op and rgpt runs as one process.
"""

import datetime
import os

import torch
import torch.distributed as dist


class Dist:
    """This process's place in the job: rank, world size, and the few collectives the trainer needs."""

    def __init__(self, rank=0, world=1, local_rank=0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str, timeout_s: float = 600.0) -> "Dist":
        """Join the process group torchrun describes in the environment; a lone process stays alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        # a lost peer ends the job with an error after `timeout` instead of hanging forever
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world, local_rank)

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over all ranks, in place (the flat gradient buffer is a single collective)."""
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def first_then_rest(self, fn):
        """Run fn on rank 0 first (e.g. to fill a cache), then on the others, which then find it filled."""
        if self.world == 1:
            return fn()
        if self.is_main:
            result = fn()
            self.barrier()
        else:
            self.barrier()
            result = fn()
        return result

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
