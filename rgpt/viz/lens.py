"""What the model computes inside for one text: the attention weights of every layer and head, a summary
of what each head looks at, and the logit lens (each layer's residual stream read out through ln_f and
lm_head, as if the blocks above it were not there). Used by `python -m rgpt.inspect` and by the trainer's
attention images; nothing here writes files.
"""

import unicodedata
from dataclasses import dataclass

import torch

from rgpt.data.tokenizer import BOS_ID
from rgpt.nn.attention import StandardCore


@dataclass
class Inside:
    attention: torch.Tensor  # (L, H, T, T) float32: row t is how query position t spreads over keys s <= t
    lens: torch.Tensor  # (L + 1, T, V) float32 logits: after the embedding, then after each block


def look_inside(model, ids: list[int]) -> Inside:
    """One forward pass of `ids` (a single sequence) in eval mode (no dropout); the model's mode is kept.
    Attention that runs on the flash core (which never holds the weights) takes the standard one here:
    the same maths, with the (T, T) weights kept."""
    training, cores = model.training, [block.attn.core for block in model.h]
    model.eval()
    for block in model.h:
        block.attn.core = StandardCore(block.attn.future)
    try:
        idx = torch.tensor([ids], dtype=torch.long, device=model.device)  # (1, T)
        streams = model.residual_streams(idx)  # n_layer + 1 tensors (1, T, C)
        att = torch.stack([block.attn.last_attention()[0] for block in model.h])  # (L, H, T, T)
        lens = torch.stack([model.lm_head.forward(model.ln_f.forward(x))[0] for x in streams])  # (L+1, T, V)
    finally:
        for block, core in zip(model.h, cores):
            block.attn.core = core
        if training:
            model.train()
    return Inside(att.float().cpu(), lens.float().cpu())


def attention_maps(model, ids: list[int]) -> torch.Tensor:
    """(L, H, T, T) attention weights of `ids`, in eval mode (what the trainer logs as images)."""
    return look_inside(model, ids).attention


def is_punctuation(token: str) -> bool:
    """A token made only of punctuation (，。？ and ASCII alike: Unicode categories P*)."""
    return bool(token) and all(unicodedata.category(c).startswith("P") for c in token)


# what a head is named for: what gets more than half of its attention, on average over the query positions
# (the first four), or how spread out its attention is
KINDS = ("previous", "bos", "punct", "self", "focused", "broad", "mixed")
FOCUSED, BROAD = 0.35, 0.8  # spread (entropy / its maximum) under which a head is focused, over which broad


def head_summary(att: torch.Tensor, ids: list[int], tokens: list[str]) -> list[list[dict]]:
    """Per layer, per head: entropy (bits), mean look-back distance (tokens), the mean weight on the previous
    token, on <bos> (when the text starts with it), on punctuation and on the position itself, and the kind
    of head those make it (`kind`: one of the first four KINDS when it gets over half the attention; else "focused"
    when its spread, entropy over the most possible, is under FOCUSED, "broad" over BROAD, "mixed" between:
    a focused head picks one or two tokens, but which ones depends on the text). Averages over query positions
    t >= 1 (position 0 can only look at itself), or over t = 0 alone for a one-token text.

    att: (L, H, T, T) attention weights of one sequence.
    """
    L, H, T, _ = att.shape
    a = att.double()
    rows = slice(1, None) if T > 1 else slice(0, None)  # the query positions averaged over
    plogp = torch.where(a > 0, a * torch.log2(a.clamp_min(1e-300)), torch.zeros_like(a))
    entropy = -plogp.sum(-1)[..., rows].mean(-1)  # (L, H)
    # a uniform head over t + 1 keys has entropy log2(t + 1): its share of that is the spread
    max_entropy = torch.log2(torch.arange(1, T + 1, dtype=torch.float64))[rows].mean()
    pos = torch.arange(T, dtype=torch.float64)
    back = (pos[:, None] - pos[None, :]).clamp_min(0)  # (T, T): t - s on and below the diagonal
    lookback = (a * back).sum(-1)[..., rows].mean(-1)  # (L, H)
    prev = a.diagonal(-1, -2, -1).mean(-1) if T > 1 else torch.zeros(L, H, dtype=torch.float64)
    itself = a.diagonal(0, -2, -1)[..., rows].mean(-1)
    bos = a[..., rows, 0].mean(-1) if ids and ids[0] == BOS_ID else None
    punct_keys = torch.tensor([is_punctuation(t) for t in tokens])
    punct = a[..., rows, :][..., punct_keys].sum(-1).mean(-1)  # (L, H)
    shares = {"previous": prev, "bos": bos, "punct": punct, "self": itself}
    out = []
    for layer in range(L):
        heads = []
        for h in range(H):
            share = {k: None if v is None else float(v[layer, h]) for k, v in shares.items()}
            top = max((k for k in share if share[k] is not None), key=lambda k: share[k])
            spread = float(entropy[layer, h] / max_entropy) if max_entropy > 0 else 0.0
            kind = (
                top
                if share[top] > 0.5
                else "focused"
                if spread < FOCUSED
                else "broad"
                if spread > BROAD
                else "mixed"
            )
            heads.append(
                {
                    "entropy": float(entropy[layer, h]),
                    "spread": spread,
                    "lookback": float(lookback[layer, h]),
                    **share,
                    "kind": kind,
                }
            )
        out.append(heads)
    return out


def lens_top(lens: torch.Tensor, ids: list[int], k: int) -> dict:
    """The logit lens in numbers: per layer and position the k likeliest next tokens and their probabilities,
    and the probability and rank of the token that really comes next (None at the last position).

    lens: (L + 1, T, V) logits. Returns {"ids": (L+1, T, k), "probs": (L+1, T, k), "p_next", "rank_next"}.
    """
    probs = torch.softmax(lens.double(), dim=-1)  # (L+1, T, V)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (L+1, T, k)
    nxt = torch.tensor(ids[1:], dtype=torch.long)  # (T-1,) the token that follows each position
    T = len(ids)
    p_next = probs[:, torch.arange(T - 1), nxt]  # (L+1, T-1)
    rank_next = (probs[:, : T - 1] > p_next[..., None]).sum(-1)  # (L+1, T-1), 0 = the top guess
    return {
        "ids": top_i.tolist(),
        "probs": top_p.tolist(),
        "p_next": [row + [None] for row in p_next.tolist()],
        "rank_next": [row + [None] for row in rank_next.tolist()],
    }


def display_token(token: str) -> str:
    """A token as shown on a page or a plot: the space and the other invisible ones made visible."""
    if token == " ":
        return "␠"
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in token)
