"""Shared test helpers: tight float64 comparisons whose failures say what differed and by how much."""

import torch

RTOL, ATOL = 1e-6, 1e-8  # the project's standard for float64 gradient checks


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max abs diff {diff.max().item():.3e}, "
            f"max |expected| {expected.abs().max().item():.3e} (rtol={rtol}, atol={atol})"
        )


def autograd_grads(fn, inputs, dout):
    """Gradients of sum(fn(*inputs) * dout) w.r.t. inputs, by autograd (the reference)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        out = fn(*leaves)
        (out * dout).sum().backward()
    return out.detach(), [x.grad for x in leaves]
