"""A training run's settings as plain dataclasses, validated once at start-up.

The entry point turns Hydra's composed config into a dict and calls `RunConfig.from_dict`; nothing below
sees an omegaconf object. Every bad value is a ConfigError whose one-line message names the key.
"""

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from rgpt.cli import ALLOCATORS, ConfigError
from rgpt.data.dataset import DataConfig
from rgpt.model import GPTConfig

STAGES = ("pretrain", "sft", "dpo", "lora")
CORPUS_KINDS = ("pretrain", "sft")  # the corpora a vocabulary is built from (tokenizer.files)
DATA_KIND = {
    "pretrain": "pretrain",
    "sft": "sft",
    "lora": "sft",
    "dpo": "pairs",
}  # what a stage's data.files hold


def _pick(cls, d: dict, prefix: str):
    """Build dataclass `cls` from dict d, refusing unknown keys and coercing numbers to the declared type."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in d.items():
        want = known[name].type
        want = want if isinstance(want, str) else getattr(want, "__name__", str(want))  # "int", "int | None"
        kind = want.split(" ")[0]
        try:
            if value is None:
                if kind in ("int", "float", "bool") and "None" not in want:
                    raise ValueError  # e.g. train.batch_size=null
            elif kind in ("int", "float") and isinstance(value, bool):
                raise ValueError  # e.g. train.batch_size=true
            elif kind == "int":
                if float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            elif kind == "float":
                value = float(value)
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{prefix}{name}={value!r} is not a {kind}") from None
        kwargs[name] = value
    return cls(**kwargs)


def _check(ok: bool, key: str, value, why: str):
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass
class TrainSettings:
    max_epochs: int = 500
    max_steps: "int | None" = None
    max_minutes: "float | None" = None
    max_tokens: "int | None" = None
    batch_size: int = 16
    grad_accum: int = 4
    lr: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 50
    cycle_steps: int = 500
    cycle_mult: float = 2.0
    min_lr_ratio: float = 0.1
    decay: float = 0.95
    clip_norm: float = 5.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    patience: int = 3
    min_delta: float = 0.0
    monitor: str = "val_loss"
    freeze_attn: bool = False
    max_bad_steps: int = 5
    eval_every: "int | None" = None

    def validate(self):
        for key in ("max_epochs", "batch_size", "grad_accum", "cycle_steps", "patience", "max_bad_steps"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be at least 1")
        _check(
            self.max_steps is None or self.max_steps >= 1,
            "train.max_steps",
            self.max_steps,
            "must be >= 1 or null",
        )
        _check(
            self.eval_every is None or self.eval_every >= 1,
            "train.eval_every",
            self.eval_every,
            "must be >= 1 or null",
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            "train.max_tokens",
            self.max_tokens,
            "must be >= 1 or null",
        )
        _check(
            self.max_minutes is None or self.max_minutes > 0,
            "train.max_minutes",
            self.max_minutes,
            "must be > 0",
        )
        _check(0 < self.lr < math.inf, "train.lr", self.lr, "must be positive and finite")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.cycle_mult >= 1, "train.cycle_mult", self.cycle_mult, "must be >= 1")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(0 < self.decay <= 1, "train.decay", self.decay, "must be in (0, 1]")
        _check(self.clip_norm > 0, "train.clip_norm", self.clip_norm, "must be positive")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for key in ("beta1", "beta2"):
            _check(0 <= getattr(self, key) < 1, f"train.{key}", getattr(self, key), "must be in [0, 1)")
        _check(self.eps > 0, "train.eps", self.eps, "must be positive")
        _check(self.min_delta >= 0, "train.min_delta", self.min_delta, "must be >= 0")
        schedules = ("cosine", "exponential", "constant")
        _check(
            self.schedule in schedules,
            "train.schedule",
            self.schedule,
            f"must be one of {', '.join(schedules)}",
        )
        monitors = ("val_loss", "train_loss")
        _check(
            self.monitor in monitors, "train.monitor", self.monitor, f"must be one of {', '.join(monitors)}"
        )


@dataclass
class TokenizerSettings:
    files: dict = field(default_factory=dict)
    min_freq: int = 2
    max_size: int = 20000
    hmm: bool = False

    def validate(self):
        _check(
            set(self.files) <= set(CORPUS_KINDS),
            "tokenizer.files",
            sorted(self.files),
            "keys must be pretrain/sft",
        )
        _check(self.min_freq >= 1, "tokenizer.min_freq", self.min_freq, "must be at least 1")
        _check(self.max_size >= 16, "tokenizer.max_size", self.max_size, "must be at least 16")


@dataclass
class CheckpointSettings:
    strategy: str = "best_and_last"
    keep_best: int = 3
    every: int = 10
    keep: int = 5

    def validate(self):
        strategies = ("best_and_last", "periodic", "none")
        _check(
            self.strategy in strategies,
            "checkpoint.strategy",
            self.strategy,
            f"must be one of {', '.join(strategies)}",
        )
        for key in ("keep_best", "every", "keep"):
            _check(getattr(self, key) >= 1, f"checkpoint.{key}", getattr(self, key), "must be at least 1")


@dataclass
class DPOSettings:
    beta: float = 0.1

    def validate(self):
        _check(0 < self.beta < math.inf, "dpo.beta", self.beta, "must be positive and finite")


LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's projections


@dataclass
class LoRASettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj"])

    def validate(self):
        _check(self.r >= 1, "lora.r", self.r, "must be at least 1")
        _check(0 < self.alpha < math.inf, "lora.alpha", self.alpha, "must be positive and finite")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(
            len(self.targets) > 0
            and set(self.targets) <= set(LORA_TARGETS)
            and len(set(self.targets)) == len(self.targets),
            "lora.targets",
            self.targets,
            f"must name distinct projections among {', '.join(LORA_TARGETS)}",
        )


@dataclass
class MonitorSettings:
    progress: bool = True
    sample_prompt: str = "山脉是如何形成的？"
    sample_tokens: int = 40
    attention_every: "int | None" = 100  # steps between attention heatmaps of sample_prompt (TensorBoard)
    diagnostics: bool = False  # gradient, update, activation and attention statistics (rgpt.diagnostics)
    diagnostics_every: int = 100
    gradcheck_every: "int | None" = None  # steps between live float64 gradient checks (rgpt.gradcheck)

    def validate(self):
        for key in ("attention_every", "gradcheck_every"):
            v = getattr(self, key)
            _check(v is None or v >= 1, f"monitor.{key}", v, "must be >= 1 or null")
        _check(
            self.diagnostics_every >= 1,
            "monitor.diagnostics_every",
            self.diagnostics_every,
            "must be at least 1",
        )


@dataclass
class RunConfig:
    stage: str
    model: GPTConfig  # the architecture: its one definition is rgpt/model.py
    train: TrainSettings
    data: DataConfig  # what the stage reads: its one definition is rgpt/data/dataset.py
    tokenizer: TokenizerSettings
    checkpoint: CheckpointSettings
    monitor: MonitorSettings
    dpo: DPOSettings = field(default_factory=DPOSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    device: str = "auto"
    precision: str = "auto"
    seed: int = 1337
    run_name: str = "default"
    out_dir: str = "outputs"
    resume: bool = False
    resume_from: "str | None" = None
    threads: "int | None" = None
    allocator: str = "keep"
    dist_timeout_s: float = 600.0
    job: "str | None" = None  # set by the entry point under a Hydra sweep (-m): the job's own subdirectory

    @property
    def run_dir(self) -> Path:
        """${out_dir}/${stage}/${run_name}, and under a sweep the job's subdirectory of it."""
        root = Path(self.out_dir) / self.stage / self.run_name
        return root / self.job if self.job else root

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d.pop("hydra", None)
        groups = {
            "model": GPTConfig,
            "train": TrainSettings,
            "data": DataConfig,
            "tokenizer": TokenizerSettings,
            "checkpoint": CheckpointSettings,
            "monitor": MonitorSettings,
            "dpo": DPOSettings,
            "lora": LoRASettings,
        }
        parts = {}
        for key, sub in groups.items():
            value = d.pop(key, None) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a group of settings, got {value!r}")
            if key == "data":  # the stage decides what kind of text the data is
                _check("kind" not in value, "data.kind", value.get("kind"), "is set by stage=")
                value = {**value, "kind": DATA_KIND.get(d.get("stage"), d.get("stage"))}
            parts[key] = _pick(sub, value, f"{key}.")
        _check(d.get("stage") in STAGES, "stage", d.get("stage"), f"must be one of {', '.join(STAGES)}")
        cfg = _pick(cls, {**d, **parts}, "")
        _check(
            cfg.model.vocab_size == 0, "model.vocab_size", cfg.model.vocab_size, "is set from the tokenizer"
        )
        _check(
            not (cfg.train.freeze_attn and cfg.stage == "lora"),
            "train.freeze_attn",
            cfg.train.freeze_attn,
            "lora already freezes the whole model (its adapters are what trains)",
        )
        try:  # the model's and the data's own checks, in their own modules
            cfg.model.validate(allow_no_vocab=True)
            cfg.data.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for part in (cfg.train, cfg.tokenizer, cfg.checkpoint, cfg.monitor):
            part.validate()
        _check(
            cfg.precision in ("auto", "fp32", "bf16"),
            "precision",
            cfg.precision,
            "must be auto, fp32 or bf16",
        )
        _check(cfg.threads is None or cfg.threads >= 1, "threads", cfg.threads, "must be >= 1 or null")
        _check(
            cfg.allocator in ALLOCATORS, "allocator", cfg.allocator, f"must be one of {', '.join(ALLOCATORS)}"
        )
        _check(cfg.dist_timeout_s > 0, "dist_timeout_s", cfg.dist_timeout_s, "must be positive")
        _check(
            bool(str(cfg.run_name).strip()) and "/" not in str(cfg.run_name),
            "run_name",
            cfg.run_name,
            "must be a plain name",
        )
        return cfg
