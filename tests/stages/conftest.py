"""What the stage CLI tests start from, once per test module: a tiny corpus, a pretrained run, and a
pretrained-then-tuned run (tests copy the out_dir before training in it)."""

import pytest

from tests.training.test_train_cli import cli_args, run, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pretrain(corpus, tmp_path_factory):
    """pretrain (1 epoch): the model lora adapts."""
    out = tmp_path_factory.mktemp("pretrain")
    run(cli_args(corpus, out, "train.max_epochs=1"))
    return out


@pytest.fixture(scope="module")
def sft(corpus, tmp_path_factory):
    """pretrain (1 epoch) then sft (2 epochs): the model dpo and grpo start from."""
    out = tmp_path_factory.mktemp("sft")
    run(cli_args(corpus, out, "train.max_epochs=1"))
    run(cli_args(corpus, out, "resume=true", "train.max_epochs=2", stage="sft"))
    return out
