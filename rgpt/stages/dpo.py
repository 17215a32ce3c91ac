"""stage=dpo: preference tuning over pairs of replies, with DPO's loss (rgpt.nn.dpo).

The reference model is the checkpoint the run started from (sft's best, or resume_from). Its log-probability
of every chosen and rejected reply is computed once, before the first step, and cached on disk as
safetensors under data.cache_dir, keyed by the sha256 of the reference's weights file, the tokenized pairs
and the precision: a resumed run, or a second run from the same model, reads it back instead of keeping a
second model in memory. Each checkpoint's state.json names the reference (path and sha256), so a resumed
run whose cache was deleted recomputes it from that checkpoint, after checking it is the same one.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rgpt.data.preference import PairBatcher, PairSet, prepare_pairs
from rgpt.nn.dpo import DPOLoss
from rgpt.nn.model import GPT
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.checkpoint import CheckpointError
from rgpt.settings import check
from rgpt.stages.lm import SFT
from rgpt.training.stage import Stage

REF_FORMAT = "rgpt-dpo-reference/1"  # bump when what the cached log-probabilities mean changes
STATS = ("reward_margin", "accuracy", "chosen_logp", "rejected_logp", "logp_accuracy")  # DPOLoss.stats


@dataclass
class DPOSettings:
    # DPO's β: how far the policy may move from the reference per unit of preference margin; 0.1 is the
    # paper's and the common default
    beta: float = 0.1

    def validate(self) -> "DPOSettings":
        check(0 < self.beta < math.inf, "dpo.beta", self.beta, "must be positive and finite")
        return self


def score_pairs(model: GPT, ps: PairSet, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected): each pair's summed log-probability of its replies under `model` in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.zeros(2, len(ps), dtype=torch.float64)  # (2, N): chosen, rejected
    for b in PairBatcher(ps, batch_size, seed=0, shuffle=False).epoch(0):
        b = b.to(model.device)
        model.forward(b.idx, b.targets)
        logp = model.sequence_logprobs().double().cpu().view(2, -1)  # (2, B)
        out[:, b.index.cpu()] = logp
    if was_training:
        model.train()
    return out[0], out[1]


def weights_sha256(path) -> str:
    """sha256 of a checkpoint's weights file, as its state.json records (and read_state verifies) it."""
    return ckpt.read_state(path)["files"][ckpt.MODEL]["sha256"]


def reference_checkpoint(ctx, stage: str) -> dict:
    """{"path", "sha256"} of the frozen reference of a dpo or grpo run: the checkpoint it started from, or
    on a resume the one its state recorded (under "<stage>_reference")."""
    if ctx.resumed is not None:
        return ctx.resumed[f"{stage}_reference"]
    if ctx.source is None:
        raise CheckpointError(f"stage={stage} needs a model to start from (resume=true or resume_from=...)")
    return {"path": str(ctx.source), "sha256": weights_sha256(ctx.source)}


def reference_logprobs(
    sets: dict[str, PairSet], reference: dict, cache_dir, precision: str, model_fn, batch_size: int, log=print
) -> dict[str, torch.Tensor]:
    """{"<split>.chosen" / "<split>.rejected": (N,) float64}: from the cache, or computed by model_fn()'s
    model (the reference's weights) and cached. `reference`: {"path", "sha256"} of its checkpoint."""
    key = hashlib.sha256(
        json.dumps(
            [REF_FORMAT, reference["sha256"], {k: s.digest() for k, s in sets.items()}, precision]
        ).encode()
    ).hexdigest()
    path = Path(cache_dir) / f"dpo-reference-{key[:40]}.safetensors"
    if path.exists():
        log(f"reference log-probabilities: cache hit {path}")
        return load_file(path)
    out = {}
    model = model_fn()
    for split, ps in sets.items():
        out[f"{split}.chosen"], out[f"{split}.rejected"] = score_pairs(model, ps, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(out, tmp, metadata={"reference": str(reference["path"]), "sha256": reference["sha256"]})
    os.replace(tmp, path)
    log(f"reference log-probabilities of {sum(len(s) for s in sets.values())} pairs computed → {path}")
    return out


class DPO(Stage):
    """stage=dpo: micro-batches of preference pairs, DPO's loss against the frozen starting model."""

    name = "dpo"
    data_kind = "pairs"
    starts_from = SFT
    needs_model = True
    work = "preference tuning"
    model_word = "preference-tuned"
    settings = ("dpo", DPOSettings)
    chat_template = True
    n_sums = 2 + len(STATS)  # loss sum, pairs, then STATS

    def data(self):
        cfg, m, ctx = self.cfg, self.model, self.ctx
        self.criterion = DPOLoss(self.own.beta)
        train_set, self.val_set = prepare_pairs(
            list(cfg.data.files), ctx.tok, m.config.block_size, cfg.data.val_fraction, ctx.log
        )
        self.train_size, self.val_size = len(train_set), len(self.val_set)
        self.val_batches = PairBatcher(self.val_set, cfg.train.batch_size, cfg.seed, shuffle=False)
        self.reference = reference_checkpoint(self.ctx, "dpo")
        sets = {"train": train_set, "val": self.val_set}
        ref = ctx.dist.first_then_rest(
            lambda: reference_logprobs(
                sets,
                self.reference,
                cfg.data.cache_dir,
                cfg.precision,
                self._reference_model,
                cfg.train.batch_size,
                ctx.log,
            ),
            "reference log-probabilities",
        )
        self.ref = {k: v.to(ctx.device, torch.float64) for k, v in ref.items()}
        won = int((self.ref["val.chosen"] > self.ref["val.rejected"]).sum())
        ctx.log(
            f"reference model {self.reference['path']}: prefers the chosen reply of {won}/{len(self.val_set)} "
            "held-out pairs (log-probability)"
        )
        return PairBatcher(train_set, cfg.train.batch_size, cfg.seed)

    def _reference_model(self) -> GPT:
        """A model with the reference's weights: the one being trained, before its first step; on a resume,
        the reference checkpoint loaded again (after checking it is the same file)."""
        if self.ctx.resumed is None:
            return self.model
        path = Path(self.reference["path"])
        if weights_sha256(path) != self.reference["sha256"]:
            raise CheckpointError(f"the reference model {path} changed since this DPO run started (sha256)")
        m = self.model
        model = GPT(m.config, device=m.device, dtype=m.dtype, compute_dtype=m.compute_dtype)
        ckpt.load_weights(model, path)
        return model

    def state(self) -> dict:
        return {"dpo_reference": self.reference}

    def _ref_logp(self, b, split: str) -> torch.Tensor:
        """(2B,) the reference log-probabilities of a batch's chosen, then rejected replies."""
        return torch.cat([self.ref[f"{split}.chosen"][b.index], self.ref[f"{split}.rejected"][b.index]])

    def weight(self, group) -> int:
        return sum(b.n_pairs for b in group)

    def forward_backward(self, b, n_total: int, probe=None) -> torch.Tensor:
        m, timers = self.model, self.ctx.timers
        with timers("forward"):
            m.forward(b.idx, b.targets)
            logp, ref = m.sequence_logprobs().double(), self._ref_logp(b, "train")
            loss = self.criterion.forward(logp, ref)
            stats = self.criterion.stats(logp, ref)
        with timers("backward"):
            # pair-weighted: the gradient of the group's mean loss over its pairs
            m.backward(dlogp=self.criterion.backward(scale=b.n_pairs / n_total))
        pairs = torch.tensor(float(b.n_pairs), dtype=torch.float64, device=loss.device)
        return torch.stack([loss * b.n_pairs, pairs, *(stats[k].double() for k in STATS)])

    def step_metrics(self, loss: float, sums: list[float]) -> dict:
        pairs, *sums = sums
        mean = dict(zip(STATS, (s / max(pairs, 1) for s in sums)))
        return {"train/loss": loss, "dpo/loss": loss, **{f"dpo/{k}": v for k, v in mean.items()}}

    def validate(self) -> float:
        """The held-out pairs' mean DPO loss; their accuracies and margin are kept for _val_metrics."""
        m, dist = self.model, self.ctx.dist
        total = torch.zeros(2 + len(STATS), dtype=torch.float64, device=self.ctx.device)  # loss, pairs, STATS
        for i, b in enumerate(self.val_batches.epoch(0)):
            if i % dist.world != dist.rank:
                continue
            b = b.to(self.ctx.device)
            m.forward(b.idx, b.targets)
            logp, ref = m.sequence_logprobs().double(), self._ref_logp(b, "val")
            total[0] += self.criterion.forward(logp, ref) * b.n_pairs
            total[1] += b.n_pairs
            stats = self.criterion.stats(logp, ref)
            total[2:] += torch.stack([stats[k].double() for k in STATS])
        self.criterion.cache = None
        dist.all_reduce_sum(total)
        loss, pairs, *sums = total.tolist()
        self._val = dict(zip(STATS, (s / pairs for s in sums)))
        return loss / pairs

    def val_metrics(self, val_loss: float) -> dict:
        return {"val/loss": val_loss, **{f"dpo/val_{k}": v for k, v in self._val.items()}}
