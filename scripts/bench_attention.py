"""Peak memory and time of one causal attention forward + backward: attn=standard against attn=flash.

    python scripts/bench_attention.py [--lengths 256,1024,2048] [--batch 4] [--heads 8] [--head-size 64]

Each (core, T) runs in a fresh process, so its peak is its own: on CUDA torch's peak allocation, on CPU the
growth of the process's peak RSS (ru_maxrss) over what it held once the inputs existed. Times are the
median of --repeats runs after one warm-up. Prints a Markdown table with the flash/standard ratios.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(core: str, T: int, B: int, H: int, D: int, repeats: int, device: str) -> dict:
    """One (core, T) in this process: {'ms': median forward+backward time, 'peak_mb': extra peak memory}."""
    sys.path.insert(0, str(REPO))
    import torch

    from rgpt.nn.attention import StandardCore
    from rgpt.nn.flash import FlashCore

    torch.manual_seed(0)
    q, k, v, dy = (torch.randn(B, H, T, D, device=device) for _ in range(4))
    make = (
        (lambda: FlashCore())
        if core == "flash"
        else (lambda: StandardCore(torch.ones(T, T, dtype=torch.bool, device=device).triu(1)))
    )

    def once():
        c = make()
        c.forward(q, k, v)
        c.backward(dy)
        if device == "cuda":
            torch.cuda.synchronize()

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731  peak RSS so far
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss()  # the inputs exist; nothing of the attention has run yet
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss()) - base
    return {"ms": statistics.median(times[1:]) * 1e3, "peak_mb": peak / 2**20}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="256,1024,2048")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "core,T" measured in this process
    args = p.parse_args(argv)
    B, H, D = args.batch, args.heads, args.head_size
    if args.one:
        core, T = args.one.split(",")
        print(json.dumps(measure(core, int(T), B, H, D, args.repeats, args.device)))
        return
    print(f"B={B} H={H} D={D}, forward + backward, {args.device}, float32\n")
    print("| T | standard ms | flash ms | time ratio | standard peak MB | flash peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for T in map(int, args.lengths.split(",")):
        res = {}
        for core in ("standard", "flash"):
            cmd = [sys.executable, __file__, "--one", f"{core},{T}", "--batch", str(B), "--heads", str(H)]
            cmd += ["--head-size", str(D), "--repeats", str(args.repeats), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[core] = json.loads(out.strip().splitlines()[-1])
        s, f = res["standard"], res["flash"]
        print(
            f"| {T} | {s['ms']:.1f} | {f['ms']:.1f} | {f['ms'] / s['ms']:.2f} | {s['peak_mb']:.0f} | "
            f"{f['peak_mb']:.0f} | {f['peak_mb'] / max(s['peak_mb'], 1e-9):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
