"""Multi-head causal self-attention with a hand-written backward, plus the KV-cache path for decoding.

Shapes follow the legend in rgpt/nn/layers.py (B, T, C, H, D).
"""

import math

import torch

from rgpt.nn.layers import Layer, Linear


class KVCache:
    """Keys and values of every position decoded so far, for one layer: (B, Hkv, T_max, D) each.

    Hkv = n_kv_head: grouped-query attention keeps n_head / n_kv_head times fewer keys and values.
    """

    def __init__(self, batch, n_kv_head, max_len, head_size, *, device, dtype):
        self.k = torch.zeros(batch, n_kv_head, max_len, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions [0, length) are filled

    def reorder(self, index):
        """Keep rows `index` of the batch (beam search reorders hypotheses after each step)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def copy_in(self, rows, source: "KVCache", row: int, length: int) -> None:
        """Positions [0, length) of `source`'s row `row` into this cache's rows `rows` (an index or a slice:
        one prompt's keys and values for several replies), in place."""
        self.k[rows, :, :length] = source.k[row, :, :length]
        self.v[rows, :, :length] = source.v[row, :, :length]


class Rotary:
    """RoPE: each pair (x_i, x_{i+D/2}) of a query or key is rotated by the angle pos * 10000^(-2i/D).

    The score q_t . k_s then depends on t - s only. A rotation's inverse is its transpose, so the
    backward of `rotate` is `rotate(..., inverse=True)`. The tables are float32 at least.
    """

    def __init__(self, head_size, n_pos, *, device, dtype):
        half = head_size // 2
        inv_freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) * 2 / head_size)  # (D/2,)
        angle = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq  # (n_pos, D/2)
        wide = dict(device=device, dtype=torch.promote_types(dtype, torch.float32))
        self.cos, self.sin = angle.cos().to(**wide), angle.sin().to(**wide)

    def rotate(self, x, start, inverse=False):  # x: (B, H, T, D), positions start .. start + T - 1
        T, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[start : start + T], self.sin[start : start + T]  # (T, D/2)
        sin = -sin if inverse else sin
        x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)

    def rotate_at(self, x, pos):  # x: (B, H, 1, D), row b at position pos[b] (decoding rows of many replies)
        half = x.shape[-1] // 2
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (B, 1, 1, D/2)
        x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def repeat_kv(x, group):  # x: (B, Hkv, T, D) -> (B, Hkv * group, T, D), each kv head serving `group` q heads
    if group == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, group, T, D).reshape(B, Hkv * group, T, D)


def sum_groups(dx, group):  # the backward of repeat_kv: (B, H, T, D) -> (B, H / group, T, D)
    if group == 1:
        return dx
    B, H, T, D = dx.shape
    return dx.view(B, H // group, group, T, D).sum(2)


class StandardCore:
    """softmax(Q K^T / sqrt(D) + mask) V with the whole (T, T) matrix of weights kept for the backward."""

    def __init__(self, future):
        self.future = future  # (T_max, T_max) bool, True above the diagonal
        self.cache = None

    def forward(self, q, k, v, key_padding_mask=None):  # q, k, v: (B, H, T, D)
        T = q.shape[-2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        # products in the compute dtype; the softmax and its gradient in float32 at least
        scores = torch.matmul(q, k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32))
        scores.mul_(scale)  # (B, H, T, T)
        mask = self.future[:T, :T]
        if key_padding_mask is not None:
            mask = mask | key_padding_mask[:, None, None, :]  # (B, 1, T, T)
        scores.masked_fill_(mask, float("-inf"))
        att = torch.softmax(scores, dim=-1)  # (B, H, T, T)
        if key_padding_mask is not None:
            att.nan_to_num_(0.0)  # a row whose keys are all masked is all -inf: its output is zeros, not NaN
        self.cache = (q, k, v, att, scale)
        return torch.matmul(att.to(v.dtype), v)  # (B, H, T, D)

    def backward(self, dy):  # dy: (B, H, T, D) -> dq, dk, dv
        q, k, v, att, scale = self.cache
        # y = att @ v
        datt = torch.matmul(dy, v.transpose(-2, -1)).to(att.dtype)  # (B, H, T, T)
        dv = torch.matmul(att.to(dy.dtype).transpose(-2, -1), dy)  # (B, H, T, D)
        # att = softmax(scores): dscores = att * (datt - sum(att * datt)); masked entries have att == 0
        dscores = datt.sub_((att * datt).sum(-1, keepdim=True)).mul_(att).to(q.dtype)
        # scores = q @ k^T * scale
        dq = torch.matmul(dscores, k).mul_(scale)  # (B, H, T, D)
        dk = torch.matmul(dscores.transpose(-2, -1), q).mul_(scale)  # (B, H, T, D)
        self.cache = None
        return dq, dk, dv


class CausalSelfAttention(Layer):
    """softmax(Q K^T / sqrt(D) + mask) V over H heads, then an output projection.

    n_kv_head: grouped-query attention, Hkv = n_kv_head key/value heads each shared by H / Hkv query heads
    (H / Hkv = 1 is ordinary multi-head attention). c_attn yields [q (H*D) | k (Hkv*D) | v (Hkv*D)].
    rope: rotate q and k by their positions (Rotary) instead of adding positions to the input.
    flash: the tiled core of rgpt/flash.py, which never holds the (T, T) weights; decoding with a KV cache
    always takes the plain product below (one query row at a time has no (T, T) matrix to avoid).
    """

    def __init__(
        self,
        n_embd,
        n_head,
        block_size,
        *,
        std,
        proj_std,
        device,
        dtype,
        rope=False,
        flash=False,
        n_kv_head=None,
        bias=True,
    ):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if n_embd % n_head != 0 or n_head % n_kv_head != 0:
            raise ValueError(
                f"n_head ({n_head}) must divide n_embd ({n_embd}), n_kv_head ({n_kv_head}) n_head"
            )
        self.n_head, self.n_kv_head, self.head_size = n_head, n_kv_head, n_embd // n_head
        n_qkv = n_embd + 2 * n_kv_head * self.head_size  # [q | k | v]
        kw = dict(device=device, dtype=dtype, bias=bias)
        self.c_attn = Linear(n_embd, n_qkv, std=std, **kw)
        self.c_proj = Linear(n_embd, n_embd, std=proj_std, **kw)
        # True above the diagonal: position t may not look at s > t
        self.future = torch.ones(block_size, block_size, dtype=torch.bool, device=device).triu(1)
        self.rotary = Rotary(self.head_size, block_size, device=device, dtype=dtype) if rope else None
        if flash:
            from rgpt.nn.flash import FlashCore  # imported here: only flash models need it

            self.core = FlashCore()
        else:
            self.core = StandardCore(self.future)

    def sublayers(self):
        return {"c_attn": self.c_attn, "c_proj": self.c_proj}

    def _heads(self, qkv):  # (B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k and v (B, Hkv, T, D)
        B, T, _ = qkv.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_size
        qkv = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        return qkv.split((H, Hkv, Hkv), dim=1)

    def _rotate(self, q, k, start=0, inverse=False):
        if self.rotary is None:
            return q, k
        return self.rotary.rotate(q, start, inverse), self.rotary.rotate(k, start, inverse)

    def forward(self, x, key_padding_mask=None):
        """x: (B, T, C); key_padding_mask: optional (B, T) bool, True where the key is padding."""
        B, T, C = x.shape
        q, k, v = self._heads(self.c_attn.forward(x))  # (B, H, T, D), (B, Hkv, T, D) twice
        q, k = self._rotate(q, k)
        group = self.n_head // self.n_kv_head
        y = self.core.forward(q, repeat_kv(k, group), repeat_kv(v, group), key_padding_mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj.forward(y)

    def last_attention(self):
        """The (B, H, T, T) attention weights of the last forward, until its backward (rgpt.viz.lens and
        rgpt.training.diagnostics read them); None after the flash core, which never holds them."""
        cache = getattr(self.core, "cache", None)
        return cache[3] if isinstance(self.core, StandardCore) and cache is not None else None

    def backward(self, dout):  # dout: (B, T, C)
        B, T, C = dout.shape
        H = self.n_head
        dy = self.c_proj.backward(dout).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        dq, dk, dv = self.core.backward(dy)
        group = H // self.n_kv_head  # k = repeat_kv(k_kv): the shared head's gradient sums over its group
        dk, dv = sum_groups(dk, group), sum_groups(dv, group)  # (B, Hkv, T, D)
        dq, dk = self._rotate(dq, dk, inverse=True)  # q' = R q: dq = R^T dq'
        dqkv = torch.cat((dq, dk.to(dq.dtype), dv.to(dq.dtype)), dim=1)  # (B, H + 2 Hkv, T, D)
        dqkv = dqkv.transpose(1, 2).reshape(B, T, -1)  # (B, T, (H + 2 Hkv) D), inverse of _heads
        return self.c_attn.backward(dqkv)

    def forward_cached(self, x, cache: KVCache):
        """Inference only: x (B, T_new, C) holds the positions after the cache's; appends their k, v.

        The cache is float32 at least (see GPT.new_kv_caches) and the products run in it, but they are
        rounded to the compute dtype where forward() rounds them, so both give the same logits.
        """
        B, T, C = x.shape
        start = cache.length
        q, k, v = self._heads(self.c_attn.forward(x))  # (B, H, T, D), (B, Hkv, T, D) twice
        q, k = self._rotate(q, k, start)  # the cache holds keys already rotated by their own positions
        low, wide = q.dtype, cache.k.dtype  # compute dtype (bfloat16 under mixed precision), cache dtype
        cache.k[:, :, start : start + T] = k
        cache.v[:, :, start : start + T] = v
        cache.length = end = start + T
        group = self.n_head // self.n_kv_head
        k_all, v_all = (
            repeat_kv(cache.k[:, :, :end], group),
            repeat_kv(cache.v[:, :, :end], group),
        )  # (B, H, end, D)
        scores = torch.matmul(q.to(wide), k_all.transpose(-2, -1)).to(low).to(wide)
        scores.mul_(1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, end)
        scores.masked_fill_(self.future[start:end, :end], float("-inf"))  # new rows of the causal mask
        att = torch.softmax(scores, dim=-1).to(low).to(wide)
        y = torch.matmul(att, v_all).to(low)  # (B, H, T, D)
        return self.c_proj.forward(y.transpose(1, 2).reshape(B, T, C))

    def forward_rows(self, x, cache: KVCache, pos, later):
        """Inference, one new token for each of B replies at once: x (B, 1, C), row b at position pos[b]
        (B,) of its own; rows [0, B) of the cache hold each reply's earlier keys and values. later (B, L)
        bool, L > max(pos) the positions attention spans: True at those a row has not reached
        (GPT.forward_rows makes it once for all layers). The same products as forward_cached, each row
        masked at its own length: a row's result does not depend on the other rows (up to the rounding of a
        larger product). A lone reply comes as pos an int and later None: it spans exactly its own keys, so
        nothing is masked, and its key and value are written by slicing (the same numbers, fewer ops).
        """
        B, _, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self._heads(self.c_attn.forward(x))  # (B, H, 1, D), (B, Hkv, 1, D) twice
        lone = later is None
        if self.rotary is not None:
            turn = self.rotary.rotate if lone else self.rotary.rotate_at
            q, k = turn(q, pos), turn(k, pos)
        low, wide = q.dtype, cache.k.dtype
        at = (0, slice(None), pos) if lone else (torch.arange(B, device=x.device), slice(None), pos)
        cache.k[at] = k[:, :, 0].to(wide)  # (B, Hkv, D) written at each row's own position
        cache.v[at] = v[:, :, 0].to(wide)
        n_keys = pos + 1 if lone else later.shape[1]
        keys, values = cache.k[:B, :, :n_keys], cache.v[:B, :, :n_keys]  # (B, Hkv, L, D): views, no copy
        # the query heads that share a kv head side by side, (B, Hkv, H / Hkv, D): no repeat_kv copy
        qg = q.reshape(B, Hkv, H // Hkv, D).to(wide)
        scores = torch.matmul(qg, keys.transpose(-2, -1)).to(low).to(wide)  # (B, Hkv, H / Hkv, L)
        scores.mul_(1.0 / math.sqrt(D))
        if not lone:
            scores.masked_fill_(later[:, None, None], float("-inf"))
        att = torch.softmax(scores, dim=-1).to(low).to(wide)
        y = torch.matmul(att, values).to(low)  # (B, Hkv, H / Hkv, D)
        return self.c_proj.forward(y.reshape(B, 1, C))
