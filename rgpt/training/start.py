"""Where a run starts from: scratch, its own last checkpoint (exact resume), or another stage's weights.

Returns a plain `Start` record; the trainer never has to know which of the cases it is in beyond it.
"""

import base64
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rgpt.data import build_tokenizer
from rgpt.data.tokenizer import TokenizerBase
from rgpt.data.vocab import load_tokenizer
from rgpt.nn.model import GPT, GPTConfig
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.checkpoint import CheckpointError
from rgpt.training.settings import RunConfig


@dataclass
class Start:
    model: GPT
    tokenizer: TokenizerBase
    source: Path | None  # checkpoint the weights came from, if any
    state: dict | None  # its state.json when this is an exact resume of the same stage, else None


def _compute_dtype(cfg: RunConfig):
    return torch.bfloat16 if cfg.precision == "bf16" else None


def _model_config(cfg: RunConfig, vocab_size: int) -> GPTConfig:
    return dataclasses.replace(cfg.model, vocab_size=vocab_size)


def _from_checkpoint(cfg: RunConfig, path: Path, device, dtype, exact: bool, log) -> Start:
    meta = ckpt.read_state(path)
    saved = ckpt.model_config(meta, path)
    wanted = _model_config(cfg, saved.vocab_size).to_dict()
    diff = [
        f"{k}={v} (config {wanted[k]})"
        for k, v in saved.to_dict().items()
        if k != "dropout" and v != wanted[k]
    ]
    if diff:
        log(f"notice: using the checkpoint's architecture: {', '.join(diff)}")
    arch = dataclasses.replace(saved, dropout=cfg.model.dropout)  # regularisation is the run's choice
    model = GPT(arch, device=device, dtype=dtype, compute_dtype=_compute_dtype(cfg))
    ckpt.load_weights(model, ckpt.weights_of(meta, path))  # an adapters-only checkpoint: its base model's
    tok = load_tokenizer(path / ckpt.VOCAB)
    if exact and ckpt.OPTIM not in meta["files"]:
        raise CheckpointError(f"{path} holds weights only (no optimizer state) and cannot be resumed exactly")
    return Start(model, tok, path, meta if exact else None)


def _set_aside(run_dir: Path, log) -> None:
    """A fresh run in a directory with old checkpoints: keep them (renamed) rather than mixing two runs."""
    old = run_dir / "checkpoints"
    if old.is_dir() and any(old.iterdir()):
        dest = run_dir / f"checkpoints.prev-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(old), str(dest))
        log(f"notice: this run starts fresh; the previous checkpoints were moved to {dest}")


def _before(cfg: RunConfig, before, log) -> tuple[Path, Path | None]:
    """(where it was looked for, the best or final checkpoint) of stage `before`'s run of the same run_name
    to start from; under a sweep, its job of the same name first."""
    root = Path(cfg.out_dir) / before.name / cfg.run_name
    places = [root / cfg.job / "checkpoints"] if cfg.job else []
    places.append(root / "checkpoints")
    for pre in places:
        best = ckpt.find(pre, "best", warn=log) or ckpt.find(pre, "final", warn=log)
        if best is not None:
            return pre, best
    return places[0], None


def resolve_start(cfg: RunConfig, stage, device, dtype, log=print) -> Start:
    """Where the run of `stage` (a rgpt.training.stage.Stage class) starts from: see the module's doc."""
    run_ckpts = cfg.run_dir / "checkpoints"
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        meta = ckpt.read_state(path)
        exact = meta.get("stage") == cfg.stage and ckpt.OPTIM in meta["files"] and not cfg.weights_only
        log(f"{'resuming' if exact else 'starting from the weights of'} {path}")
        return _from_checkpoint(cfg, path, device, dtype, exact, log)
    if cfg.resume:
        path = ckpt.find(run_ckpts, "last", warn=log)
        if path is None:  # no intact `last`: the newest intact checkpoint of any kind
            candidates = [
                p for kind in ("epoch", "best", "final") if (p := ckpt.find(run_ckpts, kind, warn=log))
            ]
            path = max(candidates, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)
            if path is not None:
                log(f"notice: no intact `last` checkpoint; resuming from the newest intact one, {path}")
        if path is not None:
            log(f"resuming {path}")
            return _from_checkpoint(cfg, path, device, dtype, True, log)
        before = stage.starts_from
        if before is not None:
            pre, best = _before(cfg, before, log)
            if best is None:
                raise CheckpointError(
                    f"nothing to start {cfg.stage} from: no checkpoint in {run_ckpts} nor a {before.model_word} "
                    f"model in {pre}; run `python -m rgpt.train stage={before.name}` first"
                )
            log(
                f"starting {stage.work} from the {before.model_word} model {best} (fresh optimizer and schedule)"
            )
            return _from_checkpoint(cfg, best, device, dtype, False, log)
        raise CheckpointError(
            f"nothing to resume: no checkpoint in {run_ckpts}; run without resume=true to start"
        )
    if stage.needs_model:
        raise CheckpointError(
            f"stage={cfg.stage} tunes a trained model: add resume=true (starts from {stage.starts_from.name}'s "
            "best model) or resume_from=CHECKPOINT"
        )
    _set_aside(cfg.run_dir, log)
    t = cfg.tokenizer
    tok = build_tokenizer(
        t.files,
        t.min_freq,
        t.max_size,
        t.hmm,
        cfg.data.cache_dir,
        log=log,
        workers=cfg.data.workers,
        split_digits=t.split_digits,
    )
    model = GPT(
        _model_config(cfg, tok.vocab_size), device=device, dtype=dtype, compute_dtype=_compute_dtype(cfg)
    )
    return Start(model, tok, None, None)


# ---- random number generator states, as JSON-safe strings ------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(model) -> dict:
    out = {"torch": _b64(torch.get_rng_state()), "dropout": _b64(model.generator.get_state())}
    if model.device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(model.device))
    return out


def set_rng_state(model, state: dict, log=print) -> None:
    """Restore the random streams of a checkpoint. A CPU generator's state means nothing to a CUDA one
    and back, so a run resumed on the other kind of device draws new dropout masks (seeded from the
    checkpoint, so still reproducible): said once, since the run then no longer matches an unbroken one."""
    torch.set_rng_state(_unb64(state["torch"]))
    dropout = _unb64(state["dropout"])
    try:
        model.generator.set_state(dropout)
    except RuntimeError:  # the state of the other kind of generator: its size differs
        model.generator.manual_seed(int.from_bytes(dropout[:8].numpy().tobytes(), "little"))
        log(
            f"notice: this checkpoint's dropout generator is not a {model.device.type} one: dropout masks are "
            "drawn anew from here (exact resume holds on the kind of device the run was saved on)"
        )
    if "cuda" in state and model.device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(state["cuda"]), model.device)
