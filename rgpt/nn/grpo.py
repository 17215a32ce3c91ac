"""Group Relative Policy Optimization's loss, with its backward written by hand (Shao et al., 2024,
DeepSeekMath).

A micro-batch holds B sampled replies as B sequences (prompt then reply; only the reply's tokens are
targets). Per reply token t of reply i, with logp = log π(o_t), old = log π_old(o_t) (the policy that sampled
it), ref = log π_ref(o_t) (the frozen starting model) and A_i the reply's group-normalised advantage:

    r    = exp(logp − old)                                   the probability ratio
    surr = min(r·A, clip(r, 1 − ε, 1 + ε)·A)                 PPO's clipped surrogate
    kl   = exp(ref − logp) − (ref − logp) − 1                the k3 estimator of KL(π ‖ π_ref): ≥ 0, unbiased
    ℓ    = −(surr − β·kl)
    L    = mean over replies of (mean over the reply's tokens of ℓ)     DeepSeekMath's 1/G Σ_i 1/|o_i| Σ_t

The backward collapses per token:
    d surr / d logp = r·A where the unclipped term is the min (the clip is inactive or works against A),
                      0 where the clipped term is strictly smaller (its value does not depend on logp);
    d kl / d logp   = 1 − exp(ref − logp);
so dL/d logp = w · (−d surr/d logp + β·(1 − exp(ref − logp))), w = mask / (|o_i| · B). GPT.backward
(dtoken_logp=...) then scales each token's cross-entropy backward by that coefficient.
"""

import torch


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """(N,) rewards of N = P·G replies, each prompt's G consecutive -> A_i = (r_i − mean) / (std + eps),
    mean and (population) std over the reply's group. A group whose rewards are all equal gets A = 0."""
    r = rewards.view(-1, group_size)  # (P, G)
    mean, std = r.mean(1, keepdim=True), r.std(1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


class GRPOLoss:
    """loss = mean over replies of the mean over their tokens of −(clipped surrogate − β·k3 KL)."""

    def __init__(self, clip_eps: float, beta: float):
        self.clip_eps, self.beta = clip_eps, beta
        self.cache = None

    def forward(self, logp, old_logp, ref_logp, adv, mask):
        """logp, old_logp, ref_logp: (B, T) per token; adv: (B,); mask: (B, T) True on reply tokens."""
        if not (logp.shape == old_logp.shape == ref_logp.shape == mask.shape) or adv.shape != logp.shape[:1]:
            raise ValueError(
                f"GRPO wants (B, T) log-probabilities and mask and (B,) advantages, got {tuple(logp.shape)}, "
                f"{tuple(old_logp.shape)}, {tuple(ref_logp.shape)}, {tuple(mask.shape)}, {tuple(adv.shape)}"
            )
        B = logp.shape[0]
        mask = mask.to(logp.dtype)
        n = mask.sum(1)  # (B,) reply tokens
        if B == 0 or (n == 0).any():
            raise ValueError("GRPO over a reply with no tokens")
        w = mask / (n[:, None] * B)  # (B, T) each token's weight in the mean of means
        ratio = torch.exp((logp - old_logp) * mask)  # (B, T); 1 off the reply (its terms get weight 0)
        A = adv[:, None].to(logp.dtype)  # (B, 1)
        unclipped = ratio * A
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * A
        surr = torch.minimum(unclipped, clipped)  # (B, T)
        d = (ref_logp - logp) * mask  # (B, T) log π_ref − log π
        ed = torch.exp(d)
        kl = ed - d - 1  # (B, T) k3
        self.cache = (ratio, A, clipped < unclipped, ed, w)
        self._stats = (kl, clipped < unclipped, mask, n)
        return -((surr - self.beta * kl) * w).sum()

    def backward(self, scale=1.0):
        """(B, T) d(loss · scale)/d logp; zero off the reply."""
        ratio, A, is_clipped, ed, w = self.cache
        dsurr = torch.where(is_clipped, torch.zeros_like(ratio), ratio * A)  # surr = min(r·A, clip(r)·A)
        dkl = 1 - ed  # kl = e^d − d − 1, d = ref − logp
        self.cache = None
        return (-dsurr + self.beta * dkl) * (w * scale)

    def stats(self) -> dict:
        """Sums over the batch's replies, for the logs: per-reply mean KL (k3) and fraction of clipped tokens."""
        kl, is_clipped, mask, n = self._stats
        return {
            "kl": ((kl * mask).sum(1) / n).sum(),
            "clip_fraction": ((is_clipped.to(mask.dtype) * mask).sum(1) / n).sum(),
        }
