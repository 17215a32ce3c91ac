"""The same GPT written the ordinary way, with torch.nn and autograd: the yardstick rgpt is checked against.

Parameter names match rgpt's (nanoGPT style), so `load_state_dict(rgpt_model.params)` copies weights across.
Used by the tests (gradients, Adam trajectories) and by scripts/bench.py (the autograd baseline).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoids(n_pos, n_embd):
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float64) * (-math.log(10000.0) / n_embd))
    pe = torch.zeros(n_pos, n_embd, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : n_embd // 2]
    return pe


def rope(x, start=0):
    """Rotary embedding written from the complex form: pair j = (x_j, x_{j+D/2}) as x_j + i x_{j+D/2},
    multiplied by exp(i * pos * 10000^(-2j/D))."""
    T, D = x.shape[-2], x.shape[-1]
    pos = torch.arange(start, start + T, dtype=torch.float64)[:, None]
    theta = pos * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (T, D/2)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double()) * torch.polar(
        torch.ones_like(theta), theta
    )
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


class RefAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = getattr(cfg, "n_kv_head", 0) or cfg.n_head
        self.rope = getattr(cfg, "pos", "sinusoidal") == "rope"
        bias = getattr(cfg, "bias", True)
        kv = self.n_kv_head * cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv, bias=bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)

    def forward(self, x, key_padding_mask=None):
        B, T, C = x.shape
        D = C // self.n_head
        q, k, v = self.c_attn(x).split((C, self.n_kv_head * D, self.n_kv_head * D), dim=2)
        q = q.view(B, T, self.n_head, D).transpose(1, 2)
        # grouped-query attention written the plain way: each kv head copied for its n_head / n_kv_head q heads
        k, v = (
            t.view(B, T, self.n_kv_head, D)
            .transpose(1, 2)
            .repeat_interleave(self.n_head // self.n_kv_head, 1)
            for t in (k, v)
        )
        if self.rope:
            q, k = rope(q), rope(k)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        if key_padding_mask is not None:
            mask = mask | key_padding_mask[:, None, None, :]
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        if key_padding_mask is not None:
            att = torch.where(torch.isnan(att), torch.zeros_like(att), att)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class RefMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        width = round(2 * cfg.n_hidden / 3) if self.swiglu else cfg.n_hidden
        bias = getattr(cfg, "bias", True)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * width if self.swiglu else width, bias=bias)
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=bias)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()

    def forward(self, x):
        if self.swiglu:
            g, u = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(g) * u)
        return self.c_proj(self.act(self.c_fc(x)))


def norm(cfg):
    if getattr(cfg, "norm", "layernorm") == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=1e-5)
    return nn.LayerNorm(cfg.n_embd)


class RefBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = RefAttention(cfg)
        self.ln_2 = norm(cfg)
        self.mlp = RefMLP(cfg)

    def forward(self, x, masks=None):
        m1, m2 = masks if masks is not None else (1.0, 1.0)  # fixed dropout masks (already scaled)
        x = x + self.attn(self.ln_1(x)) * m1
        return x + self.mlp(self.ln_2(x)) * m2


class TiedHead(nn.Module):
    """logits = x @ wte.T / sqrt(C) + b: only the bias is its own."""

    def __init__(self, wte, bias=True):
        super().__init__()
        self.wte = [wte]  # a list, so the embedding is not registered twice
        self.bias = nn.Parameter(torch.zeros(wte.num_embeddings)) if bias else None

    def forward(self, x):
        return F.linear(x / math.sqrt(x.shape[-1]), self.wte[0].weight, self.bias)


class RefGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.sinusoidal = getattr(cfg, "pos", "sinusoidal") == "sinusoidal"
        self.register_buffer("wpe", sinusoids(cfg.block_size, cfg.n_embd).float(), persistent=False)
        self.h = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg)
        tied = getattr(cfg, "tie_embeddings", False)
        bias = getattr(cfg, "bias", True)
        self.lm_head = TiedHead(self.wte, bias) if tied else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=bias)

    def forward(self, idx, targets=None, dropout_masks=None):
        T = idx.shape[1]
        x = self.wte(idx)
        if self.sinusoidal:
            x = x + self.wpe[:T].to(self.wte.weight.dtype)
        for i, block in enumerate(self.h):
            x = block(x, None if dropout_masks is None else dropout_masks[i])
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def reference_from(model, dtype=None):
    """A RefGPT holding exactly the weights of rgpt `model` (optionally cast to dtype)."""
    ref = RefGPT(model.config).to(device=model.device, dtype=dtype or model.dtype)
    ref.load_state_dict({k: v.clone() for k, v in model.params.items()}, strict=True)
    return ref
