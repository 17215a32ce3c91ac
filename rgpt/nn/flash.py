"""FlashAttention's algorithm, by hand: causal attention in tiles that never holds the (T, T) weights.

Forward (per tile of query rows, over the tiles of keys up to the diagonal): an online softmax keeps
each row's running maximum m and running sum l, and rescales the partial output when m grows:
    s = q_i k_j^T / sqrt(D);  m' = max(m, rowmax s);  p = exp(s - m')
    l = l * exp(m - m') + rowsum p;  o = o * exp(m - m') + p v_j;  m = m'
and at the end o / l. Only the row statistic L = m + log l (the log-sum-exp) is kept for the backward,
which recomputes every tile's weights from it, p = exp(s - L), and applies the softmax backward with
D_i = rowsum(dY_i * O_i) = sum_j p_ij dp_ij:
    dv_j += p^T dy_i;  dp = dy_i v_j^T;  ds = p * (dp - D_i);  dq_i += ds k_j / sqrt(D);  dk_j += ds^T q_i / sqrt(D)
Memory is O(T * D + tile^2) per (batch, head) instead of O(T^2). Statistics and accumulators are float32
at least; the products run in the inputs' dtype (bfloat16 under mixed precision), as in StandardCore.
A row whose keys are all masked (padding) gives zeros, as StandardCore does.
"""

import math

import torch

# query and key rows per tile. Each tile is a batch of small products, so larger tiles run faster and hold
# more: forward + backward at B=4, H=8, T=1024, D=64 on 2 AVX2 cores took 15 / 8 / 6.5 s with tiles of
# 64 / 128 / 256 against 3.8 s for StandardCore; 128 keeps the (tile x tile) scores at 2 MB for all 32 heads
TILE = 128


class FlashCore:
    def __init__(self, tile: int | None = None):
        self.tile = tile or TILE
        self.cache = None
        self._future = None  # (tile, tile) bool, True above the diagonal: the one tile that crosses it

    def _scores(self, q_i, k_j, scale, i0, j0, key_padding_mask):
        """The masked scores of query tile i (rows from i0) against key tile j (rows from j0): (B, H, Ti, Tj)."""
        s = torch.matmul(q_i, k_j.transpose(-2, -1)).to(torch.promote_types(q_i.dtype, torch.float32))
        s.mul_(scale)
        Ti, Tj = s.shape[-2:]
        if i0 == j0:  # tiles are aligned, so only the diagonal tile has keys after its queries
            if self._future is None or self._future.device != s.device:
                self._future = torch.ones(self.tile, self.tile, dtype=torch.bool, device=s.device).triu(1)
            s.masked_fill_(self._future[:Ti, :Tj], float("-inf"))
        if key_padding_mask is not None:
            s.masked_fill_(key_padding_mask[:, None, None, j0 : j0 + Tj], float("-inf"))
        return s

    def forward(self, q, k, v, key_padding_mask=None):  # q, k, v: (B, H, T, D)
        B, H, T, D = q.shape
        scale, t = 1.0 / math.sqrt(D), self.tile
        wide = torch.promote_types(q.dtype, torch.float32)
        out = torch.empty(B, H, T, D, dtype=wide, device=q.device)
        lse = torch.empty(B, H, T, 1, dtype=wide, device=q.device)
        for i0 in range(0, T, t):
            q_i = q[:, :, i0 : i0 + t]  # (B, H, Ti, D)
            Ti = q_i.shape[2]
            m = torch.full((B, H, Ti, 1), float("-inf"), dtype=wide, device=q.device)
            l = torch.zeros(B, H, Ti, 1, dtype=wide, device=q.device)
            acc = torch.zeros(B, H, Ti, D, dtype=wide, device=q.device)
            for j0 in range(0, i0 + Ti, t):  # key tiles up to the diagonal
                s = self._scores(q_i, k[:, :, j0 : j0 + t], scale, i0, j0, key_padding_mask)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                m_safe = m_new.nan_to_num(neginf=0.0)  # rows with no key yet: exp(-inf - 0) = 0, not NaN
                p = s.sub_(m_safe).exp_()  # (B, H, Ti, Tj), in the scores' own buffer
                alpha = torch.exp(m - m_safe)  # rescales what was summed under the old maximum
                l.mul_(alpha).add_(p.sum(-1, keepdim=True))
                acc.mul_(alpha).add_(torch.matmul(p.to(v.dtype), v[:, :, j0 : j0 + t]))
                m = m_new
            empty = l == 0  # every key masked: output zeros, and L = +inf so that p = exp(s - L) = 0
            out[:, :, i0 : i0 + Ti] = acc / l.masked_fill(empty, 1.0)
            lse[:, :, i0 : i0 + Ti] = (m + torch.log(l)).masked_fill(empty, float("inf"))
        self.cache = (q, k, v, out, lse, scale, key_padding_mask)
        return out.to(v.dtype)

    def backward(self, dy):  # dy: (B, H, T, D) -> dq, dk, dv
        q, k, v, out, lse, scale, key_padding_mask = self.cache
        T, t = q.shape[2], self.tile
        wide = out.dtype
        delta = (dy.to(wide) * out).sum(-1, keepdim=True)  # (B, H, T, 1) D_i = rowsum(dY * O)
        dq = torch.zeros_like(out)
        dk, dv = torch.zeros_like(out), torch.zeros_like(out)
        for j0 in range(0, T, t):  # key tile j: its dk and dv sum over the query tiles at or after it
            k_j, v_j = k[:, :, j0 : j0 + t], v[:, :, j0 : j0 + t]
            for i0 in range(j0, T, t):
                q_i, dy_i = q[:, :, i0 : i0 + t], dy[:, :, i0 : i0 + t]
                s = self._scores(q_i, k_j, scale, i0, j0, key_padding_mask)
                p = s.sub_(lse[:, :, i0 : i0 + t]).exp_()  # (B, H, Ti, Tj) the forward's weights, recomputed
                dv[:, :, j0 : j0 + t] += torch.matmul(p.to(dy.dtype).transpose(-2, -1), dy_i)
                dp = torch.matmul(dy_i, v_j.transpose(-2, -1)).to(wide)  # (B, H, Ti, Tj)
                ds = dp.sub_(delta[:, :, i0 : i0 + t]).mul_(p).to(q.dtype)  # softmax backward; masked p == 0
                dq[:, :, i0 : i0 + t] += torch.matmul(ds, k_j) * scale
                dk[:, :, j0 : j0 + t] += torch.matmul(ds.transpose(-2, -1), q_i) * scale
        self.cache = None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
