"""allocator=keep really keeps large blocks in glibc's heap (instead of fresh mmap'd pages every step)."""

import platform
import subprocess
import sys
import textwrap

import pytest

from rgpt.runtime.device import set_allocator
from rgpt.settings import ConfigError

PROBE = textwrap.dedent(
    """
    import ctypes, sys, torch
    from rgpt.runtime.device import set_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    changed = set_allocator(sys.argv[1])
    x = torch.empty(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
    print(int(changed), libc.mallinfo2().hblkhd >> 20)  # MiB held in mmap'd blocks
    """
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
@pytest.mark.parametrize("mode, changed, mmapped", [("keep", 1, False), ("system", 0, True)])
def test_keep_serves_large_tensors_from_the_heap(mode, changed, mmapped):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    got_changed, mib = map(int, out.stdout.split())
    assert got_changed == changed
    assert (mib >= 64) == mmapped, f"allocator={mode}: {mib} MiB in mmap'd blocks"


def test_unknown_allocator_is_a_config_error():
    with pytest.raises(ConfigError, match="allocator"):
        set_allocator("jemalloc")
