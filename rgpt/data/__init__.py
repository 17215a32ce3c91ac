"""Data pipeline: corpus files → token ids cached on disk → batches. See corpus, dataset and batches.

Names are imported on first use, so that ``rgpt.data.fetch`` and the tokenizing workers of
``rgpt.data.encode`` start without importing torch.
"""

import importlib
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"  # the built-in corpus, inside the package

_HOME = {
    "IGNORE": "batches",
    "Batch": "batches",
    "Batcher": "batches",
    "collate": "batches",
    "CorpusError": "corpus",
    "corpus_texts": "corpus",
    "expand_paths": "corpus",
    "read_dialogues": "corpus",
    "read_pretrain": "corpus",
    "DataConfig": "dataset",
    "TokenSet": "dataset",
    "build_tokenizer": "dataset",
    "prepare": "dataset",
    "tokenize_throughput": "dataset",
}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'rgpt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rgpt.data.{_HOME[name]}"), name)
