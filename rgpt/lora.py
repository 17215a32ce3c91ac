"""LoRA (Hu et al., 2021): low-rank adapters on chosen projections of a frozen GPT, with the backward by hand.

A target Linear y = W0 x + b0 becomes  h = W0 x + b0 + (α/r)·B·A·drop(x),  A (r, in), B (out, r). A starts
Gaussian and B at zero, so the adapted model is the base model at step 0. W0, b0 and every other weight
of the base model are frozen: their layers return input gradients but compute no parameter gradient (not
even the dW0 product), and only A and B, in their own small parameter store, reach Adam.

    python -m rgpt.lora merge CHECKPOINT [--out DIR]

writes W0 + (α/r)·B·A into a plain checkpoint (DIR, default <run>/merged/final-<step>) that chat, eval and
serve load like any other; CHECKPOINT is a LoRA checkpoint or its run directory (best, else final, else last).
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from rgpt import checkpoint as ckpt
from rgpt.checkpoint import CheckpointError
from rgpt.config import LoRASettings
from rgpt.layers import Dropout, Layer, Linear, add_matmul_
from rgpt.params import ParamStore

FORMAT = "rgpt-lora/1"


class LoRALinear(Layer):
    """h = base(x) + (α/r)·B·A·drop(x): a frozen Linear plus a trained low-rank update (params lora_A, lora_B).

    `mode` is the model: its `training` flag switches the adapter's dropout with the model's own. Like the
    Linear it wraps, its products run in the compute dtype (A and B are then the store's bfloat16 working
    copy, their gradients float32), and h and the input gradient are in that dtype."""

    low_precision = True

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float, mode, generator):
        super().__init__()
        self.base, self.mode, self.scale = base, mode, alpha / r
        n_out, n_in = base.params["weight"].shape
        kw = dict(device=base.params["weight"].device, dtype=base.grads["weight"].dtype)  # the master dtype
        self.add_param("lora_A", torch.randn(r, n_in, **kw) / r)  # Gaussian, std 1/r (PEFT's "gaussian")
        self.add_param("lora_B", torch.zeros(n_out, r, **kw))  # zero: the model starts unchanged
        self.drop = Dropout(dropout, generator)
        base.frozen = True

    def forward(self, x):  # x: (..., in)
        h = self.base.forward(x)  # (..., out)
        A, B = self.params["lora_A"], self.params["lora_B"]
        self.drop.training = self.mode.training
        xd = self.drop.forward(x)
        x2 = xd.reshape(-1, xd.shape[-1]).to(A.dtype)  # (M, in)
        u = x2 @ A.t()  # (M, r)
        self.cache = (x2, u)
        return torch.addmm(h.view(-1, h.shape[-1]), u, B.t(), alpha=self.scale).view(h.shape)  # h + s·u Bᵀ

    def backward(self, dh):  # dh: (..., out)
        x2, u = self.cache
        A, B = self.params["lora_A"], self.params["lora_B"]
        dh2 = dh.reshape(-1, dh.shape[-1]).to(A.dtype)  # (M, out)
        # h += s · u Bᵀ:  dB += s · dhᵀ u,  du = s · dh B
        add_matmul_(self.grads["lora_B"], dh2.t(), u, alpha=self.scale)  # (out, r)
        du = (dh2 @ B).mul_(self.scale)  # (M, r)
        # u = xd Aᵀ:  dA += duᵀ xd,  dxd = du A
        add_matmul_(self.grads["lora_A"], du.t(), x2)  # (r, in)
        dxd = (du @ A).view(*dh.shape[:-1], A.shape[1])  # (..., in)
        self.cache = None
        dx = self.base.backward(dh) + self.drop.backward(dxd)  # W0's path (no dW0) + the adapter's
        return dx.to(A.dtype)  # the dropout mask is float32 at least; a Linear's dx is in the compute dtype


def _parent(block, target: str):
    """(layer holding the projection, its attribute name), e.g. (block.attn, "c_attn")."""
    owner, name = target.split(".")
    return getattr(block, owner), name


class Adapters:
    """LoRA adapters on the `targets` of every block of a GPT, in a ParamStore of their own.

    Attaching them freezes every layer of the model (its store is never written nor differentiated). Under
    mixed precision the adapters' store keeps a working copy in the model's compute dtype, as the model's does."""

    def __init__(self, model, cfg: LoRASettings):
        self.model, self.cfg = model, cfg
        for _, layer in model._named_layers():  # the base model learns nothing
            layer.frozen = True
        self.layers = {}  # "h.0.attn.c_attn" -> LoRALinear
        for i, block in enumerate(model.h):
            for target in cfg.targets:
                parent, name = _parent(block, target)
                lora = LoRALinear(
                    getattr(parent, name), cfg.r, cfg.alpha, cfg.dropout, model, model.generator
                )
                setattr(parent, name, lora)  # the block's forward and backward now go through the adapter
                self.layers[f"h.{i}.{target}"] = lora
        entries = [(f"{p}.{k}", lora.params[k], True) for p, lora in self.layers.items() for k in lora.params]
        self.store = ParamStore(
            entries, device=model.device, dtype=model.dtype, compute_dtype=model.compute_dtype
        )
        for p, lora in self.layers.items():
            for k in lora.params:
                lora.params[k], lora.grads[k] = (
                    self.store.compute_view(f"{p}.{k}"),
                    self.store.grads[f"{p}.{k}"],
                )

    def describe(self) -> dict:
        """adapter.json: what rebuilds these adapters on the same base model."""
        c = self.cfg
        return {
            "format": FORMAT,
            "r": c.r,
            "alpha": c.alpha,
            "dropout": c.dropout,
            "targets": list(c.targets),
        }

    def delta(self, name: str) -> torch.Tensor:
        """(α/r)·B·A of adapter `name` ("h.0.attn.c_attn") from the master weights: what merging adds to W0."""
        A, B = self.store.params[f"{name}.lora_A"], self.store.params[f"{name}.lora_B"]
        return self.layers[name].scale * (B @ A)  # (out, in)

    def merge(self) -> None:
        """W0 += (α/r)·B·A in the model's store, then take the adapters out: the model is plain again."""
        with self.model.store.write():
            for p in self.layers:
                self.model.params[f"{p}.weight"].add_(self.delta(p))
        for i, block in enumerate(self.model.h):
            for target in self.cfg.targets:
                parent, name = _parent(block, target)
                setattr(parent, name, self.layers[f"h.{i}.{target}"].base)
        for _, layer in self.model._named_layers():
            layer.frozen = False


def config_of(describe: dict, where) -> LoRASettings:
    """The LoRASettings of an adapter.json; CheckpointError if it is not one."""
    if describe.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an rgpt LoRA adapter (format {describe.get('format')!r})")
    cfg = LoRASettings(describe["r"], describe["alpha"], describe["dropout"], list(describe["targets"]))
    cfg.validate()
    return cfg


def base_of(meta: dict, where) -> Path:
    """The base checkpoint a LoRA checkpoint's state.json names, after checking it is still the same file."""
    base = meta.get("lora_base")
    if not base:
        raise CheckpointError(f"{where}: a LoRA checkpoint without its base model in state.json")
    path = Path(base["path"])
    if ckpt.read_state(path)["files"][ckpt.MODEL]["sha256"] != base["sha256"]:
        raise CheckpointError(f"{where}: its base model {path} has changed since the adapters were trained")
    return path


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
    from rgpt.model import GPT, GPTConfig
    from rgpt.tokenizer import Tokenizer

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
    return ckpt.save(out, "final", meta["step"], model, Tokenizer.load(path / ckpt.VOCAB), state)


def main(argv=None) -> None:
    from rgpt.cli import friendly

    parser = argparse.ArgumentParser(prog="python -m rgpt.lora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge a LoRA checkpoint into a plain checkpoint")
    m.add_argument("checkpoint", help="a LoRA checkpoint, or its run directory (outputs/lora/default)")
    m.add_argument("--out", help="directory of the merged checkpoint (default: <run>/merged)")
    args = parser.parse_args(argv)
    with torch.no_grad():
        out = friendly(merge_checkpoint)(args.checkpoint, args.out)
    print(f"merged → {out}")


if __name__ == "__main__":
    main()
