"""stage=grpo: reinforcement learning on verifiable tasks with GRPO's loss (rgpt.nn.grpo).

Each micro-batch draws train.batch_size problems of the tasks that data.files names (rgpt.data.tasks: their
train split), samples `grpo.group_size` replies to each through the KV cache, the micro-batch's all in one
batch (rgpt.inference.generate.sample_groups), scores them with the task's code, normalises the rewards within
each prompt's group into advantages, and takes GRPO's gradient through GPT.backward(dtoken_logp=...). Its data
is generated, not read: the micro-batches the loop iterates over are only the draws' seeds (epoch, index), so
a resumed run draws the same problems and the same replies, bit for bit. π_old is the policy at sampling time
(one update per rollout, so the ratio is 1 up to the cached decode's rounding and the clip guards only against
that), and π_ref is the frozen starting model, kept in memory beside the policy (the replies are new at every
step, so its log-probabilities cannot be cached as DPO's are). Validation: −(mean reward) of greedy replies to
the first `grpo.val_problems` held-out problems of each task (rgpt.inference.verify), so lower is better there
as for the other stages; the train loss is GRPO's surrogate, which is ≈ 0 by construction (group-normalised
advantages sum to zero and the ratio is 1): read grpo/reward instead.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from rgpt.data.tasks import TASKS, draw, held_out, reward, split
from rgpt.data.tokenizer import PAD_ID
from rgpt.inference.generate import sample_groups
from rgpt.inference.verify import verify
from rgpt.nn.grpo import GRPOLoss, group_advantages
from rgpt.nn.loss import IGNORE_INDEX
from rgpt.nn.model import GPT
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.checkpoint import CheckpointError
from rgpt.settings import check
from rgpt.stages.dpo import reference_checkpoint, weights_sha256
from rgpt.stages.lm import SFT
from rgpt.training.stage import Stage

STATS = ("kl", "clip_fraction", "reward", "advantage_std", "reply_length", "ended")  # per reply, summed


@dataclass
class GRPOSettings:
    group_size: int = 16  # G replies per prompt, whose rewards are normalised together (DeepSeekMath: 64);
    # 16 rather than 8: more groups with both right and wrong replies, the ones that teach
    clip_eps: float = 0.2  # PPO's ε: the ratio π/π_old is clipped to [1 − ε, 1 + ε] (the common value)
    kl_beta: float = 0.04  # β of the k3 KL penalty to the starting model (DeepSeekMath's 0.04)
    max_reply_tokens: int = 32  # replies are cut here: a worked sum (个位…，十位…，等于…) is ~22 tokens
    temperature: float = 1.0  # sampling temperature; 1 samples the policy itself (on-policy)
    micro_batches: int = (
        100  # micro-batches that count as an epoch (validation and checkpoints follow epochs)
    )
    val_problems: int = 50  # held-out problems per task answered greedily at each validation
    adv_eps: float = 1e-4  # A = (r − mean) / (std + adv_eps): an all-equal group gets A = 0, not NaN

    def validate(self) -> "GRPOSettings":
        for key in ("max_reply_tokens", "micro_batches", "val_problems"):
            check(getattr(self, key) >= 1, f"grpo.{key}", getattr(self, key), "must be at least 1")
        check(
            self.group_size >= 2,
            "grpo.group_size",
            self.group_size,
            "must be at least 2 (a group to compare)",
        )
        check(0 < self.clip_eps < 1, "grpo.clip_eps", self.clip_eps, "must be in (0, 1)")
        check(0 <= self.kl_beta < math.inf, "grpo.kl_beta", self.kl_beta, "must be >= 0 and finite")
        check(0 < self.temperature < math.inf, "grpo.temperature", self.temperature, "must be positive")
        check(0 < self.adv_eps < math.inf, "grpo.adv_eps", self.adv_eps, "must be positive")
        return self


def _cell(text: str) -> str:
    """Text as one cell of a markdown table."""
    return text.replace("|", "\\|").replace("\n", " ")


class Draw:
    """One micro-batch before its rollout: where it sits in the run, the key of its problems and replies.
    The rollout fills idx with the sequences it generated (the loop counts their tokens)."""

    def __init__(self, epoch: int, index: int, n_replies: int):
        self.epoch, self.index, self.n_replies = epoch, index, n_replies
        self.idx = torch.empty(0, 0, dtype=torch.long)

    def to(self, device):
        return self


class Draws:
    """The loop's batcher for generated data: `micro_batches` Draws an epoch."""

    def __init__(self, n: int, n_replies: int):
        self.n, self.n_replies = n, n_replies

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int, start: int = 0):
        return (Draw(epoch, i, self.n_replies) for i in range(start, self.n))


class GRPO(Stage):
    """stage=grpo: groups of sampled replies to generated problems, GRPO's loss against the starting model."""

    name = "grpo"
    data_kind = "tasks"
    starts_from = SFT
    needs_model = True
    work = "reinforcement learning on verifiable tasks"
    model_word = "RL-tuned"
    settings = ("grpo", GRPOSettings)
    chat_template = True
    n_sums = 1 + 1 + len(STATS) + len(TASKS) * 2  # loss, replies, STATS, per task (reward sum, replies)

    @classmethod
    def check(cls, cfg) -> None:
        names = list(cfg.data.files)
        check(
            set(names) <= set(TASKS) and len(set(names)) == len(names),
            "data.files",
            names,
            f"stage=grpo names its tasks there, each once: {', '.join(TASKS)}",
        )

    def data(self):
        cfg, own, ctx = self.cfg, self.own, self.ctx
        self.criterion = GRPOLoss(own.clip_eps, own.kl_beta)
        self.pools = [split(name)[0] for name in cfg.data.files]
        self.val_set = held_out(cfg.data.files, own.val_problems)  # the same ones at every validation
        self.train_size = sum(len(p) for p in self.pools)
        self.val_size = len(self.val_set)
        ctx.log(
            f"tasks {', '.join(cfg.data.files)}: {self.train_size} training problems, {self.val_size} held-out ones "
            f"answered at each validation; {cfg.train.batch_size} prompts × {own.group_size} replies a micro-batch"
        )
        self.reference = reference_checkpoint(self.ctx, "grpo")
        self.ref_model = self._reference_model()
        self._clock = {"rollout": 0.0, "update": 0.0}
        self._last = []  # (prompt, reply, ended, reward) of the last micro-batch's first reply to each prompt
        return Draws(own.micro_batches, cfg.train.batch_size * own.group_size)

    def _reference_model(self) -> GPT:
        """The frozen starting model, loaded from its checkpoint (after checking it is the same file)."""
        path, m = self.reference["path"], self.model
        if weights_sha256(path) != self.reference["sha256"]:
            raise CheckpointError(f"the reference model {path} changed since this GRPO run started (sha256)")
        with torch.random.fork_rng(
            devices=[]
        ):  # building a GPT draws from the global RNG: leave it as it was
            ref = GPT(m.config, device=m.device, dtype=m.dtype, compute_dtype=m.compute_dtype)
        ckpt.load_weights(ref, path)
        ref.eval()
        return ref

    def state(self) -> dict:
        return {"grpo_reference": self.reference}

    def weight(self, group) -> int:
        return sum(b.n_replies for b in group)

    # ---- the rollout ---------------------------------------------------------------------------------
    def _generator(self, d: Draw) -> torch.Generator:
        """The sampling generator of a micro-batch: seeded by (seed, epoch, index), whoever computes it."""
        key = np.random.SeedSequence([self.cfg.seed, d.epoch, d.index, 1])
        g = torch.Generator(device=self.ctx.device)
        g.manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))
        return g

    def rollout(self, d: Draw):
        """(idx, targets, old_logp, rewards, problems, replies) of one micro-batch: P problems, G replies each."""
        own, tok, m = self.own, self.ctx.tok, self.model
        problems = draw(self.pools, self.cfg.train.batch_size, self.cfg.seed, d.epoch, d.index)
        prompts = [tok.encode_prompt([("user", p.prompt)]) for p in problems]
        cuts = [min(own.max_reply_tokens, m.config.block_size + 1 - len(q)) for q in prompts]  # no sliding
        for p, cut in zip(problems, cuts):
            if cut < 1:
                raise ValueError(
                    f"the prompt {p.prompt!r} does not fit the {m.config.block_size}-token window"
                )
        m.eval()
        groups = sample_groups(
            m,
            prompts,
            own.group_size,
            max_new_tokens=cuts,
            temperature=own.temperature,
            generator=self._generator(d),
        )
        seqs, rewards, replies = [], [], []
        for p, prompt, group in zip(problems, prompts, groups):
            for ids, logps, ended in group:
                text = tok.decode(ids[:-1] if ended else ids)
                seqs.append((prompt, ids, logps))
                rewards.append(reward(p, text))
                replies.append((text, ended))
        m.train()
        T = max(len(p) + len(r) - 1 for p, r, _ in seqs)
        B = len(seqs)
        idx = torch.full((B, T), PAD_ID, dtype=torch.long)
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        old = torch.zeros(B, T, dtype=torch.float64)
        for i, (prompt, reply, logps) in enumerate(seqs):
            full = prompt + reply
            idx[i, : len(full) - 1] = torch.tensor(full[:-1])
            targets[i, len(prompt) - 1 : len(full) - 1] = torch.tensor(reply)  # the reply's tokens only
            old[i, len(prompt) - 1 : len(full) - 1] = torch.tensor(logps, dtype=torch.float64)
        dev = self.ctx.device
        return (
            idx.to(dev),
            targets.to(dev),
            old.to(dev),
            torch.tensor(rewards, dtype=torch.float64, device=dev),
            problems,
            replies,
        )

    # ---- the update ------------------------------------------------------------------------------------
    def forward_backward(self, b, n_total: int, probe=None) -> torch.Tensor:
        m, own, timers = self.model, self.own, self.ctx.timers
        t0 = time.perf_counter()
        with timers("rollout"):
            idx, targets, old, rewards, problems, replies = self.rollout(b)
            adv = group_advantages(rewards, own.group_size, own.adv_eps)  # (B,)
            with torch.no_grad():
                self.ref_model.forward(idx, targets)
                ref = self.ref_model.token_logprobs().double()  # (B, T)
        t1 = time.perf_counter()
        b.idx = idx
        mask = targets != IGNORE_INDEX
        with timers("forward"):
            m.forward(idx, targets)
            logp = m.token_logprobs().double()
            loss = self.criterion.forward(logp, old, ref, adv, mask)
            stats = self.criterion.stats()
        with timers("backward"):
            # reply-weighted: the gradient of the step's mean over all its replies
            m.backward(dtoken_logp=self.criterion.backward(scale=b.n_replies / n_total))
        self._last = [
            (p.prompt, *replies[i * own.group_size], float(rewards[i * own.group_size]))
            for i, p in enumerate(problems)
        ]
        self._clock["rollout"] += t1 - t0
        self._clock["update"] += time.perf_counter() - t1
        G, n = own.group_size, b.n_replies
        per_task = []
        for name in TASKS:
            hit = torch.tensor([p.task == name for p in problems], device=rewards.device).repeat_interleave(G)
            per_task += [(rewards * hit).sum(), hit.sum().double()]
        lengths = mask.sum(1).double()
        ended = torch.tensor([e for _, e in replies], dtype=torch.float64, device=rewards.device)
        return torch.stack(
            [
                loss.double() * n,
                torch.tensor(float(n), dtype=torch.float64, device=rewards.device),
                stats["kl"].double(),
                stats["clip_fraction"].double(),
                rewards.sum(),
                adv.view(-1, G).std(1, unbiased=False).sum() * G,  # per reply: each group's std, G times
                lengths.sum(),
                ended.sum(),
                *per_task,
            ]
        )

    def step_metrics(self, loss: float, sums: list[float]) -> dict:
        n, *rest = sums
        stats, per_task = rest[: len(STATS)], rest[len(STATS) :]
        mean = dict(zip(STATS, (s / max(n, 1) for s in stats)))
        out = {"train/loss": loss, **{f"grpo/{k}": v for k, v in mean.items()}}
        for i, name in enumerate(TASKS):
            r, k = per_task[2 * i : 2 * i + 2]
            if k:
                out[f"grpo/reward_{name}"] = r / k
        # this step's seconds (the time/* tags are the run's totals by phase, logged at each validation)
        out["grpo/rollout_sec"], out["grpo/update_sec"] = self._clock["rollout"], self._clock["update"]
        self._clock = {"rollout": 0.0, "update": 0.0}
        return out

    def texts(self) -> dict[str, str]:
        """The last micro-batch's first sampled reply to each prompt, with its reward (this rank's)."""
        if not self._last:
            return {}
        lines = ["| prompt | sampled reply | ended | reward |", "|---|---|---|---|"]
        lines += [f"| {_cell(q)} | {_cell(a)} | {e} | {r:.2f} |" for q, a, e, r in self._last]
        return {"grpo/replies": "\n".join(lines)}

    def validate(self) -> float:
        """−(mean reward) of greedy replies to the held-out problems (each rank answers them all)."""
        self._val = verify(self.model, self.ctx.tok, self.val_set, self.own.max_reply_tokens)
        n = sum(v["n"] for v in self._val.values())
        return (
            0.0 - sum(v["reward"] * v["n"] for v in self._val.values()) / n
        )  # 0.0 -: no "-0.0000" in the log

    def val_metrics(self, val_loss: float) -> dict:
        out = {"val/loss": val_loss, "grpo/val_reward": -val_loss}
        for name, v in self._val.items():
            out[f"grpo/val_accuracy_{name}"] = v["accuracy"]
            out[f"grpo/val_reward_{name}"] = v["reward"]
        return out
