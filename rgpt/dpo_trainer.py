"""stage=dpo: the training loop of rgpt.trainer over preference pairs, with DPO's loss (rgpt.dpo).

The reference model is the checkpoint the run started from (sft's best, or resume_from). Its log-probability
of every chosen and rejected reply is computed once, before the first step, and cached on disk as
safetensors under data.cache_dir, keyed by the sha256 of the reference's weights file, the tokenized pairs
and the precision: a resumed run, or a second run from the same model, reads it back instead of keeping a
second model in memory. Each checkpoint's state.json names the reference (path and sha256), so a resumed
run whose cache was deleted recomputes it from that checkpoint, after checking it is the same one.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rgpt import checkpoint as ckpt
from rgpt.checkpoint import CheckpointError
from rgpt.data.preference import PairBatcher, PairSet, prepare_pairs
from rgpt.dpo import DPOLoss
from rgpt.model import GPT
from rgpt.trainer import Trainer

REF_FORMAT = "rgpt-dpo-reference/1"  # bump when what the cached log-probabilities mean changes
STATS = ("reward_margin", "accuracy", "chosen_logp", "rejected_logp", "logp_accuracy")  # DPOLoss.stats


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


class DPOTrainer(Trainer):
    """Trainer whose micro-batches are preference pairs and whose loss is DPO's."""

    n_sums = 2 + len(STATS)  # loss sum, pairs, then STATS

    def _load_data(self) -> None:
        cfg, m = self.cfg, self.model
        self.criterion = DPOLoss(cfg.dpo.beta)
        self.train_set, self.val_set = prepare_pairs(
            list(cfg.data.files), self.tok, m.config.block_size, cfg.data.val_fraction, self.log
        )
        self.batches = PairBatcher(self.train_set, cfg.train.batch_size, cfg.seed)
        self.val_batches = PairBatcher(self.val_set, cfg.train.batch_size, cfg.seed, shuffle=False)
        self.reference = self._reference()
        sets = {"train": self.train_set, "val": self.val_set}
        ref = self.dist.first_then_rest(
            lambda: reference_logprobs(
                sets,
                self.reference,
                cfg.data.cache_dir,
                cfg.precision,
                self._reference_model,
                cfg.train.batch_size,
                self.log,
            ),
            "reference log-probabilities",
        )
        self.ref = {k: v.to(self.device, torch.float64) for k, v in ref.items()}
        won = int((self.ref["val.chosen"] > self.ref["val.rejected"]).sum())
        self.log(
            f"reference model {self.reference['path']}: prefers the chosen reply of {won}/{len(self.val_set)} "
            "held-out pairs (log-probability)"
        )

    def _reference(self) -> dict:
        """{"path", "sha256"} of the reference checkpoint: the one this run started from."""
        if self.resumed is not None:
            return self.resumed["dpo_reference"]
        if self.source is None:
            raise CheckpointError("stage=dpo needs a model to start from (resume=true or resume_from=...)")
        return {"path": str(self.source), "sha256": weights_sha256(self.source)}

    def _reference_model(self) -> GPT:
        """A model with the reference's weights: the one being trained, before its first step; on a resume,
        the reference checkpoint loaded again (after checking it is the same file)."""
        if self.resumed is None:
            return self.model
        path = Path(self.reference["path"])
        if weights_sha256(path) != self.reference["sha256"]:
            raise CheckpointError(f"the reference model {path} changed since this DPO run started (sha256)")
        m = self.model
        model = GPT(m.config, device=m.device, dtype=m.dtype, compute_dtype=m.compute_dtype)
        ckpt.load_weights(model, path)
        return model

    def _state(self, **extra) -> dict:
        return super()._state(dpo_reference=self.reference, **extra)

    def _ref_logp(self, b, split: str) -> torch.Tensor:
        """(2B,) the reference log-probabilities of a batch's chosen, then rejected replies."""
        return torch.cat([self.ref[f"{split}.chosen"][b.index], self.ref[f"{split}.rejected"][b.index]])

    def _weight(self, group) -> int:
        return sum(b.n_pairs for b in group)

    def _forward_backward(self, b, n_total: int, probe=None) -> torch.Tensor:  # (diagnostics: pretrain/sft)
        m = self.model
        with self.timers("forward"):
            m.forward(b.idx, b.targets)
            logp, ref = m.sequence_logprobs().double(), self._ref_logp(b, "train")
            loss = self.criterion.forward(logp, ref)
            stats = self.criterion.stats(logp, ref)
        with self.timers("backward"):
            # pair-weighted: the gradient of the group's mean loss over its pairs
            m.backward(dlogp=self.criterion.backward(scale=b.n_pairs / n_total))
        pairs = torch.tensor(float(b.n_pairs), dtype=torch.float64, device=loss.device)
        return torch.stack([loss * b.n_pairs, pairs, *(stats[k].double() for k in STATS)])

    def _step_metrics(self, loss: float) -> dict:
        pairs, *sums = self._sums
        mean = dict(zip(STATS, (s / max(pairs, 1) for s in sums)))
        return {"train/loss": loss, "dpo/loss": loss, **{f"dpo/{k}": v for k, v in mean.items()}}

    def validate(self) -> float:
        """The held-out pairs' mean DPO loss; their accuracies and margin are kept for _val_metrics."""
        m = self.model
        m.eval()
        total = torch.zeros(2 + len(STATS), dtype=torch.float64, device=self.device)  # loss sum, pairs, STATS
        with self.timers("validation"):
            for i, b in enumerate(self.val_batches.epoch(0)):
                if i % self.dist.world != self.dist.rank:
                    continue
                b = b.to(self.device)
                m.forward(b.idx, b.targets)
                logp, ref = m.sequence_logprobs().double(), self._ref_logp(b, "val")
                total[0] += self.criterion.forward(logp, ref) * b.n_pairs
                total[1] += b.n_pairs
                stats = self.criterion.stats(logp, ref)
                total[2:] += torch.stack([stats[k].double() for k in STATS])
            self.criterion.cache = None
            self.dist.all_reduce_sum(total)
        m.train()
        loss, pairs, *sums = total.tolist()
        self._val = dict(zip(STATS, (s / pairs for s in sums)))
        return loss / pairs

    def _val_metrics(self, val_loss: float) -> dict:
        return {"val/loss": val_loss, **{f"dpo/val_{k}": v for k, v in self._val.items()}}
