"""Training health for TensorBoard (monitor.diagnostics, every monitor.diagnostics_every steps), after the
statistics of makemore part 3: what the gradients, the updates and the activations of one step look like.

Per parameter tensor:
    grad_norm/<name>     L2 norm of the step's gradient (summed over micro-batches and ranks, before clipping)
    update_ratio/<name>  log10(std(update) / std(weight)), the update being lr * Adam's step (clipping and
                         weight decay included): how far one step moves a tensor relative to its size.
                         Around -3 is healthy (a thousandth of the weight a step); well above (-1.5) the
                         learning rate is too high for that tensor, well below (-4.5) it barely learns
    weights/<name>, grads/<name>   histograms
Per block (wte, h.0 ... h.N-1, ln_f, lm_head):
    block_grad_norm/<block>   the norm of all its gradients: where the loss's gradient lands
Per MLP (from the first micro-batch's forward, padding left out):
    act_mean/<block>.mlp, act_std/...  of the activation
    act_inactive/...   share of activations on the flat side: ReLU's zeros, GELU's tail (input < -3),
                       SwiGLU's gate tail (gate input < -5)
    act_dead/...       share of units inactive at every position of the micro-batch (a dead ReLU unit
                       gets no gradient, so stays dead)
Per attention head: attn_entropy/<block>.head_<j>, mean entropy in bits of its rows (0: each position looks
at one token; log2(t+1): evenly at all of them).

Activation and attention statistics are read from what the forward pass already keeps for its backward, so
a step without diagnostics does no extra work at all.
"""

import math

import torch

from rgpt.data.tokenizer import PAD_ID

GROUPS = (
    "grad_norm",
    "update_ratio",
    "block_grad_norm",
    "act_mean",
    "act_std",
    "act_inactive",
    "act_dead",
    "attn_entropy",
)
HISTOGRAMS = ("weights", "grads")
# below these inputs an activation is flat, and its unit passes almost no gradient: |GELU'(x)| < 0.012
# under -3, |SiLU'(g)| < 0.03 under -5 (SwiGLU's gate)
TAIL = {"gelu": -3.0, "swiglu": -5.0}


def block_of(name: str) -> str:
    """h.3.attn.c_attn.weight -> h.3; wte.weight -> wte."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "h" else parts[0]


class StepProbe:
    """The diagnostics of one optimizer step, gathered at three moments of it (see the trainer):
    activations() after the first micro-batch's forward, gradients() once the gradient is complete,
    updates() after the optimizer's step. `scalars` and `histograms` are then ready for the monitor."""

    def __init__(self):
        self.scalars: dict[str, float] = {}
        self.histograms: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def activations(self, model, idx) -> None:
        real = idx != PAD_ID  # (B, T) positions that are not padding
        for i, block in enumerate(model.h):
            self._mlp(f"h.{i}.mlp", block.mlp, real)
            att = block.attn.last_attention()  # (B, H, T, T)
            if att is not None:
                p = att.float()
                plogp = torch.where(p > 0, p * torch.log2(p.clamp_min(1e-30)), torch.zeros_like(p))
                entropy = -plogp.sum(-1)  # (B, H, T)
                per_head = (entropy * real[:, None, :]).sum((0, 2)) / real.sum().clamp_min(1)  # (H,)
                for j, e in enumerate(per_head.tolist()):
                    self.scalars[f"attn_entropy/h.{i}.head_{j}"] = e

    def _mlp(self, tag: str, mlp, real) -> None:
        kind, cache = getattr(mlp, "activation", None), mlp.cache
        if cache is None or kind not in ("relu", "gelu", "swiglu"):
            return  # an activation these statistics do not know yet: nothing rather than something wrong
        if kind == "relu":  # the cache is ReLU's output
            a = cache[real].float()  # (N, F)
            inactive = a <= 0
        elif kind == "gelu":  # the cache is GELU's input
            h = cache[real].float()
            a, inactive = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))), h < TAIL["gelu"]
        else:  # swiglu: the gate g, the value u and sigmoid(g)
            g, u, sg = (t[real].float() for t in cache)
            a, inactive = g * sg * u, g < TAIL["swiglu"]
        self.scalars[f"act_mean/{tag}"] = float(a.mean())
        self.scalars[f"act_std/{tag}"] = float(a.std()) if a.numel() > 1 else 0.0
        self.scalars[f"act_inactive/{tag}"] = float(inactive.float().mean())
        self.scalars[f"act_dead/{tag}"] = float(inactive.all(0).float().mean())

    def gradients(self, model) -> None:
        """The complete gradient (before clipping, which the optimizer applies): norms and histograms; and
        the weights before the update, for updates()."""
        blocks: dict[str, float] = {}
        for name, g in model.grads.items():
            sq = float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
            self.scalars[f"grad_norm/{name}"] = math.sqrt(sq)
            blocks[block_of(name)] = blocks.get(block_of(name), 0.0) + sq
            self.histograms[f"grads/{name}"] = g.detach().float().cpu()
            self._before[name] = model.params[name].detach().clone()
        for block, sq in blocks.items():
            self.scalars[f"block_grad_norm/{block}"] = math.sqrt(sq)

    def updates(self, model) -> None:
        for name, p in model.params.items():
            before = self._before.pop(name)
            self.histograms[f"weights/{name}"] = p.detach().float().cpu()
            data, step = before.float().std(), (p.float() - before.float()).std()  # p - before: exact
            if data > 0 and step > 0:  # a zero-initialised bias has no scale yet; a frozen weight no step
                self.scalars[f"update_ratio/{name}"] = math.log10(float(step / data))
