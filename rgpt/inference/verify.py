"""Held-out accuracy on the verifiable tasks (rgpt.data.tasks): each problem answered greedily, checked by
its task's code. Used by stage=grpo's validation and by `python -m rgpt.eval task=verify`."""

from collections import defaultdict

import torch

from rgpt.data.tasks import TASKS, Problem, reward
from rgpt.inference.generate import DecodeConfig, generate


@torch.no_grad()
def verify(model, tok, problems: list[Problem], max_new_tokens: int) -> dict[str, dict[str, float]]:
    """{task: {"accuracy", "reward", "n"}} over `problems`, each answered by greedy decoding (model in eval)."""
    sums = defaultdict(lambda: [0.0, 0.0, 0])  # task -> right, reward, n
    for p in problems:
        prompt = tok.encode_prompt([("user", p.prompt)])
        cut = max(1, min(max_new_tokens, model.config.block_size + 1 - len(prompt)))  # nothing slides out
        reply = tok.decode(generate(model, prompt, DecodeConfig(method="greedy", max_new_tokens=cut)))
        s = sums[p.task]
        s[0] += TASKS[p.task].correct(p, reply)
        s[1] += reward(p, reply)
        s[2] += 1
    return {t: {"accuracy": r / n, "reward": w / n, "n": n} for t, (r, w, n) in sorted(sums.items())}
