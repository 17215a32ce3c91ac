"""Data pipeline: corpus files → token ids cached on disk → batches. See corpus, dataset and batches."""

from rgpt.data.batches import IGNORE, Batch, Batcher, collate
from rgpt.data.corpus import CorpusError, corpus_texts, expand_paths, read_dialogues, read_pretrain
from rgpt.data.dataset import DataConfig, TokenSet, build_tokenizer, prepare, tokenize_throughput

__all__ = [
    "IGNORE",
    "Batch",
    "Batcher",
    "collate",
    "CorpusError",
    "corpus_texts",
    "expand_paths",
    "read_dialogues",
    "read_pretrain",
    "DataConfig",
    "TokenSet",
    "build_tokenizer",
    "prepare",
    "tokenize_throughput",
]
