"""What scripts/bench.py measures, one thing per function: a training step of rgpt or of the autograd
reference, model FLOPs, the matrix-product ceiling, greedy generation, peak memory, an epoch.

bench.py decides the order (interleaved rounds) and prints the tables; nothing here prints.
"""

import inspect
import math
import resource
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from rgpt.cli import CONF_DIR
from rgpt.data import Batcher, DataConfig, prepare
from rgpt.inference.generate import DecodeConfig, generate
from rgpt.nn.model import GPT, GPTConfig
from rgpt.nn.optim import Adam, clip_coef

ROOT = Path(__file__).resolve().parent.parent
LR, CLIP = 5e-4, 5.0  # the pretraining stage's learning rate and clip norm (rgpt/conf/stage/pretrain.yaml)
TINY = dict(n_embd=32, n_head=4, n_layer=2, n_hidden=64, block_size=32)  # --quick only
# a throwaway model that loads torch's kernels before memory is measured
WARM = dict(n_embd=8, n_head=2, n_layer=1, n_hidden=8, block_size=8)


class NotAvailable(Exception):
    """A variant that cannot run here; str(e) goes into the table cell as "n/a (…)"."""


def model_config(name: str, vocab_size: int, dropout: float) -> GPTConfig:
    """GPTConfig of rgpt/conf/model/<name>.yaml (or the tiny --quick shape) with the given vocabulary."""
    if name == "quick":
        arch = dict(TINY)
    else:
        # what the preset changes from GPTConfig's defaults
        arch = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text(encoding="utf-8")) or {}
    arch["dropout"] = dropout
    return GPTConfig(vocab_size=vocab_size, **arch)


def flops_per_token(cfg: GPTConfig, T: int) -> int:
    """Training FLOPs per token: 6 × (block matmul weights) + 6·C·V (lm_head) + 12·L·T·C (attention)."""
    C, F, L, V = cfg.n_embd, cfg.n_hidden, cfg.n_layer, cfg.vocab_size
    block_matmul = L * (4 * C * C + 2 * C * F)  # c_attn 3C², attn.c_proj C², c_fc C·F, mlp.c_proj F·C
    return 6 * block_matmul + 6 * C * V + 12 * L * T * C


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_flops(n: int, dtype, device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of an (n × n) @ (n × n) product in `dtype`: the ceiling that MFU is measured against."""
    sync = synchronizer(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = a @ b  # warm-up: thread pool, kernel selection
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def random_batch(cfg: GPTConfig, B: int, T: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, cfg.vocab_size, (B, T + 1), generator=g)  # past the special ids
    idx, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # (B, T) each, as collate makes them
    return idx.to(device), targets.to(device)


def corpus_batch(tok, files, kind: str, cfg: GPTConfig, batch_size: int, cache_dir, device):
    """The median-size micro-batch of a corpus epoch exactly as training builds it: length-bucketed and
    padded, and for dialogues with the user's turns masked out of the targets (as the sft stage does)."""
    # all documents; val unused
    data = DataConfig(files=list(files), kind=kind, val_files=list(files), cache_dir=str(cache_dir))
    train, _ = prepare(data, tok, cfg.block_size, log=lambda *a, **k: None)
    batches = sorted(Batcher(train, batch_size, seed=0).epoch(0), key=lambda b: b.idx.numel())
    b = batches[len(batches) // 2]
    return b.idx.to(device), b.targets.to(device)


# ---- training steps: each builder returns step() doing forward, backward, clipping and Adam -------------
def has_compute_dtype() -> bool:
    """Whether this rgpt has mixed precision yet (GPT(..., compute_dtype=torch.bfloat16))."""
    return "compute_dtype" in inspect.signature(GPT).parameters


def new_rgpt(cfg: GPTConfig, device, precision: str) -> GPT:
    kw = {}
    if precision == "bf16":
        if not has_compute_dtype():
            raise NotAvailable("not yet")
        kw["compute_dtype"] = torch.bfloat16
    torch.manual_seed(0)
    return GPT(cfg, device=device, dtype=torch.float32, **kw)


def rgpt_step(cfg, device, precision, idx, targets):
    model = new_rgpt(cfg, device, precision)
    opt = Adam(model.store)

    def step():
        model.zero_grad()
        model.forward(idx, targets)
        model.backward()
        _, clip = clip_coef(model.store.grad, CLIP)
        opt.step(LR, grad_scale=clip)  # clipping happens in Adam's pass over the gradient

    return step


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (Unix); a no-op elsewhere or for <= 0."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def reference_step(cfg, device, precision, idx, targets, compiled=False, same_weights=True, adam=None):
    """The same architecture with torch.nn + autograd + torch.optim.Adam (tests/reference.py).

    Dropout masks are drawn every step exactly as rgpt draws them, so both do the same work. Under bf16
    the forward runs in torch.autocast (the backward follows autocast's casts, as recommended).
    same_weights=False skips building an rgpt model to copy from (for memory: nothing else allocated).
    adam: extra torch.optim.Adam arguments ({"fused": True}, ...); its defaults otherwise.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.reference import RefGPT, reference_from

    if same_weights:
        ref = reference_from(new_rgpt(cfg, device, "fp32"))  # rgpt's initial weights
    else:
        ref = RefGPT(cfg).to(device)
    ref.train()
    params = list(ref.parameters())
    opt = torch.optim.Adam(params, lr=LR, **(adam or {}))
    forward = ref
    if compiled:
        torch._dynamo.reset()  # a fresh cache per configuration: no silent fallback after recompile limits
        forward = torch.compile(ref, dynamic=False)
    B, T = idx.shape
    keep = 1.0 - cfg.dropout

    def masks():
        if cfg.dropout == 0.0:
            return None
        shape = (B, T, cfg.n_embd)
        return [
            tuple(torch.rand(shape, device=device).lt_(keep).div_(keep) for _ in range(2))
            for _ in range(cfg.n_layer)
        ]

    def step():
        with torch.enable_grad():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = forward(idx, targets, masks())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()

    return step


def build_step(impl, cfg, device, precision, idx, targets, compile_timeout=0.0, for_memory=False, adam=None):
    """impl: rgpt | autograd | compiled. The compiled variant compiles in its first two steps, here."""
    if impl == "rgpt":
        return rgpt_step(cfg, device, precision, idx, targets)
    if impl == "autograd":
        return reference_step(cfg, device, precision, idx, targets, same_weights=not for_memory, adam=adam)
    step = reference_step(cfg, device, precision, idx, targets, compiled=True, adam=adam)
    try:
        with time_limit(compile_timeout):
            step()
            step()  # the backward graph compiles on the first backward; a second call checks the guards
    except Exception as e:  # inductor needs a C++ compiler on CPU, Triton on CUDA, ...
        torch._dynamo.reset()
        cause = e
        while cause is not None and not isinstance(cause, TimeoutError):  # dynamo may wrap the timeout
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise NotAvailable(f"compile {str(cause).splitlines()[0]}") from None
        first = (str(e).strip().splitlines() or [""])[0][:80]
        raise NotAvailable(f"compile failed: {type(e).__name__}: {first}") from None
    return step


def time_steps(step, n: int, sync) -> float:
    """Seconds per call of step(), over n calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n


# ---- memory --------------------------------------------------------------------------------------
def _proc_status(key: str) -> float:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {key} in /proc/self/status")


def peak_memory(impl, cfg, device, precision, B, T, steps=3, adam=None) -> dict:
    """Peak memory (MiB) of building a variant and training it for a few steps, in this fresh process.

    CUDA: max_memory_allocated. CPU (Linux): the RSS high-water mark, reset just before the model is built
    (/proc/self/clear_refs), after a throwaway tiny model of the same kind has run one step, so torch's
    lazily loaded kernels and imports are in the "base" RSS and not charged to the model.
    """
    idx, targets = random_batch(cfg, B, T, device)
    tiny = GPTConfig(**{**cfg.to_dict(), **WARM})
    build_step(impl, tiny, device, precision, *random_batch(tiny, 2, 8, device), for_memory=True, adam=adam)()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            base = _proc_status("VmRSS")
        except OSError:  # not Linux: the lifetime peak (Linux units), imports included
            base = None
    step = build_step(impl, cfg, device, precision, idx, targets, for_memory=True, adam=adam)
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"peak": torch.cuda.max_memory_allocated(device) / 2**20, "base": base}
    if base is None:
        return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base": 0.0}
    return {"peak": _proc_status("VmHWM"), "base": base}


# ---- generation ----------------------------------------------------------------------------------
def greedy(model, prompt, n_new: int, use_cache: bool, sync):
    """(new ids, seconds) of greedy decoding of exactly n_new tokens after `prompt` (no stop ids)."""
    cfg = DecodeConfig(method="greedy", max_new_tokens=n_new, min_new_tokens=0)
    sync()
    t0 = time.perf_counter()
    out = generate(model, prompt, cfg, stop_ids=(), use_cache=use_cache)
    sync()
    return out, time.perf_counter() - t0


def generation_rounds(model, prompt, n_new: int, rounds: int, sync):
    """Seconds of each greedy run with (True) and without (False) the KV cache, taking turns, and the
    tokens each produced last."""
    for use_cache in (True, False):
        greedy(model, prompt, 4, use_cache, sync)  # warm-up
    secs, outs = {True: [], False: []}, {}
    for r in range(rounds):
        for use_cache in (True, False) if r % 2 == 0 else (False, True):
            outs[use_cache], s = greedy(model, prompt, n_new, use_cache, sync)
            secs[use_cache].append(s)
    return secs, outs


# ---- where the time of an rgpt step goes ----------------------------------------------------------
def rgpt_phases(cfg, device, idx, targets, repeats=3) -> dict:
    """Median seconds of each phase of an rgpt training step (after one untimed step)."""
    model = new_rgpt(cfg, device, "fp32")
    opt = Adam(model.store)
    state = {}
    phases = {
        "forward": lambda: model.forward(idx, targets),
        "backward": model.backward,
        "clip": lambda: state.update(clip=clip_coef(model.store.grad, CLIP)[1]),  # the norm and factor
        "Adam": lambda: opt.step(LR, grad_scale=state["clip"]),  # the scaling happens here
    }
    sync, times = synchronizer(device), {k: [] for k in phases}
    for i in range(repeats + 1):
        model.zero_grad()
        for name, run in phases.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def profile_step(cfg, device, idx, targets, rows: int = 15) -> str:
    """torch.profiler's table of the ops that took the most time in one rgpt fp32 training step."""
    from torch.profiler import ProfilerActivity, profile

    step = rgpt_step(cfg, device, "fp32", idx, targets)
    step()
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        synchronizer(device)()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ---- a pretraining epoch -------------------------------------------------------------------------
def epoch_seconds(tok, files, cfg, device, cache_dir, batch_size=16, grad_accum=4, log=None):
    """One epoch of the pretraining corpus as the trainer runs it (token-weighted accumulation, clipping,
    Adam, one host sync per step). Returns (seconds, tokens, optimizer steps); tokenization is cached
    beforehand and not timed."""
    log = log or (lambda *a: None)
    train, _ = prepare(DataConfig(files=list(files), cache_dir=str(cache_dir)), tok, cfg.block_size, log=log)
    model = new_rgpt(cfg, device, "fp32")
    opt = Adam(model.store)
    batches = Batcher(train, batch_size, seed=0, pin_memory=device.type == "cuda")
    sync = synchronizer(device)
    n_tokens = n_steps = 0

    def run(group):
        n_total = sum(b.n_tokens for b in group)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        model.zero_grad()
        for b in group:
            b = b.to(device)
            loss_sum += model.forward(b.idx, b.targets).double() * b.n_tokens
            model.backward(scale=b.n_tokens / n_total)
        _, clip = clip_coef(model.store.grad, CLIP)
        opt.step(LR, grad_scale=clip)
        return float(loss_sum) / n_total

    sync()
    t0 = time.perf_counter()
    group = []
    for b in batches.epoch(0):
        group.append(b)
        n_tokens += b.n_tokens
        if len(group) == grad_accum:
            run(group)
            group, n_steps = [], n_steps + 1
    if group:
        run(group)
        n_steps += 1
    sync()
    return time.perf_counter() - t0, n_tokens, n_steps
