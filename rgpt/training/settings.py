"""A training run's settings: the one definition of each key, its default (with why) and its check.

rgpt/conf/config.yaml composes over these defaults (rgpt/cli/schema.py registers them), so the YAML files
carry only presets: a stage's rates, a corpus's files, a model's sizes. The entry point parses Hydra's
composed config once into a RunConfig (rgpt.settings.parse); every bad value is a one-line ConfigError.
A stage's own group (`lora:`, `dpo:`) is defined by the stage (rgpt/stages) and parsed into `stage_settings`.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from rgpt.data.dataset import DataConfig, TokenizerSettings
from rgpt.nn.model import GPTConfig
from rgpt.runtime.device import RuntimeSettings
from rgpt.settings import FLAT, INTERNAL, ConfigError, check, parse


@dataclass
class TrainSettings:
    # upper bound on epochs (the reference's); early stopping normally ends a run sooner
    max_epochs: int = 500
    # optional cap on optimizer steps across the run (a stop mid-epoch saves `last`)
    max_steps: int | None = None
    # optional wall-clock budget for this stage; stops after the step, saves `last`
    max_minutes: float | None = None
    # optional budget in training tokens (inputs, padding excluded) across the run
    max_tokens: int | None = None
    batch_size: int = 16  # sequences per micro-batch; the corpus is short sentences, so 16 keeps padding low
    grad_accum: int = 4  # micro-batches per Adam step: 4 x 16 sequences is a stable batch for this corpus
    lr: float = 5e-4  # peak learning rate: the reference's pretraining rate (stage files set their own)
    # cosine: warmup then cosine annealing with warm restarts; exponential: lr * decay^(epoch/10); constant
    schedule: str = "cosine"
    warmup_steps: int = 50  # linear warmup from 0 over this many optimizer steps
    cycle_steps: int = 500  # length of the first cosine cycle in optimizer steps (after warmup)
    cycle_mult: float = 2.0  # each restart's cycle is this many times longer than the one before
    min_lr_ratio: float = 0.1  # the cosine floor, as a fraction of lr
    decay: float = 0.95  # exponential schedule: lr * decay^(epoch / 10), the reference's rule
    clip_norm: float = 5.0  # global L2 gradient-norm clipping threshold (the reference's documented value)
    # decoupled (AdamW) decay on weight matrices only; 0 is plain Adam as in the reference
    weight_decay: float = 0.0
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's denominator guard
    # early stopping: evaluations without improvement before stopping. The reference's 30 spent ~26 of ~33 min
    # on a 2-core AVX2 CPU after the best epoch (7), with val loss rising every epoch
    patience: int = 3
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    monitor: str = "val_loss"  # val_loss or train_loss: what early stopping and `best` checkpoints watch
    # true keeps the attention projections fixed (gradients still flow through them)
    freeze_attn: bool = False
    max_bad_steps: int = 5  # consecutive non-finite losses/gradients (each skipped) before training stops
    # validate, checkpoint (last, best) and count patience every N optimizer steps instead of at each epoch's
    # end: for corpora whose epoch takes an hour; None: once an epoch
    eval_every: int | None = None

    def validate(self):
        for key in ("max_epochs", "batch_size", "grad_accum", "cycle_steps", "patience", "max_bad_steps"):
            check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be at least 1")
        check(
            self.max_steps is None or self.max_steps >= 1,
            "train.max_steps",
            self.max_steps,
            "must be >= 1 or null",
        )
        check(
            self.eval_every is None or self.eval_every >= 1,
            "train.eval_every",
            self.eval_every,
            "must be >= 1 or null",
        )
        check(
            self.max_tokens is None or self.max_tokens >= 1,
            "train.max_tokens",
            self.max_tokens,
            "must be >= 1 or null",
        )
        check(
            self.max_minutes is None or self.max_minutes > 0,
            "train.max_minutes",
            self.max_minutes,
            "must be > 0",
        )
        check(0 < self.lr < math.inf, "train.lr", self.lr, "must be positive and finite")
        check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.cycle_mult >= 1, "train.cycle_mult", self.cycle_mult, "must be >= 1")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(0 < self.decay <= 1, "train.decay", self.decay, "must be in (0, 1]")
        check(self.clip_norm > 0, "train.clip_norm", self.clip_norm, "must be positive")
        check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("beta1", "beta2"):
            check(0 <= getattr(self, key) < 1, f"train.{key}", getattr(self, key), "must be in [0, 1)")
        check(self.eps > 0, "train.eps", self.eps, "must be positive")
        check(self.min_delta >= 0, "train.min_delta", self.min_delta, "must be >= 0")
        schedules = ("cosine", "exponential", "constant")
        check(
            self.schedule in schedules,
            "train.schedule",
            self.schedule,
            f"must be one of {', '.join(schedules)}",
        )
        monitors = ("val_loss", "train_loss")
        check(
            self.monitor in monitors, "train.monitor", self.monitor, f"must be one of {', '.join(monitors)}"
        )


@dataclass
class CheckpointSettings:
    # best_and_last: `last` every epoch + `best` on improvement; periodic: every `every` epochs; none
    strategy: str = "best_and_last"
    keep_best: int = 3  # best_and_last: how many best checkpoints to keep
    every: int = 10  # periodic: save every this many epochs
    keep: int = 5  # periodic: how many to keep

    def validate(self):
        strategies = ("best_and_last", "periodic", "none")
        check(
            self.strategy in strategies,
            "checkpoint.strategy",
            self.strategy,
            f"must be one of {', '.join(strategies)}",
        )
        for key in ("keep_best", "every", "keep"):
            check(getattr(self, key) >= 1, f"checkpoint.{key}", getattr(self, key), "must be at least 1")


@dataclass
class MonitorSettings:
    progress: bool = True  # a tqdm bar per epoch on the console
    # greedy continuation logged to TensorBoard (text) after every epoch
    sample_prompt: str = "山脉是如何形成的？"
    sample_tokens: int = 40  # length of that continuation
    # every N steps, each layer's attention heads over sample_prompt as a TensorBoard image (attention/layer_N):
    # one short forward and the pictures, ~0.5 s for model=small; None: never
    attention_every: int | None = 100
    # per tensor gradient norm, update/weight ratio (healthy near -3), histograms; per layer activation
    # statistics and dead units; entropy per head (rgpt/training/diagnostics.py). Off: free
    diagnostics: bool = False
    # steps between diagnostics: at 100, 0.33% of model=small's training time, 0.49% of base's
    diagnostics_every: int = 100
    # every N steps, check the hand-written gradient of the current micro-batch against float64 finite
    # differences (rgpt/training/gradcheck.py); > 1e-5 is a loud warning. Costs 4 float64 forwards per parameter
    # tensor (model=small: ~20 steps' time, base: ~107), so N in the thousands (2% of the run: small 1000,
    # base 5000); None: never
    gradcheck_every: int | None = None

    def validate(self):
        for key in ("attention_every", "gradcheck_every"):
            v = getattr(self, key)
            check(v is None or v >= 1, f"monitor.{key}", v, "must be >= 1 or null")
        check(
            self.diagnostics_every >= 1,
            "monitor.diagnostics_every",
            self.diagnostics_every,
            "must be at least 1",
        )


@dataclass
class RunConfig:
    # the stage trained: one of rgpt.stages.STAGES, chosen by its preset rgpt/conf/stage/<name>.yaml
    stage: str = ""
    # the architecture: its one definition is rgpt/nn/model.py
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    # what the stage reads: defined in rgpt/data/dataset.py
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    # device, threads, allocator
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings, metadata=FLAT)
    # bf16: bfloat16 matmuls, float32 master weights/Adam/statistics; fp32; auto: bf16 where the CPU
    # (AVX512-BF16/AMX) or GPU has it natively
    precision: str = "auto"
    seed: int = 1337  # seeds initialisation, dropout and batch order: same seed and settings, same loss curve
    # names the run directory; sft finds the pretrained model under the same run_name
    run_name: str = "default"
    out_dir: str = "outputs"  # root of every run directory; watch with `tensorboard --logdir outputs`
    # continue this stage's run from its newest checkpoint; with none, start from the stage before
    resume: bool = False
    # an explicit checkpoint directory to start from (same stage: exact resume; other stage: weights only)
    resume_from: str | None = None
    # with resume_from: take only the checkpoint's weights (fresh optimizer, schedule and epochs) even when it
    # is of the same stage, e.g. sft on the tasks' warm-up on top of an existing sft model
    weights_only: bool = False
    # torchrun: a rank that waits longer than this for the others (a hung peer, or rank 0 tokenizing a new
    # corpus) stops with an error instead of hanging; a dead peer is seen at once
    dist_timeout_s: float = 600.0
    # the stage's own group (e.g. `lora:` of rgpt/stages/lora.py), parsed by from_dict
    stage_settings: dict = field(default_factory=dict, metadata=INTERNAL)
    # under a Hydra sweep (-m): the job's own subdirectory
    job: str | None = field(default=None, metadata=INTERNAL)

    @property
    def run_dir(self) -> Path:
        """${out_dir}/${stage}/${run_name}, and under a sweep the job's subdirectory of it."""
        root = Path(self.out_dir) / self.stage / self.run_name
        return root / self.job if self.job else root

    @classmethod
    def from_dict(cls, d: dict, stages: dict) -> "RunConfig":
        """From Hydra's composed config as a dict; `stages`: rgpt.stages.STAGES, whose groups are parsed too."""
        d = dict(d)
        d.pop("hydra", None)
        stage = stages.get(d.get("stage"))
        check(stage is not None, "stage", d.get("stage"), f"must be one of {', '.join(stages)}")
        data = d.get("data") or {}
        check(
            not isinstance(data, dict) or "kind" not in data,
            "data.kind",
            data.get("kind"),
            "is set by stage=",
        )
        own = {}
        for other in stages.values():  # every stage's group is a known key; only this stage's is checked
            if other.settings is not None:
                key, kind = other.settings
                own[key] = parse(kind, d.pop(key, None) or {}, f"{key}.")
        cfg = parse(cls, d)
        cfg.data.kind = stage.data_kind  # the stage decides what kind of text the data is
        cfg.stage_settings = own
        return cfg.validate(stage)

    def validate(self, stage) -> "RunConfig":
        check(
            self.model.vocab_size == 0, "model.vocab_size", self.model.vocab_size, "is set from the tokenizer"
        )
        try:  # the model's and the data's own checks, in their own modules
            self.model.validate(allow_no_vocab=True)
            self.data.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for part in (self.train, self.tokenizer, self.checkpoint, self.monitor, self.runtime):
            part.validate()
        if stage.settings is not None:
            self.stage_settings[stage.settings[0]].validate()
        stage.check(self)
        check(
            self.precision in ("auto", "fp32", "bf16"),
            "precision",
            self.precision,
            "must be auto, fp32 or bf16",
        )
        check(self.dist_timeout_s > 0, "dist_timeout_s", self.dist_timeout_s, "must be positive")
        check(
            not self.weights_only or bool(self.resume_from),
            "weights_only",
            self.weights_only,
            "goes with resume_from=CHECKPOINT (the weights to start from)",
        )
        name = str(self.run_name)
        check(bool(name.strip()) and "/" not in name, "run_name", self.run_name, "must be a plain name")
        return self


def schema(stages: dict) -> dict:
    """Every key of a run with its default, the stages' own groups included: the node Hydra composes over."""
    from rgpt.settings import defaults

    out = defaults(RunConfig)
    for stage in stages.values():
        if stage.settings is not None:
            out[stage.settings[0]] = defaults(stage.settings[1])
    return out
