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


class RefAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, key_padding_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
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
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_hidden)
        self.c_proj = nn.Linear(cfg.n_hidden, cfg.n_embd)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class RefBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = RefAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = RefMLP(cfg)

    def forward(self, x, masks=None):
        m1, m2 = masks if masks is not None else (1.0, 1.0)  # fixed dropout masks (already scaled)
        x = x + self.attn(self.ln_1(x)) * m1
        return x + self.mlp(self.ln_2(x)) * m2


class RefGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.register_buffer("wpe", sinusoids(cfg.block_size, cfg.n_embd).float(), persistent=False)
        self.h = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, idx, targets=None, dropout_masks=None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe[:T].to(self.wte.weight.dtype)
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
