"""stage=lora: instruction tuning with LoRA adapters (rgpt.nn.lora) on a frozen base model.

It learns what stage=sft learns; what changes is what trains and what is saved. The base model is the
checkpoint the run started from (pretrain's best with resume=true, or resume_from); Adam, clipping, the
all-reduce and the rollback work on the adapters' own parameter store, and checkpoints hold the adapters
(adapter.safetensors, adapter.json) and their optimizer state, with state.json naming the base checkpoint
and its sha256.
"""

import json

from rgpt.nn.lora import Adapters, LoRASettings
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.adapters import config_of
from rgpt.runtime.checkpoint import CheckpointError
from rgpt.settings import check
from rgpt.stages.lm import SFT, Pretrain


class LoRA(SFT):
    name = "lora"
    starts_from = Pretrain
    needs_model = True
    work = "LoRA instruction tuning"
    model_word = "LoRA-tuned"
    settings = ("lora", LoRASettings)
    reads_gpt_loss = False  # the diagnostics and gradient check read the whole model's gradients

    @classmethod
    def check(cls, cfg) -> None:
        check(
            not cfg.train.freeze_attn,
            "train.freeze_attn",
            cfg.train.freeze_attn,
            "lora already freezes the whole model (its adapters are what trains)",
        )

    def trainable(self):
        ctx = self.ctx
        if ctx.resumed is not None:  # the adapters' shape is the checkpoint's, whatever lora.* says now
            where = ctx.source / ckpt.ADAPTER_CONFIG
            cfg = config_of(json.loads(where.read_text(encoding="utf-8")), where)
            self.base = ctx.resumed["lora_base"]
        elif ctx.source is not None:
            cfg = self.own
            self.base = {
                "path": str(ctx.source),
                "sha256": ckpt.read_state(ctx.source)["files"][ckpt.MODEL]["sha256"],
            }
        else:
            raise CheckpointError("stage=lora needs a model to adapt (resume=true or resume_from=...)")
        self.adapters = Adapters(self.model, cfg)
        if ctx.resumed is not None:
            self.load_trainable(ctx.source)
        n, total = self.adapters.store.numel(), self.model.num_params()
        ctx.log(
            f"LoRA r={cfg.r} alpha={cfg.alpha} on {', '.join(cfg.targets)}: {n:,} trained of {total:,} ({n / total:.2%})"
        )
        return self.adapters.store

    def load_trainable(self, path) -> None:
        try:
            self.adapters.store.load(ckpt.load_tensors(path, ckpt.ADAPTER, device=self.ctx.device))
        except ValueError as e:
            raise CheckpointError(f"{path / ckpt.ADAPTER} does not match the adapters: {e}") from None

    def state(self) -> dict:
        return {"lora_base": self.base}
