"""The device, precision, threads and allocator of a run: what every command sets before its work."""

import sys
from dataclasses import dataclass

import torch

from rgpt.settings import ConfigError, check


def resolve_device(spec: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device that exists on this machine, or ConfigError."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={spec}: CUDA is not available on this machine (use device=cpu or device=auto)"
            )
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    raise ConfigError(f"device={spec!r} is not one of auto, cpu, cuda, cuda:N")


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bfloat16 matmuls natively (else bf16 is emulated, and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(spec: str, device: torch.device, log=print) -> str:
    """'auto' | 'fp32' | 'bf16' -> 'fp32' or 'bf16' (auto: bf16 where the hardware has it natively).

    bf16 asked for on hardware without it runs, but emulated: a one-line notice says so."""
    if spec == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if spec not in ("fp32", "bf16"):
        raise ConfigError(f"precision={spec!r} is not one of auto, fp32, bf16")
    if spec == "bf16" and not native_bf16(device):
        where = "this CPU has no AVX512-BF16/AMX" if device.type == "cpu" else f"{device} has no native bf16"
        log(
            f"notice: precision=bf16 will be slow here: {where}, so bfloat16 products are emulated "
            "(a model=small training step: 33x slower than fp32 on a 2-core AVX2 EPYC); precision=fp32 "
            "(or auto) is the fast choice"
        )
    return spec


ALLOCATORS = ("keep", "system")


def set_allocator(mode: str) -> bool:
    """allocator=keep: glibc's malloc keeps freed memory for reuse; returns whether anything was changed.

    By default glibc hands every block of 32 MiB or more (and, early on, much smaller ones) straight back
    to the kernel when freed, so the next step's logits, their float32 copy and their gradient are fresh
    pages that the kernel must map and zero again, every step. With mmap off and trimming raised, freed
    blocks stay in the heap and are reused. rgpt allocates little per step, so it gains little (model=base,
    2 threads: a few percent at full bf16 windows, nothing measurable in the default pipeline); code that
    allocates every intermediate gains a lot (the bench's autograd reference: 15-40%), which is why the
    bench applies the same setting to both. "system" leaves glibc's defaults. A no-op without glibc.
    """
    if mode not in ALLOCATORS:
        raise ConfigError(f"allocator={mode!r} is not one of {', '.join(ALLOCATORS)}")
    if mode == "system" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def setup_runtime(device: str, threads, allocator: str) -> torch.device:
    """The keys every entry point shares (RuntimeSettings), checked and applied: returns the device."""
    dev = resolve_device(device)  # before any work: device=cuda without a GPU fails here
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r} must be a positive integer or null")
        torch.set_num_threads(threads)
    set_allocator(allocator)
    return dev


@dataclass
class RuntimeSettings:
    """The keys every command shares, beside its own (`python -m rgpt.chat device=cpu threads=2`)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto takes the GPU when there is one
    # CPU threads for torch; None keeps torch's default (one per physical core; 1 per rank under torchrun)
    threads: int | None = None
    # keep: glibc malloc reuses freed memory instead of returning it to the OS (a few percent faster rgpt
    # steps at full bf16 windows; rgpt allocates little per step); system: glibc's defaults
    allocator: str = "keep"

    def validate(self) -> "RuntimeSettings":
        check(self.threads is None or self.threads >= 1, "threads", self.threads, "must be >= 1 or null")
        check(
            self.allocator in ALLOCATORS,
            "allocator",
            self.allocator,
            f"must be one of {', '.join(ALLOCATORS)}",
        )
        return self

    def apply(self) -> torch.device:
        """Checked and applied: returns the device."""
        return setup_runtime(self.device, self.threads, self.allocator)
