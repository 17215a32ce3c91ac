"""rgpt's jieba word tokenizer for transformers: `python -m rgpt.hf export` copies this file into the exported
directory, where `AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)` loads it (tokenizer_config.json's
auto_map names it). It depends on transformers and jieba only, not on rgpt, and gives rgpt's ids exactly:
the text is stripped and its whitespace runs collapsed to one space, jieba cuts it (precise mode, the saved
idioms registered), a piece in the vocabulary is one id, any other piece falls back to its characters, and a
character never seen becomes <unk> (rgpt/data/tokenizer.py, whose vocab.json this reads).

rgpt never imports this module; tests/runtime/test_hf.py checks it against rgpt's tokenizer.
"""

import json
import logging

import jieba
from transformers import PreTrainedTokenizer

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>")  # ids 0..5, as in rgpt
IDIOM_FREQ = 100_000  # rgpt's: an idiom outweighs any two words it could otherwise be cut into


class RgptTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "vocab.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if vocab.get("format") != "rgpt-vocab/1":
            raise ValueError(f"{vocab_file}: not an rgpt vocabulary (format {vocab.get('format')!r})")
        self.vocab_file = vocab_file
        self.tokens = vocab["tokens"]
        self.hmm = vocab["settings"]["hmm"]
        self.user_words = vocab["user_words"]
        # specials are kept out of the piece lookup: text that spells "<eos>" falls back to its characters
        self.ids = {t: i for i, t in enumerate(self.tokens) if i >= len(SPECIALS)}
        self.seg = None  # the jieba instance, made on first use (its dictionary takes ~0.5 s to load)
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("bos_token", "<bos>")
        kwargs.setdefault("eos_token", "<eos>")
        kwargs.setdefault("extra_special_tokens", ["<user>", "<assistant>"])
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.tokens)

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}

    def _segmenter(self):
        if self.seg is None:
            jieba.setLogLevel(logging.WARNING)
            self.seg = jieba.Tokenizer()
            self.seg.initialize()
            for word in self.user_words:
                self.seg.add_word(word, freq=IDIOM_FREQ)
        return self.seg

    def _tokenize(self, text, **kwargs):
        pieces = []
        for piece in self._segmenter().cut(" ".join(text.split()), HMM=self.hmm):
            pieces.extend([piece] if piece in self.ids else list(piece))
        return pieces

    def _convert_token_to_id(self, token):
        return self.ids.get(token, SPECIALS.index(token) if token in SPECIALS else 1)  # 1: <unk>

    def _convert_id_to_token(self, index):
        return self.tokens[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)  # pieces join without separators; the space is itself a token

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])  # the chat template places <bos> and the role tokens

    def save_vocabulary(self, save_directory, filename_prefix=None):
        import os
        import shutil

        name = (filename_prefix + "-" if filename_prefix else "") + "vocab.json"
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
