"""The second kind of rgpt tokenizer: a transformers tokenizer.json (run by the `tokenizers` library), in rgpt's
id space. It comes with a model imported by `python -m rgpt.hf import`.

rgpt's six SPECIALS are ids 0..5 everywhere (templates, decoding, the loss's padding). A tokenizer.json has
its own ids, so six of its tokens are named as rgpt's roles (``roles``: rgpt special -> token content) and
the ids are permuted: rgpt id r is the tokenizer's id ``hf_ids[r]``, the roles' ids first, then every other
id in order. The importer permutes the embedding and output rows the same way, and the exporter back.
"""

import json

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from rgpt.data.tokenizer import SPECIALS, UNK_ID, TokenizerBase

FORMAT = "rgpt-tokenizers/1"


class JsonTokenizer(TokenizerBase):
    """tokenizer.json's pieces with the six roles moved to ids 0..5; `size` rows (a model's vocabulary may
    be larger than its tokenizer's: such ids never come out of encode)."""

    def __init__(self, tokenizer_json: str, roles: dict[str, str], size: int):
        self.tokenizer_json = tokenizer_json
        self.roles, self.size = dict(roles), size
        self._tok = HFTokenizer.from_str(tokenizer_json)
        vocab = self._tok.get_vocab(with_added_tokens=True)  # content -> tokenizer id
        missing = [s for s in SPECIALS if self.roles.get(s) not in vocab]
        if missing:
            raise ValueError(f"tokenizer.json has no token for rgpt's {', '.join(missing)}")
        role_ids = [vocab[self.roles[s]] for s in SPECIALS]
        if len(set(role_ids)) != len(SPECIALS):
            raise ValueError(f"rgpt's six special roles need six different tokens, got {self.roles}")
        if max(vocab.values()) >= size:
            raise ValueError(f"tokenizer.json has ids up to {max(vocab.values())}, the model {size} rows")
        taken = set(role_ids)
        self.hf_ids = np.array(role_ids + [i for i in range(size) if i not in taken], dtype=np.int64)
        self.rgpt_ids = np.empty(size, dtype=np.int64)
        self.rgpt_ids[self.hf_ids] = np.arange(size)  # the inverse permutation
        self.tokens = [self._tok.id_to_token(int(i)) or "" for i in self.hf_ids]

    def encode(self, text: str) -> list[int]:
        """Ids of the text, with no <bos>/<eos> added (text spelling a special token becomes it, as in transformers)."""
        return self.rgpt_ids[self._tok.encode(text, add_special_tokens=False).ids].tolist()

    def decode(self, ids, skip_special: bool = True) -> str:
        """As Tokenizer.decode: with skip_special, the roles other than <unk> are dropped."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i in ids:
            if not 0 <= i < self.size:
                raise ValueError(f"token id {i} outside the vocabulary of {self.size}")
        if skip_special:
            ids = [i for i in ids if i >= len(SPECIALS) or i == UNK_ID]
        return self._tok.decode(self.hf_ids[ids].tolist(), skip_special_tokens=False)

    def decode_more(self, ids: list[int], shown: str) -> str:
        """A tokenizer.json's pieces need their neighbours (a space that a decoder adds or drops, the bytes
        of one character), so the whole is decoded; a half character at its end waits for its other bytes."""
        text = self.decode(ids)
        return "" if text.endswith("\ufffd") or not text.startswith(shown) else text[len(shown) :]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "roles": self.roles,
            "size": self.size,
            "tokenizer": json.loads(self.tokenizer_json),
        }

    @classmethod
    def from_dict(cls, d: dict, where="vocabulary") -> "JsonTokenizer":
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: not an rgpt tokenizer.json vocabulary (format {d.get('format')!r})")
        return cls(json.dumps(d["tokenizer"], ensure_ascii=False), d["roles"], d["size"])
