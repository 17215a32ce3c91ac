"""Direct Preference Optimization's loss, with its backward written by hand (Rafailov et al., 2023).

A micro-batch holds B preference pairs as 2B sequences, the B chosen replies first, then the B rejected ones
(rgpt.data.preference). Each sequence's log-probability log π(y) is the sum of the log-probabilities of its
reply's tokens (the prompt's are context, not targets: GPT.sequence_logprobs), and log π_ref(y) is the same
sum under the frozen reference model, computed once (rgpt.stages.dpo). With

    z = β · [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]        (one per pair)
    L = mean over the pairs of −log σ(z)

the backward collapses: dL/dz = −σ(−z) / B, so dL/d log π(y_w) = −β·σ(−z)/B and dL/d log π(y_l) = +β·σ(−z)/B.
Since d log π(y) / d logits is (onehot − softmax) on the reply's positions, the gradient reaching the logits is
the ordinary cross-entropy backward of the reply's tokens scaled by +β·σ(−z)/B for the chosen reply and
−β·σ(−z)/B for the rejected one (GPT.backward(dlogp=...)). At the start π = π_ref, so z = 0 and L = ln 2.
"""

import torch


def softplus(x):
    """log(1 + e^x), without overflow: max(x, 0) + log1p(e^-|x|)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


class DPOLoss:
    """loss = mean over pairs of −log σ(z); forward takes the 2B sequences' log-probabilities."""

    def __init__(self, beta: float):
        self.beta = beta
        self.cache = None

    def forward(self, logp, ref_logp):  # logp, ref_logp: (2B,) chosen then rejected
        B = logp.shape[0] // 2
        if logp.shape != ref_logp.shape or logp.shape[0] != 2 * B or B == 0:
            raise ValueError(
                f"DPO wants 2B log-probabilities (chosen, then rejected), got {tuple(logp.shape)}"
            )
        ratio = logp - ref_logp  # (2B,) log π − log π_ref: the implicit reward / β
        z = self.beta * (ratio[:B] - ratio[B:])  # (B,)
        self.cache = (z, B)
        return softplus(-z).mean()  # −log σ(z) = log(1 + e^−z)

    def backward(self, scale=1.0):
        """(2B,) d(loss · scale)/d logp: −β·σ(−z)/B for the chosen replies, +β·σ(−z)/B for the rejected."""
        z, B = self.cache
        dz = torch.sigmoid(-z).mul_(-scale / B)  # (B,) d(−log σ(z))/dz = −σ(−z), over the mean's B
        self.cache = None
        return torch.cat([self.beta * dz, -self.beta * dz])  # z = β(ratio_w − ratio_l)

    def stats(self, logp, ref_logp) -> dict:
        """Sums over the batch's pairs, for the logs: reward margin z, z > 0, log π of each reply."""
        B = logp.shape[0] // 2
        ratio = logp - ref_logp
        z = self.beta * (ratio[:B] - ratio[B:])
        return {
            "reward_margin": z.sum(),
            "accuracy": (z > 0).sum(),
            "chosen_logp": logp[:B].sum(),
            "rejected_logp": logp[B:].sum(),
            "logp_accuracy": (logp[:B] > logp[B:]).sum(),  # the likelihood itself prefers the chosen reply
        }
