"""Fused softmax + cross-entropy over the vocabulary, with the collapsed backward (p - onehot) / N."""

import torch

IGNORE_INDEX = -100  # targets with this value (padding, masked user turns) contribute nothing


class CrossEntropy:
    """loss = mean over targets != -100 of -log softmax(logits)[target].

    forward() turns float32 logits into log-probabilities in place, and backward() turns those into the
    gradient in place: the (N, V) buffer is allocated once (bfloat16 logits: once, in float32) and swept
    three times in all. The logits passed to forward are therefore overwritten.
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
        # statistics in float32 at least, whatever the logits' dtype; log_softmax subtracts the max (stable)
        work = logits.to(torch.promote_types(logits.dtype, torch.float32))  # no copy if already float32
        logp = torch.log_softmax(work, dim=-1, out=work)  # (N_all, V), in place
        safe_t = targets.clamp_min(0)  # -100 would index out of range; those rows are masked below
        logp_t = logp.gather(1, safe_t[:, None]).squeeze(1)  # (N_all,) log-probability of each target
        loss = -(logp_t * valid).sum() / n
        self.cache = (logp, logp_t, safe_t, valid, n, shape, logits.dtype)
        return loss

    def row_logprobs(self):
        """(N_all,) log-probability of each row's target in the last forward, 0 on rows without one."""
        logp, logp_t, safe_t, valid, n, shape, dtype = self.cache
        return torch.where(valid, logp_t, torch.zeros_like(logp_t))

    def backward(self, scale=1.0, row_coef=None):
        """dL/dlogits = coef * (softmax(logits) - onehot(target)), coef = scale / n on rows with a target
        (token-weighted accumulation passes scale = n_micro / n_total) and 0 on the others.

        row_coef (N_all,): a coefficient per row instead, of either sign (DPO: the gradient of a loss
        through each row's log-probability is -coef, see rgpt/dpo.py); rows without a target still get 0.
        """
        logp, logp_t, safe_t, valid, n, shape, dtype = self.cache
        coef = valid.to(logp.dtype) * (scale / n if row_coef is None else row_coef.to(logp.dtype))  # (N_all,)
        # |coef| * softmax = exp(logp + log |coef|), in one sweep; log 0 = -inf gives ignored rows exactly 0
        p = logp.add_(coef.abs().log()[:, None]).exp_()
        if row_coef is not None:
            p.mul_(coef.sign()[:, None])  # negative rows (DPO's rejected replies): one more sweep
        rows = torch.arange(p.shape[0], device=p.device)
        p[rows, safe_t] = (logp_t.exp() - 1.0) * coef  # the target's entry: coef * (p_target - 1)
        self.cache = None
        return p.to(dtype).view(shape)
