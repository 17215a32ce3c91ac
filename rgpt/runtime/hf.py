"""rgpt checkpoints as transformers Llama directories: the architecture check, the name and layout map of the
weights, and the files that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)` read.

rgpt's Llama is model=llama (rgpt/conf/model/llama.yaml): RoPE, RMSNorm, SwiGLU, no biases, an untied head,
any n_kv_head. The weights map one to one, with two fused projections split:
    h.i.attn.c_attn.weight  [q (H*D) | k (Hkv*D) | v (Hkv*D)] rows  -> self_attn.q_proj / k_proj / v_proj
    h.i.mlp.c_fc.weight     [gate | up] rows                       -> mlp.gate_proj / up_proj
Both rotate the pairs (x_i, x_{i+D/2}) of each head by pos * 10000^(-2i/D) ("rotate half"), so q and k need
no permutation (tests/runtime/test_hf.py proves it by comparing the two models' logits).
transformers itself is not needed here: the files are plain JSON and safetensors.
"""

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from rgpt.data.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, USER_ID
from rgpt.nn.layers import swiglu_hidden
from rgpt.nn.model import GPTConfig
from rgpt.runtime import checkpoint as ckpt

# what a checkpoint's architecture must be to have a transformers (Llama) equivalent
LLAMA = {"pos": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False, "tie_embeddings": False}
WHY = {
    "pos": "Llama has rotary positions only",
    "norm": "Llama normalises with RMSNorm",
    "activation": "Llama's feed-forward is SwiGLU",
    "bias": "Llama's projections have no biases",
    "tie_embeddings": "rgpt's tied head divides by sqrt(n_embd) and Llama's does not",
}
RMS_EPS = 1e-5  # rgpt.nn.layers.RMSNorm's
ROPE_THETA = 10000.0  # rgpt.nn.attention.Rotary's base
TOKENIZER_FILE = Path(__file__).with_name("tokenization_rgpt.py")
# rgpt's prompt: <bos>, then <user> q <assistant> a <eos> per exchange, then <user> q <assistant> (Tokenizer.encode_prompt)
CHAT_TEMPLATE = (
    "<bos>{% for m in messages %}"
    "{% if m['role'] == 'user' %}<user>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<assistant>{{ m['content'] }}<eos>"
    "{% else %}{{ raise_exception('rgpt knows the roles user and assistant only, not ' + m['role']) }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
END_OF_TURN = [EOS_ID, USER_ID, ASSISTANT_ID, BOS_ID, PAD_ID]  # rgpt.inference.generate.END_OF_TURN


class ConversionError(ckpt.CheckpointError):
    """A checkpoint or directory that cannot be converted; the message is one line."""


def _value(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


def check_exportable(cfg: GPTConfig, where) -> None:
    wrong = [k for k, v in LLAMA.items() if getattr(cfg, k) != v]
    if wrong:
        have = ", ".join(f"model.{k}={_value(getattr(cfg, k))} ({WHY[k]})" for k in wrong)
        need = " ".join(f"model.{k}={_value(LLAMA[k])}" for k in wrong)
        raise ConversionError(
            f"{where}: no transformers equivalent for {have}; exportable with {need} (model=llama)"
        )


def llama_config(cfg: GPTConfig) -> dict:
    """config.json of the LlamaForCausalLM that computes what GPT(cfg) computes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": swiglu_hidden(cfg.n_hidden),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.n_embd // cfg.n_head,
        "max_position_embeddings": cfg.block_size,
        "hidden_act": "silu",
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def to_llama(params: dict, cfg: GPTConfig) -> dict:
    """rgpt's weights (name -> tensor) under transformers' Llama names and layout."""
    C, D, Hkv = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.kv_heads
    out = {"model.embed_tokens.weight": params["wte.weight"], "model.norm.weight": params["ln_f.weight"]}
    out["lm_head.weight"] = params["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, m = f"h.{i}.", f"model.layers.{i}."
        q, k, v = params[h + "attn.c_attn.weight"].split((C, Hkv * D, Hkv * D))  # (H*D, C), (Hkv*D, C) x2
        gate, up = params[h + "mlp.c_fc.weight"].chunk(2)  # (F, C) each
        out |= {
            m + "input_layernorm.weight": params[h + "ln_1.weight"],
            m + "self_attn.q_proj.weight": q,
            m + "self_attn.k_proj.weight": k,
            m + "self_attn.v_proj.weight": v,
            m + "self_attn.o_proj.weight": params[h + "attn.c_proj.weight"],
            m + "post_attention_layernorm.weight": params[h + "ln_2.weight"],
            m + "mlp.gate_proj.weight": gate,
            m + "mlp.up_proj.weight": up,
            m + "mlp.down_proj.weight": params[h + "mlp.c_proj.weight"],
        }
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def generation_config(decode_defaults) -> dict:
    """rgpt's decoding defaults (rgpt.inference.generate.DecodeConfig) as generation_config.json: greedy,
    every end-of-turn token as an eos, and no end of turn before min_new_tokens."""
    return {
        "bos_token_id": BOS_ID,
        "eos_token_id": END_OF_TURN,
        "pad_token_id": PAD_ID,
        "do_sample": False,
        "max_new_tokens": decode_defaults.max_new_tokens,
        "min_new_tokens": decode_defaults.min_new_tokens,
        "repetition_penalty": decode_defaults.repetition_penalty,
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "RgptTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_rgpt.RgptTokenizer", None]},
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_special_tokens": ["<user>", "<assistant>"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": None,
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def export(checkpoint, out, decode_defaults) -> Path:
    """Write checkpoint `checkpoint` as a transformers Llama directory `out` (atomically: a hidden sibling
    directory renamed into place); return `out`. ConversionError, and nothing written, if it cannot be."""
    src, out = Path(checkpoint), Path(out)
    meta = ckpt.read_state(src)
    if ckpt.ADAPTER in meta["files"]:
        raise ConversionError(
            f"{src} holds LoRA adapters only: merge them first (python -m rgpt.lora merge {src})"
        )
    cfg = ckpt.model_config(meta, src)
    check_exportable(cfg, src)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty; choose a new directory")
    tensors = to_llama(ckpt.load_tensors(src), cfg)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", llama_config(cfg))
        _write_json(tmp / "generation_config.json", generation_config(decode_defaults))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config())
        _write_json(
            tmp / "special_tokens_map.json",
            {k: tokenizer_config()[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        )
        shutil.copyfile(src / ckpt.VOCAB, tmp / "vocab.json")
        shutil.copyfile(TOKENIZER_FILE, tmp / "tokenization_rgpt.py")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
