"""The real conf/ composed by Hydra for both stages and the quick preset, validated into a RunConfig."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import rgpt.train  # noqa: F401  (importing the entry point registers the ${corpus:...} resolver)
from rgpt.cli import CONF_DIR
from rgpt.data import CORPUS_DIR
from rgpt.nn.model import GPTConfig
from rgpt.settings import ConfigError
from rgpt.stages import STAGES
from rgpt.train import load_run_config
from rgpt.training.settings import RunConfig


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_config(*overrides) -> RunConfig:
    return load_run_config(composed(*overrides))


REQUIRED_TOP = ("stage", "model", "device", "seed", "run_name", "out_dir", "resume", "resume_from")
REQUIRED_TRAIN = ("max_epochs", "max_steps", "batch_size", "grad_accum", "lr", "patience", "freeze_attn")


# sft: see rgpt/conf/stage/sft.yaml; patience 3 and the sft micro-batches: the 30-minute pipeline on AVX2
@pytest.mark.parametrize("stage, lr, grad_accum", [("pretrain", 5e-4, 4), ("sft", 1e-3, 2)])
def test_each_stage_composes_into_a_valid_run_config(stage, lr, grad_accum):
    cfg = composed(f"stage={stage}")
    for key in REQUIRED_TOP:
        assert key in cfg, f"missing top-level key {key}"
    for key in REQUIRED_TRAIN:
        assert key in cfg.train, f"missing train.{key}"
    assert "files" in cfg.data

    run = load_run_config(cfg)
    assert isinstance(run, RunConfig)
    assert run.stage == stage
    assert run.train.lr == pytest.approx(lr), f"{stage}: lr {run.train.lr}"
    assert run.train.grad_accum == grad_accum
    assert run.train.patience == 3
    assert run.train.freeze_attn is False
    assert run.train.max_steps is None
    assert run.resume is False and run.resume_from is None
    assert run.model == GPTConfig(), "model=base is GPTConfig's defaults"
    # ${corpus:<stage>} resolved to the built-in corpus directory of this stage
    assert [Path(f) for f in run.data.files] == [CORPUS_DIR / stage]
    assert Path(run.data.files[0]).is_dir()
    assert {k: [Path(f) for f in v] for k, v in run.tokenizer.files.items()} == {
        "pretrain": [CORPUS_DIR / "pretrain"],
        "sft": [CORPUS_DIR / "sft"],
    }
    assert run.run_dir == Path("outputs") / stage / "default"
    # library code sees plain values only: no omegaconf containers anywhere
    for part in (run, run.model, run.train, run.data, run.tokenizer, run.checkpoint, run.monitor):
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            assert type(value).__module__.split(".")[0] != "omegaconf", f"{f.name} is {type(value)}"


def test_quick_preset_is_a_small_pretraining_run_without_checkpoints():
    run = run_config("+preset=quick")
    assert run.stage == "pretrain"
    assert run.model.n_embd == 256 and run.model.n_layer == 2
    assert run.checkpoint.strategy == "none"
    assert run.run_name == "quick"
    assert run.train.max_epochs == 3


def test_command_line_values_are_coerced_to_the_declared_types():
    run = run_config("model=tiny", "train.max_steps=12", "train.lr=0.001", "train.freeze_attn=true", "seed=7")
    assert run.model.n_embd == 32
    assert run.train.max_steps == 12 and isinstance(run.train.max_steps, int)
    assert run.train.lr == 1e-3 and isinstance(run.train.lr, float)
    assert run.train.freeze_attn is True and run.seed == 7


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.freeze_attn=maybe", "train.freeze_attn"),
        ("seed=abc", "seed"),
        ("train.batch_size=null", "train.batch_size"),
        ("train.batch_size=true", "train.batch_size"),
        ("train.max_steps=2.5", "train.max_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.schedule=linear", "train.schedule"),
        ("+train.bogus=1", "train.bogus"),
        ("+bogus=1", "bogus"),
        ("allocator=jemalloc", "allocator"),
        ("monitor.gradcheck_every=0", "monitor.gradcheck_every"),
        ("monitor.diagnostics_every=0", "monitor.diagnostics_every"),
        ("monitor.attention_every=-5", "monitor.attention_every"),
        ("monitor.diagnostics=sometimes", "monitor.diagnostics"),
        ("model.pos=alibi", "model.pos"),
        ("model.norm=batchnorm", "model.norm"),
        ("model.activation=tanh", "model.activation"),
        ("model.attn=sparse", "model.attn"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings"),
        ("model.n_head=5", "model.n_head"),
        ("model.n_kv_head=3", "model.n_kv_head"),  # 8 query heads cannot share 3 key/value heads evenly
        ("model.n_kv_head=-1", "model.n_kv_head"),
        ("model.bias=sometimes", "model.bias"),
        ("+model.vocab_size=100", "model.vocab_size"),
        ("+model.name=base", "model.name"),
        ("model=tiny model.pos=rope model.n_head=32", "model.pos"),  # head size 1: no pairs to rotate
        ("stage=pretrain", None),  # control: valid
    ],
)
def test_bad_values_are_one_line_config_errors_naming_the_key(override, key):
    if key is None:
        run_config(override)
        return
    with pytest.raises(ConfigError) as e:
        run_config(*override.split())
    message = str(e.value)
    assert key in message, f"{override}: message does not name {key}: {message}"
    assert "\n" not in message


MODEL_YAMLS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_model_yamls_only_override_the_one_schema(name):
    """Each rgpt/conf/model preset composes into a valid GPTConfig and names only what differs from its defaults."""
    run = run_config(f"model={name}")
    assert isinstance(run.model, GPTConfig)
    raw = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text(encoding="utf-8"))
    raw = raw or {}  # base.yaml: GPTConfig's defaults, nothing to set
    same = sorted(k for k, v in raw.items() if getattr(GPTConfig(), k) == v)
    assert not same, f"rgpt/conf/model/{name}.yaml repeats GPTConfig's defaults for {same}"


def test_every_architecture_option_is_settable_from_the_command_line():
    run = run_config(
        "model.pos=rope",
        "model.norm=rmsnorm",
        "model.activation=swiglu",
        "model.tie_embeddings=true",
        "model.attn=flash",
        "model.n_kv_head=2",
        "model.bias=false",
    )
    assert (run.model.pos, run.model.norm, run.model.activation) == ("rope", "rmsnorm", "swiglu")
    assert run.model.tie_embeddings is True and run.model.attn == "flash"
    assert run.model.n_kv_head == 2 and run.model.bias is False


def test_unknown_stage_in_a_dict_is_refused():
    raw = {"stage": "finetune", "model": {}, "train": {}, "data": {"files": ["x"]}}
    with pytest.raises(ConfigError, match="stage"):
        RunConfig.from_dict(raw, STAGES)


def test_data_pack_is_for_pretraining_only():
    assert run_config("data.pack=true").data.pack is True
    assert run_config("stage=sft").data.pack is False
    with pytest.raises(ConfigError) as e:
        run_config("stage=sft", "data.pack=true")
    assert "data.pack" in str(e.value) and "\n" not in str(e.value), str(e.value)
