"""GRPO: the loss and its hand-written backward against autograd in float64, alone and through the whole tiny
model (masked prompts, padding, ragged replies, ratios clipped and not, advantages of both signs)."""

import torch

from rgpt.nn.grpo import GRPOLoss, group_advantages
from tests.helpers import assert_close
from tests.nn.test_model import make_model
from tests.reference import reference_from

DT = torch.float64


def reference_grpo_loss(logp, old_logp, ref_logp, adv, mask, eps, beta):
    """DeepSeekMath's objective written the ordinary way, for autograd: mean over replies of the mean over
    their tokens of −(min(r·A, clip(r)·A) − β·(e^(ref−logp) − (ref−logp) − 1))."""
    ratio = torch.exp(logp - old_logp)
    A = adv[:, None]
    surr = torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token = -(surr - beta * kl)
    m = mask.to(logp.dtype)
    return ((per_token * m).sum(1) / m.sum(1)).mean()


def ragged_rollouts(B=4, T=12, V=23):
    """B prompt+reply sequences: prompts of 2..5 tokens (masked), replies of 3..6 tokens, then padding."""
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(6, V, (B, T), generator=g)
    targets = torch.full((B, T), -100)
    for i in range(B):
        p, r = 2 + i % 4, 3 + (i * 5) % 4
        targets[i, p - 1 : p - 1 + r] = idx[i, p : p + r]  # the reply's tokens, predicted from the one before
        idx[i, p + r :] = 0  # padding
    return idx, targets


def fixed_logps(logp, mask, g):
    """old and reference log-probabilities near logp: ratios well inside and well outside [1 − ε, 1 + ε]."""
    old = logp + torch.randn(logp.shape, generator=g, dtype=DT) * 0.4
    ref = logp + torch.randn(logp.shape, generator=g, dtype=DT) * 0.5
    return old * mask, ref * mask


def test_grpo_loss_and_its_gradient_match_autograd():
    g = torch.Generator().manual_seed(3)
    B, T, eps, beta = 6, 7, 0.2, 0.04
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    logp = -torch.rand(B, T, generator=g, dtype=DT) * 4 * mask
    old, ref = fixed_logps(logp, mask, g)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.5, 0.9, -0.2], dtype=DT)
    crit = GRPOLoss(eps, beta)
    loss = crit.forward(logp, old, ref, adv, mask)
    stats = crit.stats()
    dlogp = crit.backward(scale=0.7)
    with torch.enable_grad():
        leaf = logp.clone().requires_grad_(True)
        want = reference_grpo_loss(leaf, old, ref, adv, mask, eps, beta)
        (want * 0.7).backward()
    r = torch.exp(logp - old)[mask]
    a = adv[:, None].expand(B, T)[mask]
    clipped = ((r > 1 + eps) & (a > 0)) | ((r < 1 - eps) & (a < 0))
    assert clipped.any() and not clipped.all(), "the fixture should clip some tokens and not others"
    assert ((r - 1).abs() > eps).sum() > clipped.sum(), "some ratios outside the range, but not clipped"
    assert_close(loss, want.detach(), "GRPO loss")
    assert_close(dlogp, leaf.grad, "dL/dlogp")
    assert float(dlogp[~mask].abs().max()) == 0.0
    per_reply = clipped.double().split(mask.sum(1).tolist())  # the reply tokens in row order
    assert_close(stats["clip_fraction"], sum(c.mean() for c in per_reply), "clip fraction (sum over replies)")


def test_at_the_start_the_loss_is_minus_the_mean_advantage_and_kl_is_zero():
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    logp = -torch.rand(4, 5, generator=g, dtype=DT) * mask
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=DT)
    crit = GRPOLoss(0.2, 0.1)
    loss = crit.forward(logp, logp.clone(), logp.clone(), adv, mask)
    assert abs(loss.item() + adv.mean().item()) < 1e-15  # r = 1, kl = 0: L = −mean A
    assert crit.stats()["kl"].item() == 0.0 and crit.stats()["clip_fraction"].item() == 0.0


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=DT)
    a = group_advantages(r, 4, eps=0.0 + 1e-12)
    assert_close(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DT), "advantages of a 0/1 group")
    assert a[4:].abs().max() == 0.0  # an all-equal group teaches nothing


def test_grpo_gradient_through_the_whole_model_matches_autograd():
    model = make_model(block_size=16)
    model.eval()
    ref_model = reference_from(model)
    idx, targets = ragged_rollouts()
    mask = targets != -100
    g = torch.Generator().manual_seed(9)
    eps, beta = 0.2, 0.3
    adv = torch.tensor([1.1, -0.6, -1.4, 0.8], dtype=DT)

    model.forward(idx, targets)
    logp = model.token_logprobs()  # (B, T)
    old, ref = fixed_logps(logp.detach(), mask, g)
    crit = GRPOLoss(eps, beta)
    loss = crit.forward(logp, old, ref, adv, mask)
    model.zero_grad()
    model.backward(dtoken_logp=crit.backward())

    with torch.enable_grad():
        logits = ref_model(idx)  # (B, T, V)
        tok = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * mask  # (B, T)
        want = reference_grpo_loss(tok, old, ref, adv, mask, eps, beta)
        want.backward()
    r = torch.exp(logp - old)[mask]
    a = adv[:, None].expand_as(mask)[mask]
    clipped = ((r > 1 + eps) & (a > 0)) | ((r < 1 - eps) & (a < 0))
    assert clipped.any() and not clipped.all(), "the fixture should clip some tokens and not others"
    assert_close(logp, tok.detach(), "token log-probabilities")
    assert_close(loss, want.detach(), "GRPO loss through the model")
    for name, grad in model.grads.items():
        assert_close(grad, dict(ref_model.named_parameters())[name].grad, f"grad {name}")
