"""A saved vocabulary (vocab.json) of either kind of tokenizer, read back by its format: jieba's
(rgpt.data.tokenizer.Tokenizer) or a transformers tokenizer.json's (rgpt.data.json_tokenizer.JsonTokenizer)."""

import json
from pathlib import Path

from rgpt.data.json_tokenizer import FORMAT, JsonTokenizer
from rgpt.data.tokenizer import Tokenizer, TokenizerBase


def tokenizer_from_dict(d: dict, where="vocabulary") -> TokenizerBase:
    """The tokenizer of either kind that a to_dict() describes, by its format."""
    if d.get("format") == FORMAT:
        return JsonTokenizer.from_dict(d, where)
    return Tokenizer.from_dict(d, where)


def load_tokenizer(path) -> TokenizerBase:
    """A saved vocab.json (``path``, or the one inside it), of either kind."""
    path = Path(path)
    path = path / "vocab.json" if path.is_dir() else path
    return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")), path)
