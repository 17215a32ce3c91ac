"""Shared test helpers: tight float64 comparisons whose failures say what differed and by how much, and a
tiny deterministic corpus for the tests that drive the training CLI."""

import json
import random
from pathlib import Path

import torch

RTOL, ATOL = 1e-6, 1e-8  # the project's standard for float64 gradient checks
# every architecture option at once, as command-line overrides (tests of the CLI and of torchrun)
ALL_OPTIONS = (
    "model.pos=rope",
    "model.norm=rmsnorm",
    "model.activation=swiglu",
    "model.tie_embeddings=true",
    "model.attn=flash",
    "model.n_kv_head=2",
    "model.bias=false",
)


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


SUBJECTS = ["山脉", "河流", "太阳", "月亮", "森林", "城市", "学生", "老师", "科学", "历史", "大海", "春天"]
VERBS = ["形成于", "影响着", "照亮了", "改变了", "保护着", "记录了"]
OBJECTS = ["地球的表面", "人们的生活", "古老的文明", "自然的规律", "美丽的风景", "我们的未来"]


def write_tiny_corpus(
    root: Path, *, seed: int, n_pre: int, n_sft: int, n_subjects: int, n_words: int
) -> tuple[Path, Path]:
    """pre.jsonl (n_pre two-sentence documents) and sft.jsonl (n_sft one-turn dialogues) under root, built
    from the first n_subjects subjects and n_words verbs and objects; the same files for the same seed."""
    rnd = random.Random(seed)
    subj, verb, obj = SUBJECTS[:n_subjects], VERBS[:n_words], OBJECTS[:n_words]
    pre, sft = root / "pre.jsonl", root / "sft.jsonl"
    with open(pre, "w", encoding="utf-8") as f:
        for _ in range(n_pre):
            text = f"{rnd.choice(subj)}{rnd.choice(verb)}{rnd.choice(obj)}。{rnd.choice(subj)}是{rnd.choice(obj)}的一部分。"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with open(sft, "w", encoding="utf-8") as f:
        for _ in range(n_sft):
            s = rnd.choice(subj)
            turns = [
                {"role": "user", "content": f"{s}是什么？"},
                {"role": "assistant", "content": f"{s}{rnd.choice(verb)}{rnd.choice(obj)}。"},
            ]
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    return pre, sft
