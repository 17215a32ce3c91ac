"""Checkpoints: safetensors + JSON directories, written atomically, verified on load. No pickle anywhere.

A checkpoint is a directory ``<kind>-<step>`` under a run's ``checkpoints/`` (kind: last, best, epoch, final):
    model.safetensors      weights by nanoGPT-style name
    optimizer.safetensors  Adam's step, m and v per parameter (absent for weights-only checkpoints)
    vocab.json             the tokenizer
    state.json             epoch, step, losses, schedule position, RNG states, model config, versions,
                           and the size + sha256 of every other file (so truncation or corruption is caught)
It is written into a hidden temporary directory, fsynced, and renamed into place: a process killed at any
instant leaves the previous checkpoints intact and never a half-written one under a real name. Deleting (pruning,
replacing) renames to a hidden name first, for the same reason; hidden leftovers of killed processes are swept.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_KINDS = ("last", "best", "epoch", "final")
STATE, MODEL, OPTIM, VOCAB = "state.json", "model.safetensors", "optimizer.safetensors", "vocab.json"
ADAPTER, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"  # a LoRA checkpoint's, instead of MODEL


class CheckpointError(Exception):
    """A missing, truncated, corrupted or mismatched checkpoint; the message is one line naming the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed to a hidden name first, so a kill mid-way never leaves a
    half-deleted directory under a real name."""
    hidden = path.with_name(f".del-{path.name}-{os.getpid()}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _sweep(ckpt_dir: Path) -> None:
    """Remove hidden temporary directories left by processes that were killed while saving or deleting."""
    for p in ckpt_dir.glob(".*-*"):
        pid = p.name.rsplit("-", 1)[1]
        if not (p.name.startswith((".tmp-", ".del-")) and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # still running (e.g. another run saving here): leave it alone
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def save(
    ckpt_dir, kind: str, step: int, model, tokenizer, state: dict, optimizer=None, adapters=None
) -> Path:
    """Write checkpoint `<kind>-<step>` atomically and return its path.

    adapters (rgpt.nn.lora.Adapters): write them (adapter.safetensors + adapter.json) instead of the model's
    weights, which stay in the base checkpoint that state.json names."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _sweep(ckpt_dir)
    final = ckpt_dir / f"{kind}-{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if adapters is None:
        save_file(model.store.state_dict(), tmp / MODEL)
    else:
        save_file(adapters.store.state_dict(), tmp / ADAPTER)
        text = json.dumps(adapters.describe(), ensure_ascii=False, indent=1)
        (tmp / ADAPTER_CONFIG).write_text(text, encoding="utf-8")
    if optimizer is not None:
        save_file({k: v.contiguous().clone().cpu() for k, v in optimizer.state_dict().items()}, tmp / OPTIM)
    tokenizer.save(tmp / VOCAB)
    files = {}
    for name in (MODEL, ADAPTER, ADAPTER_CONFIG, OPTIM, VOCAB):
        if (tmp / name).exists():
            _fsync(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    meta = {
        **state,
        "kind": kind,
        "step": step,
        "model_config": model.config.to_dict(),
        "files": files,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "format": 1},
    }
    (tmp / STATE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    _fsync(tmp / STATE)
    if final.exists():  # the same step saved twice (e.g. `final` after a resumed run): replace it
        _remove(final)
    os.replace(tmp, final)
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def read_state(path) -> dict:
    """state.json of checkpoint `path`, after checking that every file it lists is present and intact."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        meta = json.loads((path / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted {path / STATE}: {e}") from None
    if MODEL not in meta.get("files", {}) and ADAPTER not in meta.get("files", {}):
        raise CheckpointError(f"{path / STATE} lists no {MODEL}: not an rgpt checkpoint")
    for name, info in meta["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"missing file {f}")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"truncated file {f}: {f.stat().st_size} bytes, expected {info['bytes']}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"corrupted file {f}: checksum mismatch")
    return meta


def load_tensors(path, name=MODEL, device="cpu") -> dict[str, torch.Tensor]:
    f = Path(path) / name
    try:
        return load_file(f, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from None


def load_weights(model, path) -> None:
    """Copy checkpoint weights into `model` by name; names and shapes must match exactly."""
    tensors = load_tensors(path, device=model.device)
    try:
        model.store.load(tensors)
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / MODEL} does not match the model: {e}") from None


def list_checkpoints(ckpt_dir, kind: str) -> list[Path]:
    """Checkpoints of one kind, newest (highest step) first; hidden temporary directories never appear."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [
        p
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith(f"{kind}-") and p.name[len(kind) + 1 :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(kind) + 1 :]), reverse=True)


def find(ckpt_dir, kind: str, warn=print) -> Path | None:
    """The newest intact checkpoint of `kind` ('best': the lowest monitored loss), skipping damaged ones."""
    intact = []
    for p in list_checkpoints(ckpt_dir, kind):
        try:
            intact.append((p, read_state(p)))
        except CheckpointError as e:
            warn(f"skipping damaged checkpoint: {e}")
    if not intact:
        return None
    if kind == "best":
        return min(intact, key=lambda ps: ps[1].get("monitor_value", float("inf")))[0]
    return intact[0][0]


def prune(ckpt_dir, kind: str, keep: int, current=None) -> None:
    """Delete all but the `keep` newest checkpoints of a kind ('best': all but the `keep` lowest losses).

    `current`, the checkpoint just written, counts as the newest whatever its step: after a resume from an
    older checkpoint, the abandoned (or damaged) later ones go first.
    """
    paths = list_checkpoints(ckpt_dir, kind)
    if current is not None:
        paths = [Path(current)] + [p for p in paths if p != Path(current)]
    if kind == "best":

        def loss_of(p):
            try:
                return json.loads((p / STATE).read_text(encoding="utf-8")).get("monitor_value", float("inf"))
            except (OSError, ValueError):
                return float("inf")

        paths = sorted(paths, key=loss_of)
    for p in paths[keep:]:
        _remove(p)


def model_config(meta: dict, path):
    """The GPTConfig a checkpoint's state.json records (one it predates takes its defaults)."""
    from rgpt.nn.model import GPTConfig  # imported here: the model does not depend on checkpoints

    try:
        return GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / STATE}: bad model_config ({e})") from None


def load_model(path, device="cpu", dtype=torch.float32, compute_dtype=None):
    """(model in eval mode, tokenizer, state) from a checkpoint directory, for inference.

    compute_dtype=torch.bfloat16: the matrix products read bfloat16 copies of the weights, as training's
    precision=bf16 computes them (norms, embeddings and the KV cache stay float32)."""
    from rgpt.data.vocab import load_tokenizer
    from rgpt.nn.model import GPT  # imported here: the model does not depend on checkpoints

    path = Path(path)
    meta = read_state(path)
    if ADAPTER in meta["files"]:
        raise CheckpointError(
            f"{path} holds LoRA adapters only: merge them into a model first (python -m rgpt.lora merge {path})"
        )
    model = GPT(model_config(meta, path), device=device, dtype=dtype, compute_dtype=compute_dtype)
    load_weights(model, path)
    model.eval()
    return model, load_tokenizer(path / VOCAB), meta


def default_for_inference(out_dir, warn=print) -> Path | None:
    """The best checkpoint of the newest SFT run under out_dir; else the newest pretraining run's, with a notice."""
    for stage in ("sft", "pretrain"):
        found_dirs = [
            *Path(out_dir, stage).glob("*/checkpoints"),
            *Path(out_dir, stage).glob("*/*/checkpoints"),
        ]
        runs = sorted(found_dirs, key=lambda p: p.stat().st_mtime, reverse=True)  # */*/: sweep jobs
        for ckpt_dir in runs:
            for kind in ("best", "final", "last"):
                found = find(ckpt_dir, kind, warn)
                if found is not None:
                    if stage == "pretrain":
                        warn(
                            f"no instruction-tuned (SFT) checkpoint found; using the pretrained model {found}"
                        )
                    return found
    return None


def base_of(meta: dict, where) -> Path:
    """The base checkpoint a LoRA checkpoint's state.json names, after checking it is still the same file."""
    base = meta.get("lora_base")
    if not base:
        raise CheckpointError(f"{where}: a LoRA checkpoint without its base model in state.json")
    path = Path(base["path"])
    if read_state(path)["files"][MODEL]["sha256"] != base["sha256"]:
        raise CheckpointError(f"{where}: its base model {path} has changed since the adapters were trained")
    return path


def weights_of(meta: dict, path) -> Path:
    """The checkpoint whose model.safetensors holds the weights of checkpoint `path`: itself, or for one that
    holds adapters only (a LoRA checkpoint), its base model's."""
    return base_of(meta, path) if ADAPTER in meta["files"] else Path(path)
