"""Fused softmax + cross-entropy over the vocabulary, with the collapsed backward (p - onehot) / N."""

import torch

IGNORE_INDEX = -100  # targets with this value (padding, masked user turns) contribute nothing


class CrossEntropy:
    """loss = mean over targets != -100 of (logsumexp(logits) - logits[target]).

    backward() reuses the logits' memory for the gradient, so the logits passed to forward are overwritten.
    """

    def __init__(self):
        self.cache = None

    def forward(self, logits, targets):  # logits: (B, T, V), targets: (B, T) long
        shape, V = logits.shape, logits.shape[-1]
        logits = logits.reshape(-1, V)  # (N_all, V)
        targets = targets.reshape(-1)  # (N_all,)
        valid = targets != IGNORE_INDEX
        n = int(valid.sum())
        if n == 0:
            raise ValueError("cross-entropy over a batch with no target tokens (all are -100)")
        # statistics in float32 at least, whatever the logits' dtype
        work = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = torch.logsumexp(work, dim=-1)  # (N_all,) stable: max is subtracted inside
        safe_t = targets.clamp_min(0)  # -100 would index out of range; those rows are masked below
        nll = (lse - work.gather(1, safe_t[:, None]).squeeze(1)) * valid
        loss = nll.sum() / n
        self.cache = (work, lse, safe_t, valid, n, shape, logits.dtype)
        return loss

    def backward(self, scale=1.0):
        """dL/dlogits, times `scale` (token-weighted accumulation passes n_micro / n_total)."""
        work, lse, safe_t, valid, n, shape, dtype = self.cache
        # softmax(logits) = exp(logits - lse), computed in place: the logits buffer becomes the gradient
        p = work.sub_(lse[:, None]).exp_()
        rows = torch.arange(p.shape[0], device=p.device)
        p[rows, safe_t] -= 1.0  # p - onehot(target)
        p.mul_((valid.to(p.dtype) * (scale / n))[:, None])  # ignored rows get exactly zero
        self.cache = None
        return p.to(dtype).view(shape)
