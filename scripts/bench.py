"""Benchmark rgpt against the autograd reference: training throughput and MFU, peak memory, generation
with and without the KV cache, tokenizer speed and a full pretraining epoch. Prints Markdown tables.

    python scripts/bench.py [--device auto|cpu|cuda] [--threads N] [--no-compile] [--skip-epoch]
                            [--only train,memory,generate,tokenizer,epoch,profile] [--out outputs/bench.md]
    python scripts/bench.py --quick --no-compile      # seconds: the smoke test's settings

Each table row is measured in this run: the variants of a row take turns (rgpt, autograd, compiled, then
the next round in a rotated order), so machine noise hits all of them alike, and a ratio is the median of
the per-round ratios. Peak memory is measured in a fresh process per variant (the script re-invokes
itself with --memory-child) so peaks do not mix. Progress goes to stderr, the report to stdout and --out.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_measure as bm
import torch

from rgpt.cli import friendly
from rgpt.data import CORPUS_DIR, build_tokenizer, tokenize_throughput
from rgpt.data.tokenizer import PAD_ID
from rgpt.runtime.device import ALLOCATORS, resolve_device, set_allocator

SECTIONS = ("train", "memory", "generate", "tokenizer", "epoch", "profile")
SHAPES = {"base": [(16, 24), (4, 256)], "small": [(16, 24), (8, 128)], "quick": [(4, 8), (2, 32)]}
# rows on real micro-batches of the built-in corpus (stage batch sizes: pretrain 16, sft 4), for these models
CORPUS_ROWS = {"base": (("pretrain", 16), ("sft", 4)), "quick": (("pretrain", 4), ("sft", 2))}
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}  # --ref-adam
ADAM_NOTE = {
    "default": "its defaults: the per-tensor loop on CPU, foreach on CUDA; --ref-adam fused is faster",
    "foreach": "foreach=True",
    "fused": "fused=True",
}
RUST_TRAIN, RUST_GENERATE = 300.0, 470.0  # tokens/s of the Rust reference at model=small (see footnote)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--allocator", default="keep", choices=ALLOCATORS, help="as the allocator key of conf/")
    p.add_argument("--models", default="base,small", help="comma-separated rgpt/conf/model names")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the tokenizer's)")
    p.add_argument("--pretrain", nargs="+", default=[str(CORPUS_DIR / "pretrain")], help="pretraining corpus")
    p.add_argument("--sft", nargs="+", default=[str(CORPUS_DIR / "sft")], help="dialogue corpus")
    p.add_argument("--cache-dir", default="outputs/.cache", help="tokenizer and token-set cache (training's)")
    p.add_argument(
        "--dropout", type=float, default=0.1, help="as in rgpt/conf/model (rgpt and autograd alike)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="training steps per variant per round")
    p.add_argument("--prompt-len", type=int, default=20, help="generation: prompt tokens (prefilled)")
    p.add_argument("--new-tokens", default="100,200", help="generation: greedy tokens after it (a list)")
    p.add_argument("--matmul-n", type=int, default=None, help="square matmul ceiling (2048 CPU, 8192 CUDA)")
    p.add_argument("--ref-adam", choices=tuple(ADAM), default="default", help="torch.optim.Adam variant")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    p.add_argument("--compile-timeout", type=float, default=300.0, help="seconds before compile is n/a")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    p.add_argument("--skip-epoch", action="store_true", help="skip the full epoch (takes minutes)")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes, 2 rounds: a smoke test")
    p.add_argument("--out", default="outputs/bench.md", help="where the Markdown report is written too")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # impl:model:BxT:precision
    args = p.parse_args(argv)
    args.models = ["quick"] if args.quick else args.models.split(",")
    args.only = set(args.only.split(",")) - ({"epoch"} if args.skip_epoch else set())
    if unknown := args.only - set(SECTIONS):
        p.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.quick:
        args.warmup, args.rounds, args.steps = 1, 2, 1
        args.prompt_len, args.new_tokens, args.matmul_n = 4, "8", 256
    try:
        args.new_tokens = [int(n) for n in str(args.new_tokens).split(",")]
    except ValueError:
        p.error(f"--new-tokens: {args.new_tokens!r} is not a comma-separated list of counts")
    return args


# ---- formatting ----------------------------------------------------------------------------------
def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def ratio(times_a, times_b) -> str:
    """Speed of a relative to b from paired per-round times: median of b/a, with the min–max range."""
    r = [tb / ta for ta, tb in zip(times_a, times_b)]
    return f"{statistics.median(r):.2f}× ({min(r):.2f}–{max(r):.2f})"


def table(headers, rows) -> str:
    def line(cells):  # a cell is one line, and a "|" inside it would start a new column
        return "| " + " | ".join(" ".join(str(c).split()).replace("|", "/") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers)] + [line(row) for row in rows])


def machine(device, allocator: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs ({usable} usable){gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; allocator={allocator}; device {device}"
    )


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


# ---- sections ------------------------------------------------------------------------------------
def interleaved(steps: dict, args, sync) -> dict:
    """Seconds per step of every variant, per round; the order rotates each round."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    names, times = list(steps), {name: [] for name in steps}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(bm.time_steps(steps[name], args.steps, sync))
    return times


def training_batches(args, cfg, name, device, tok):
    """(label, idx, targets, tokens, T for the FLOP count or None) of each training row of a model.

    Random full batches (every position a target), then, when the tokenizer is at hand, one real
    micro-batch per stage: padded, and for sft with the user's turns masked. Their tokens are the non-pad
    ones; their FLOP count is left out (rgpt skips the output projection where there is no target).
    """
    for B, T in SHAPES[name]:
        idx, targets = bm.random_batch(cfg, B, T, device)
        yield f"{B}×{T}", idx, targets, B * T, T
    for kind, B in CORPUS_ROWS.get(name, ()) if tok is not None else ():
        files = args.pretrain if kind == "pretrain" else args.sft
        idx, targets = bm.corpus_batch(tok, files, kind, cfg, B, args.cache_dir, device)
        yield f"{kind} batch {B}×{idx.shape[1]}", idx, targets, int((idx != PAD_ID).sum()), None


def bench_training(args, device, V, ceiling, tok=None):
    """The training table. `ceiling` (best matmul FLOP/s per precision) is re-measured after every row, the
    best kept, and MFU filled in at the end: a ceiling measured in a noisy moment would inflate MFU."""
    impls = ["rgpt", "autograd"] + ([] if args.no_compile else ["compiled"])
    rows, sync, compile_na, mfu = [], bm.synchronizer(device), {}, []
    adam, timeout = ADAM[args.ref_adam], args.compile_timeout
    for name in args.models:
        cfg = bm.model_config(name, V, args.dropout)
        for label, idx, targets, n_tok, T in training_batches(args, cfg, name, device, tok):
            for prec in PRECISIONS:
                log(f"train: {name} {label} {prec}")
                steps, na = {}, dict(compile_na)
                for impl in impls:
                    try:
                        steps[impl] = bm.build_step(impl, cfg, device, prec, idx, targets, timeout, adam=adam)
                    except bm.NotAvailable as e:
                        na[impl] = f"n/a ({e})"
                if "compiled" in na and "compiled" in impls:  # one failure or timeout is enough to know
                    impls.remove("compiled")
                    compile_na["compiled"] = na["compiled"]
                t = interleaved(steps, args, sync)
                tok_s = {k: n_tok / statistics.median(v) for k, v in t.items()}
                row = [name, label, prec]
                if "rgpt" in t and T is not None:
                    flops = tok_s["rgpt"] * bm.flops_per_token(cfg, T)
                    row += [num(tok_s["rgpt"]), num(flops / 1e9), None]  # MFU: once the ceiling is final
                    mfu.append((row, prec, flops))
                elif "rgpt" in t:
                    row += [num(tok_s["rgpt"]), "—", "—"]
                else:
                    row += [na["rgpt"], "—", "—"]
                row += [num(tok_s[k]) if k in t else na.get(k, "skipped") for k in ("autograd", "compiled")]
                row += [
                    ratio(t["rgpt"], t[k]) if {"rgpt", k} <= set(t) else "—" for k in ("autograd", "compiled")
                ]
                rust = name == "small" and "rgpt" in t
                row.append(f"{tok_s['rgpt'] / RUST_TRAIN:.2f}×" if rust else "—")
                rows.append(row)
                del steps  # free this configuration's models before the next one
                now = bm.matmul_flops(args.matmul_n, DTYPES[prec], device, repeats=2)
                ceiling[prec] = max(ceiling[prec], now)
    for row, prec, flops in mfu:
        row[row.index(None)] = f"{flops / ceiling[prec]:.1%}"
    headers = ["model", "batch B×T", "precision", "rgpt tok/s", "rgpt GFLOP/s", "rgpt MFU"]
    headers += ["autograd tok/s", "compiled tok/s", "rgpt / autograd", "rgpt / compiled", "× Rust ref"]
    return table(headers, rows)


def memory_child(args, device, V) -> None:
    """--memory-child impl:model:BxT:precision — peak memory of that variant, as one JSON line."""
    impl, name, shape, prec = args.memory_child.split(":")
    B, T = map(int, shape.split("x"))
    cfg = bm.model_config(name, V, args.dropout)
    peak = bm.peak_memory(impl, cfg, device, prec, B, T, adam=ADAM[args.ref_adam])
    print("BENCH_MEMORY " + json.dumps(peak))


def run_memory_child(args, device, V, spec: str) -> dict | str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", spec, "--vocab", str(V)]
    cmd += ["--device", str(device), "--threads", str(torch.get_num_threads()), "--allocator", args.allocator]
    cmd += ["--dropout", str(args.dropout), "--ref-adam", args.ref_adam] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_MEMORY "):
            return json.loads(line.split(" ", 1)[1])
    why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:80]
    return f"error ({why})"


def memory_cell(got, cpu: bool) -> str:
    if not isinstance(got, dict):
        return got  # "n/a (…)" or "error (…)"
    return f"{num(got['peak'])} (+{num(got['peak'] - got['base'])})" if cpu else num(got["peak"])


def bench_memory(args, device, V):
    rows, cpu = [], device.type == "cpu"
    shapes = {name: SHAPES[name][:1] if args.quick else SHAPES[name] for name in args.models}
    for name in args.models:
        for B, T in shapes[name]:
            for prec in PRECISIONS[:1] if args.quick else PRECISIONS:
                log(f"memory: {name} {B}×{T} {prec}")
                got = {}
                for impl in ("rgpt", "autograd"):
                    if impl == "rgpt" and prec == "bf16" and not bm.has_compute_dtype():
                        got[impl] = "n/a (not yet)"
                    else:
                        got[impl] = run_memory_child(args, device, V, f"{impl}:{name}:{B}x{T}:{prec}")
                used = {k: v["peak"] - v["base"] for k, v in got.items() if isinstance(v, dict)}
                cells = [memory_cell(v, cpu) for v in got.values()]
                both = len(used) == 2 and used["autograd"] > 0
                share = f"{used['rgpt'] / used['autograd']:.2f}" if both else "—"
                rows.append([name, f"{B}×{T}", prec, *cells, share])
    what = "peak RSS MiB (+ above the RSS before the model was built)" if cpu else "max_memory_allocated MiB"
    return table(["model", "batch B×T", "precision", f"rgpt {what}", "autograd", "rgpt / autograd"], rows)


def bench_generation(args, device, V):
    rows, sync = [], bm.synchronizer(device)
    for name in args.models:
        for prec in PRECISIONS:
            cfg = bm.model_config(name, V, args.dropout)
            try:
                model = bm.new_rgpt(cfg, device, prec)
            except bm.NotAvailable as e:
                rows.append([name, prec, "—", f"n/a ({e})", "—", "—", "—", "—"])
                continue
            model.eval()
            model.pack_for_inference()  # as chat, eval and serve open a model (oneDNN's layout on CPU)
            g = torch.Generator().manual_seed(1)
            prompt = torch.randint(7, V, (args.prompt_len,), generator=g).tolist()
            for n_new in args.new_tokens:
                log(f"generate: {name} {prec} {n_new} tokens")
                secs, outs = bm.generation_rounds(model, prompt, n_new, args.rounds, sync)
                tok_s = {k: n_new / statistics.median(v) for k, v in secs.items()}
                same = next(
                    (
                        f"no, from token {i}"
                        for i, (a, b) in enumerate(zip(outs[True], outs[False]))
                        if a != b
                    ),
                    "yes",
                )
                rust = f"{tok_s[True] / RUST_GENERATE:.2f}×" if name == "small" else "—"
                cache, recompute = num(tok_s[True]), num(tok_s[False])
                rows.append([name, prec, n_new, cache, recompute, ratio(secs[True], secs[False]), same, rust])
    headers = ["model", "precision", "new tokens", "KV cache tok/s", "recompute tok/s", "cache / recompute"]
    headers.append("same tokens")
    return table(headers + ["× Rust ref"], rows)


def bench_tokenizer(args, tok):
    tok.encode("你好")  # jieba's dictionary loads on first use: not part of the throughput
    rows = []
    for kind, paths in (("pretrain", args.pretrain), ("sft", args.sft)):
        log(f"tokenizer: {kind}")
        rows.append([f"tokenizer, {kind} corpus", f"{num(tokenize_throughput(tok, paths, kind))} chars/s"])
    return rows


def bench_epoch(args, device, tok):
    name = args.models[0]
    cfg = bm.model_config(name, tok.vocab_size, args.dropout)
    log(f"epoch: {name} on {args.pretrain}")
    secs, n_tok, n_steps = bm.epoch_seconds(tok, args.pretrain, cfg, device, args.cache_dir, log=log)
    what = f"full pretraining epoch, model={name}, 16 sequences × 4 micro-batches a step"
    return [[what, f"{secs:.1f} s, {n_steps} steps, {n_tok:,} target tokens, {num(n_tok / secs)} tokens/s"]]


def bench_profile(args, device, V):
    """Phase times and the top ops of one rgpt training step at the first model's full window."""
    name, (B, T) = args.models[0], SHAPES[args.models[0]][-1]
    log(f"profile: {name} {B}×{T}")
    cfg = bm.model_config(name, V, args.dropout)
    idx, targets = bm.random_batch(cfg, B, T, device)
    phases = bm.rgpt_phases(cfg, device, idx, targets, repeats=max(args.rounds, 3))
    split = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items())
    ops = bm.profile_step(cfg, device, idx, targets)
    what = f"One rgpt training step, model={name}, {B}×{T}, fp32. Median phase times: {split}."
    return f"{what}\n\n```\n{ops}\n```"


# ---- report --------------------------------------------------------------------------------------
FOOTNOTES = """\
Notes.
- tok/s: tokens per second of whole training steps (forward, backward, gradient clipping at 5.0, Adam); median of the rounds. B×T rows: a fixed random batch, every position a target. "pretrain batch" / "sft batch" rows: the median-size micro-batch of an epoch of the built-in corpus as training builds it (length-bucketed and padded; sft with the user's turns masked out of the targets, which rgpt's output projection skips), counting its non-pad tokens; no FLOP count there.
- Model FLOPs per token = 6·N + 6·C·V + 12·L·T·C, with N = L·(4C² + 2C·F) the blocks' matmul weights (c_attn, attn.c_proj, c_fc, mlp.c_proj), 6·C·V the lm_head, and 12·L·T·C the attention scores and weighted sum (forward + backward, causal mask not discounted). Embedding lookups, LayerNorm, softmax and Adam are not counted. MFU = model FLOP/s ÷ the measured matmul ceiling of the same precision.
- autograd: tests/reference.py `RefGPT` with the same initial weights, `torch.optim.Adam` ({adam}) and `torch.nn.utils.clip_grad_norm_`, dropout masks drawn every step as rgpt draws them. bf16: `torch.autocast` around its forward (backward follows the autocast casts); rgpt bf16 is `GPT(..., dtype=torch.float32, compute_dtype=torch.bfloat16)`. compiled: `torch.compile(RefGPT, dynamic=False)` (inductor; the optimizer stays eager).
- Ratios are rgpt's speed over the other's (> 1: rgpt faster; memory: < 1 means rgpt uses less): the median of the per-round ratios, min–max in brackets. The variants take turns within each round, so a noisy machine slows them alike.
- Generation: greedy, batch 1, a {prompt}-token prompt prefilled in one pass, then {new} new tokens (no stop token); tok/s = new tokens ÷ (prefill + decode) seconds. recompute: `model.forward` over the whole sequence every step.
- Peak memory: each variant in a fresh process, building the model and optimizer and running 3 training steps. CPU: the RSS high-water mark, reset just before the model is built (after a throwaway tiny model has loaded torch's kernels); "+" is the growth from there, i.e. weights, gradients, optimizer state, activations and allocator slack, and the ratio compares these. CUDA: `torch.cuda.max_memory_allocated`.
- × Rust ref: context, not a like-for-like comparison (other machine): the Rust reference trains its smaller configuration (d=256, 2 blocks, = model=small) at ≈ 300 tokens/s (≈ 540 with a tuned allocator), one sequence at a time, and generates ≈ 470 tokens/s greedily. The column is rgpt tokens/s ÷ 300 (training) or ÷ 470 (KV-cache generation).
"""


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_allocator(args.allocator)  # for rgpt and the autograd reference alike: they share this process
    if args.memory_child:
        return memory_child(args, device, args.vocab)
    started, load0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), load()
    tok = None
    if args.vocab is None or args.only & {"tokenizer", "epoch"}:
        files = {"pretrain": args.pretrain, "sft": args.sft}
        tok = build_tokenizer(files, 2, 20000, False, args.cache_dir, log=log)  # TokenizerSettings' defaults
    V = args.vocab or tok.vocab_size
    ceiling = {p: bm.matmul_flops(args.matmul_n, DTYPES[p], device) for p in PRECISIONS}
    n = args.matmul_n
    parts = []
    if "train" in args.only:
        parts.append("## Training throughput\n\n" + bench_training(args, device, V, ceiling, tok))
    if "memory" in args.only:
        parts.append("## Peak memory of a training step\n\n" + bench_memory(args, device, V))
    if "generate" in args.only:
        parts.append("## Generation (greedy, batch 1)\n\n" + bench_generation(args, device, V))
    data = (bench_tokenizer(args, tok) if "tokenizer" in args.only else []) + (
        bench_epoch(args, device, tok) if "epoch" in args.only else []
    )
    if data:
        parts.append("## Data and a full epoch\n\n" + table(["what", "result"], data))
    if "profile" in args.only:
        parts.append("## Profile\n\n" + bench_profile(args, device, V))
    header = [
        "# rgpt benchmark",
        "",
        f"- date: {started}; load average {load0} at the start, {load()} at the end",
        f"- machine: {machine(device, args.allocator)}",
        f"- matmul ceiling ({n}×{n} @ {n}×{n}; the best of 5 at the start and 2 after each training row): "
        f"fp32 {num(ceiling['fp32'] / 1e9)} GFLOP/s, bf16 {num(ceiling['bf16'] / 1e9)} GFLOP/s",
        f"- vocabulary V = {V}; dropout {args.dropout}; {args.warmup} warm-up steps, then {args.rounds} "
        f"interleaved rounds of {args.steps} steps per variant" + (" (--quick)" if args.quick else ""),
    ]
    new = " or ".join(map(str, args.new_tokens))
    notes = FOOTNOTES.format(prompt=args.prompt_len, new=new, adam=ADAM_NOTE[args.ref_adam])
    report = "\n".join(header) + "\n\n" + "\n\n".join(parts) + "\n\n" + notes
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    log(f"written to {out}")


if __name__ == "__main__":
    with torch.no_grad():  # rgpt runs without autograd, as in training; the reference enables it itself
        friendly(main)()  # a bad --device is one line on stderr, not a traceback
