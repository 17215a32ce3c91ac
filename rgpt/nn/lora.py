"""LoRA (Hu et al., 2021): low-rank adapters on chosen projections of a frozen GPT, with the backward by hand.

A target Linear y = W0 x + b0 becomes  h = W0 x + b0 + (α/r)·B·A·drop(x),  A (r, in), B (out, r). A starts
Gaussian and B at zero, so the adapted model is the base model at step 0. W0, b0 and every other weight
of the base model are frozen: their layers return input gradients but compute no parameter gradient (not
even the dW0 product), and only A and B, in their own small parameter store, reach Adam.

`python -m rgpt.lora merge` (rgpt/runtime/adapters.py) writes W0 + (α/r)·B·A into a plain checkpoint.
"""

import math
from dataclasses import dataclass, field

import torch

from rgpt.nn.layers import Dropout, Layer, Linear, add_matmul_
from rgpt.nn.params import ParamStore
from rgpt.settings import check

FORMAT = "rgpt-lora/1"

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's projections


@dataclass
class LoRASettings:
    """stage=lora: h = W0 x + (alpha/r)·B·A·drop(x) on the targets, W0 frozen."""

    r: int = 8  # rank of the adapters: 8 is the common default, ~0.5% of model=base's parameters
    alpha: float = 16.0  # the update's scale is alpha/r = 2, as in the common r=8, alpha=16 setting
    # dropout on the adapters' input; the built-in dialogues are memorised, not generalised
    dropout: float = 0.0
    # projections that get adapters (also mlp.c_fc, mlp.c_proj): the attention's q/k/v and output, as in the paper
    targets: list = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj"])

    def validate(self) -> "LoRASettings":
        check(self.r >= 1, "lora.r", self.r, "must be at least 1")
        check(0 < self.alpha < math.inf, "lora.alpha", self.alpha, "must be positive and finite")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        check(
            len(self.targets) > 0
            and set(self.targets) <= set(LORA_TARGETS)
            and len(set(self.targets)) == len(self.targets),
            "lora.targets",
            self.targets,
            f"must name distinct projections among {', '.join(LORA_TARGETS)}",
        )
        return self


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
