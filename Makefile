# Two commands do all set-up on a fresh machine:
#   make train   create .venv, install, then pretrain -> SFT -> a few sample conversations
#   make test    create .venv, install, then run the test suite (what CI runs)
#   make mix     fetch real Chinese text, pretrain on it (~1 h on 2 cores), tune, then benchmark (README)
# torch: TORCH is installed only when the venv has no torch yet. The default pin is the CPU build that
# this project's machines serve from local disk. Elsewhere, for a CPU-only wheel use
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# and to keep a CUDA torch you already have, let the venv see it:
#   make test VENV_ARGS=--system-site-packages
PY ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train mix test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(BIN)/python -m rgpt.train stage=pretrain
	$(BIN)/python -m rgpt.train stage=sft resume=true
	printf '你好\n山脉是如何形成的？\n降雨的原因是什么？\n一年有几个季节？\n' | $(BIN)/python -m rgpt.chat

mix: setup
	$(BIN)/python -m rgpt.data.fetch mix
	$(BIN)/python -m rgpt.data.fetch news
	$(BIN)/python -m rgpt.train data=mix
	$(BIN)/python -m rgpt.train data=mix stage=sft resume=true
	$(BIN)/python scripts/benchmark.py outputs/sft/mix

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python scripts/bench.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
