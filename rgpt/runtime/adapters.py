"""A LoRA checkpoint's files: its adapter.json, and merging its adapters into a plain checkpoint.

    python -m rgpt.lora merge CHECKPOINT [--out DIR]

writes W0 + (α/r)·B·A into a plain checkpoint (DIR, default <run>/merged/final-<step>) that chat, eval and
serve load like any other; CHECKPOINT is a LoRA checkpoint or its run directory (best, else final, else last).
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

from rgpt.data.vocab import load_tokenizer
from rgpt.nn.lora import FORMAT, Adapters, LoRASettings
from rgpt.nn.model import GPT, GPTConfig
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.checkpoint import CheckpointError, base_of


def config_of(describe: dict, where) -> LoRASettings:
    """The LoRASettings of an adapter.json; CheckpointError if it is not one."""
    if describe.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an rgpt LoRA adapter (format {describe.get('format')!r})")
    cfg = LoRASettings(describe["r"], describe["alpha"], describe["dropout"], list(describe["targets"]))
    cfg.validate()
    return cfg


# ---- python -m rgpt.lora merge -------------------------------------------------------------------------
def _find(path: Path) -> Path:
    """A LoRA checkpoint: `path` itself, or the best / final / last one of a run or checkpoints directory."""
    if (path / ckpt.STATE).exists():
        return path
    for d in (path / "checkpoints", path):
        for kind in ("best", "final", "last"):
            found = ckpt.find(d, kind, warn=lambda m: print(f"note: {m}", file=sys.stderr))
            if found is not None:
                return found
    raise CheckpointError(f"no checkpoint in {path}")


def merge_checkpoint(path, out=None) -> Path:
    """Merge a LoRA checkpoint's adapters into its base model and save a plain checkpoint; returns its path."""
    path = _find(Path(path))
    meta = ckpt.read_state(path)
    if ckpt.ADAPTER not in meta["files"]:
        raise CheckpointError(f"{path} holds no LoRA adapters ({ckpt.ADAPTER}): nothing to merge")
    model = GPT(GPTConfig(**meta["model_config"]))
    ckpt.load_weights(model, base_of(meta, path))
    lora_cfg = config_of(json.loads((path / ckpt.ADAPTER_CONFIG).read_text(encoding="utf-8")), path)
    adapters = Adapters(model, lora_cfg)
    try:
        adapters.store.load(ckpt.load_tensors(path, ckpt.ADAPTER))
    except ValueError as e:
        raise CheckpointError(f"{path / ckpt.ADAPTER} does not match its adapter.json: {e}") from None
    adapters.merge()
    out = Path(out) if out is not None else path.parent.parent / "merged"
    state = {
        "stage": meta["stage"],
        "merged_from": str(path),
        "lora_base": meta["lora_base"],
        "lora": asdict(lora_cfg),
    }
    return ckpt.save(out, "final", meta["step"], model, load_tokenizer(path / ckpt.VOCAB), state)
