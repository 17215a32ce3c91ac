"""What the training loop asks of a stage, and what it hands one.

The loop (rgpt/training/loop.py) is handed a Stage class and never asks which stage it is: the stage says
what its data holds, what it starts from, which parameters train, how one micro-batch goes forward and
backward, how it is validated, what it logs and what its checkpoints carry beyond the loop's own state.
The stages themselves live in rgpt/stages, one module each, registered in rgpt.stages.STAGES.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from rgpt.data.tokenizer import TokenizerBase
from rgpt.nn.model import GPT
from rgpt.runtime import checkpoint as ckpt
from rgpt.training.distributed import Dist


@dataclass
class Context:
    """What a stage works with: the run's settings and model, and the loop's helpers."""

    cfg: object  # rgpt.training.settings.RunConfig
    model: GPT
    tok: TokenizerBase
    device: torch.device
    dist: Dist
    log: object  # print-like; silent on ranks other than 0
    timers: object  # rgpt.training.monitor.Timers: `with timers("forward"): ...`
    source: Path | None  # the checkpoint the weights came from, if any
    resumed: dict | None  # its state.json when this run resumes exactly, else None


class Stage:
    """A stage with the loop's defaults: the whole model trains on a token-weighted loss."""

    name = ""  # the registry's key: stage=NAME, and the run directory ${out_dir}/NAME/${run_name}
    data_kind = None  # what data.files hold: rgpt.data.dataset.KINDS (documents, dialogues or pairs)
    starts_from = None  # the Stage whose best model `resume=true` starts from when this run has no checkpoint
    needs_model = False  # True: tunes a trained model and never starts from scratch
    work = "training"  # what it does, in words, for the log ("instruction tuning")
    model_word = "trained"  # its model, in words ("the pretrained model")
    settings = None  # (key, dataclass) of the stage's own group of settings, e.g. ("beta_group", Settings)
    chat_template = False  # the monitor's sample prompt as a chat turn (True) or as plain text
    reads_gpt_loss = False  # the live diagnostics and gradient check apply (they read the GPT's own loss)
    n_sums = 1  # what forward_backward returns: the weighted loss sum first, then the stage's own sums
    adapters = None  # weights a checkpoint holds instead of the model's (rgpt.nn.lora.Adapters)

    def __init__(self, ctx: Context):
        self.ctx, self.cfg, self.model = ctx, ctx.cfg, ctx.model

    @classmethod
    def check(cls, cfg) -> None:
        """The stage's own checks of a run's settings (ConfigError naming the key)."""

    @property
    def own(self):
        """The stage's own settings group (None without one)."""
        return self.cfg.stage_settings[self.settings[0]] if self.settings else None

    def trainable(self):
        """The parameter store that training updates (rgpt.nn.params.ParamStore): the whole model's."""
        return self.model.store

    def load_trainable(self, path) -> None:
        """The trained weights of checkpoint `path` into the store that training updates."""
        ckpt.load_weights(self.model, path)

    def state(self) -> dict:
        """What the stage adds to every checkpoint's state.json."""
        return {}

    def data(self):
        """The training batcher; sets self.train_size and self.val_size (for the log) and keeps what
        validate() reads."""
        raise NotImplementedError

    def forward_backward(self, b, n_total: int, probe=None) -> torch.Tensor:
        """Forward and backward of one micro-batch, its gradient scaled for the group's mean; returns
        (n_sums,) float64 sums, the weighted loss first. probe: diagnostics reading the activations."""
        raise NotImplementedError

    def weight(self, group) -> int:
        """A group's weight in means over steps: its target tokens."""
        return sum(b.n_tokens for b in group)

    def validate(self) -> float:
        """The validation loss (reduced across ranks)."""
        raise NotImplementedError

    def step_metrics(self, loss: float, sums: list[float]) -> dict:
        """The stage's own metrics of the last step (beside learning rate, gradient norm and speed)."""
        return {"train/loss": loss}

    def val_metrics(self, val_loss: float) -> dict:
        """The stage's own metrics of the last validation."""
        return {"val/loss": val_loss}

    def texts(self) -> dict[str, str]:
        """Text the stage shows at each validation beside the loop's sample ({TensorBoard tag: markdown}),
        e.g. what it generated during training."""
        return {}
