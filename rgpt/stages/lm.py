"""The language-modelling stages: next-token cross-entropy on documents (pretrain) or on the assistant's
turns of dialogues (sft), with the replay pool of pretraining text beside the dialogues when data.replay_*
asks for it."""

import torch

from rgpt.data import Batcher, prepare
from rgpt.data.dataset import replay_set, replay_windows
from rgpt.training.monitor import ppl
from rgpt.training.stage import Stage


class LanguageModeling(Stage):
    reads_gpt_loss = True

    def data(self):
        cfg, ctx = self.cfg, self.ctx
        pin = ctx.device.type == "cuda"
        train_set, val_set = ctx.dist.first_then_rest(
            lambda: prepare(cfg.data, ctx.tok, self.model.config.block_size, ctx.log), "data cache"
        )
        pool = replay_set(train_set)
        k = replay_windows(train_set, pool, cfg.data.replay_ratio) if pool is not None else 0
        if pool is not None:
            ctx.log(
                f"replay: {k} of the pool's {len(pool)} windows an epoch (data.replay_ratio="
                f"{cfg.data.replay_ratio}), fresh text for {max(1, len(pool) // k)} epoch(s) before it repeats"
            )
        self.train_size, self.val_size = len(train_set), len(val_set)
        self.val_batches = Batcher(val_set, cfg.train.batch_size, cfg.seed, shuffle=False, pin_memory=pin)
        return Batcher(
            train_set, cfg.train.batch_size, cfg.seed, pin_memory=pin, replay=pool, replay_windows=k
        )

    def forward_backward(self, b, n_total: int, probe=None) -> torch.Tensor:
        m, timers = self.model, self.ctx.timers
        with timers("forward"):
            loss = m.forward(b.idx, b.targets)
        if probe is not None:
            with timers("diagnostics"):
                probe.activations(m, b.idx)
        with timers("backward"):
            # token-weighted: the gradient of the group's mean loss, not a mean of means
            m.backward(scale=b.n_tokens / n_total)
        return (loss.double() * b.n_tokens).view(1)

    def validate(self) -> float:
        """Token-weighted mean loss over the validation split (reduced across ranks)."""
        m, dist = self.model, self.ctx.dist
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)  # (nll sum, tokens)
        for i, b in enumerate(self.val_batches.epoch(0)):
            if i % dist.world != dist.rank:
                continue
            b = b.to(self.ctx.device)
            total[0] += m.forward(b.idx, b.targets).double() * b.n_tokens
            total[1] += b.n_tokens
        dist.all_reduce_sum(total)
        return (total[0] / total[1]).item()

    def step_metrics(self, loss: float, sums: list[float]) -> dict:
        return {"train/loss": loss, "train/ppl": ppl(loss)}

    def val_metrics(self, val_loss: float) -> dict:
        return {"val/loss": val_loss, "val/ppl": ppl(val_loss)}


class Pretrain(LanguageModeling):
    """stage=pretrain: learn the language from documents; builds the vocabulary when it starts fresh."""

    name = "pretrain"
    data_kind = "pretrain"
    model_word = "pretrained"


class SFT(LanguageModeling):
    """stage=sft: learn the 用户/助手 dialogues on top of the pretrained model."""

    name = "sft"
    data_kind = "sft"
    starts_from = Pretrain
    work = "instruction tuning"
    model_word = "instruction-tuned"
    chat_template = True
