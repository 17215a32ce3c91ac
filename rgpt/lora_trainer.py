"""stage=lora: instruction tuning with LoRA adapters (rgpt.lora) on a frozen base model.

The loop is rgpt.trainer's; what changes is what it trains and saves. The base model is the checkpoint the
run started from (pretrain's best with resume=true, or resume_from); Adam, clipping, the all-reduce and the
rollback work on the adapters' own parameter store, and checkpoints hold the adapters (adapter.safetensors,
adapter.json) and their optimizer state, with state.json naming the base checkpoint and its sha256.
"""

import json

from rgpt import checkpoint as ckpt
from rgpt.checkpoint import CheckpointError
from rgpt.lora import Adapters, config_of
from rgpt.trainer import Trainer


class LoRATrainer(Trainer):
    def _trainable(self):
        if self.resumed is not None:  # the adapters' shape is the checkpoint's, whatever lora.* says now
            where = self.source / ckpt.ADAPTER_CONFIG
            cfg = config_of(json.loads(where.read_text(encoding="utf-8")), where)
            self.base = self.resumed["lora_base"]
        elif self.source is not None:
            cfg = self.cfg.lora
            self.base = {
                "path": str(self.source),
                "sha256": ckpt.read_state(self.source)["files"][ckpt.MODEL]["sha256"],
            }
        else:
            raise CheckpointError("stage=lora needs a model to adapt (resume=true or resume_from=...)")
        self.adapters = Adapters(self.model, cfg)
        if self.resumed is not None:
            self._load_trainable(self.source)
        n, total = self.adapters.store.numel(), self.model.num_params()
        self.log(
            f"LoRA r={cfg.r} alpha={cfg.alpha} on {', '.join(cfg.targets)}: {n:,} trained of {total:,} ({n / total:.2%})"
        )
        return self.adapters.store

    def _load_trainable(self, path) -> None:
        try:
            self.adapters.store.load(ckpt.load_tensors(path, ckpt.ADAPTER, device=self.device))
        except ValueError as e:
            raise CheckpointError(f"{path / ckpt.ADAPTER} does not match the adapters: {e}") from None

    def _state(self, **extra) -> dict:
        return super()._state(lora_base=self.base, **extra)
