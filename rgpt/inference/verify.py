"""Held-out accuracy on the verifiable tasks (rgpt.data.tasks): each problem answered greedily, checked by
its task's code. Used by stage=grpo's validation and by `python -m rgpt.eval task=verify`."""

from collections import defaultdict

import torch

from rgpt.data.tasks import TASKS, Problem, reward
from rgpt.inference.batch import generate_many
from rgpt.inference.generate import DecodeConfig


@torch.no_grad()
def answers(model, tok, problems: list[Problem], max_new_tokens: int, slots: int = 32) -> list[str]:
    """The greedy reply to each problem (model in eval), `slots` decoded together (rgpt.inference.batch: the
    same replies as one by one); a prompt near the block size gets fewer new tokens, so nothing slides out."""
    prompts = [tok.encode_prompt([("user", p.prompt)]) for p in problems]
    cuts = [max(1, min(max_new_tokens, model.config.block_size + 1 - len(q))) for q in prompts]
    replies = [""] * len(problems)
    for cut in sorted(set(cuts)):
        which = [i for i, c in enumerate(cuts) if c == cut]
        greedy = DecodeConfig(method="greedy", max_new_tokens=cut)
        for i, ids in zip(which, generate_many(model, [prompts[i] for i in which], greedy, slots)):
            replies[i] = tok.decode(ids)
    return replies


def verify(
    model, tok, problems: list[Problem], max_new_tokens: int, slots: int = 32
) -> dict[str, dict[str, float]]:
    """{task: {"accuracy", "reward", "n"}} over `problems`, each answered by greedy decoding (answers())."""
    sums = defaultdict(lambda: [0.0, 0.0, 0])  # task -> right, reward, n
    for p, reply in zip(problems, answers(model, tok, problems, max_new_tokens, slots)):
        s = sums[p.task]
        s[0] += TASKS[p.task].correct(p, reply)
        s[1] += reward(p, reply)
        s[2] += 1
    return {t: {"accuracy": r / n, "reward": w / n, "n": n} for t, (r, w, n) in sorted(sums.items())}
