"""rgpt checkpoints as transformers Llama directories and back: the architecture checks, the name and layout
map of the weights, and the files that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)` read.

rgpt's Llama is model=llama (rgpt/conf/model/llama.yaml): RoPE, RMSNorm, SwiGLU, no biases, an untied head,
any n_kv_head. The weights map one to one, with two fused projections split:
    h.i.attn.c_attn.weight  [q (H*D) | k (Hkv*D) | v (Hkv*D)] rows  -> self_attn.q_proj / k_proj / v_proj
    h.i.mlp.c_fc.weight     [gate | up] rows                       -> mlp.gate_proj / up_proj
Both rotate the pairs (x_i, x_{i+D/2}) of each head by pos * 10000^(-2i/D) ("rotate half"), so q and k need
no permutation (tests/runtime/test_hf.py proves it by comparing the two models' logits).
transformers itself is not needed here: the files are plain JSON and safetensors.

A jieba vocabulary travels as rgpt's own tokenizer class (tokenization_rgpt.py, loaded with
trust_remote_code=True); an imported tokenizer.json travels back as itself. An imported model's rows are in
rgpt's id space (rgpt.data.json_tokenizer: six named tokens moved to ids 0..5), so wte and lm_head are
permuted on the way in and back on the way out.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rgpt.data.json_tokenizer import JsonTokenizer
from rgpt.data.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, SPECIALS, USER_ID
from rgpt.data.vocab import load_tokenizer
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


def chat_template(roles: dict) -> str:
    """rgpt's prompt as Jinja, the specials spelled by `roles` (rgpt special -> token text): <bos>, then
    <user> q <assistant> a <eos> per exchange, then <user> q <assistant> (TokenizerBase.encode_prompt)."""
    bos, eos, user, assistant = (roles[s] for s in ("<bos>", "<eos>", "<user>", "<assistant>"))
    return (
        f"{bos}{{% for m in messages %}}"
        f"{{% if m['role'] == 'user' %}}{user}{{{{ m['content'] }}}}"
        f"{{% elif m['role'] == 'assistant' %}}{assistant}{{{{ m['content'] }}}}{eos}"
        "{% else %}{{ raise_exception('rgpt knows the roles user and assistant only, not ' + m['role']) }}"
        f"{{% endif %}}{{% endfor %}}{{% if add_generation_prompt %}}{assistant}{{% endif %}}"
    )


END_OF_TURN = [EOS_ID, USER_ID, ASSISTANT_ID, BOS_ID, PAD_ID]  # rgpt.inference.generate.END_OF_TURN
# the tokens that play rgpt's user and assistant roles in a tokenizer.json, unless named (user= assistant=)
ROLE_DEFAULTS = {"<user>": "<|user|>", "<assistant>": "<|assistant|>"}


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


def llama_config(cfg: GPTConfig, ids: dict) -> dict:
    """config.json of the LlamaForCausalLM that computes what GPT(cfg) computes; ids: special -> its id there."""
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
        "pad_token_id": ids["<pad>"],
        "bos_token_id": ids["<bos>"],
        "eos_token_id": ids["<eos>"],
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


def generation_config(decode_defaults, ids: dict) -> dict:
    """rgpt's decoding defaults (rgpt.inference.generate.DecodeConfig) as generation_config.json: greedy,
    every end-of-turn token as an eos, and no end of turn before min_new_tokens."""
    return {
        "bos_token_id": ids["<bos>"],
        "eos_token_id": [ids[SPECIALS[i]] for i in END_OF_TURN],
        "pad_token_id": ids["<pad>"],
        "do_sample": False,
        "max_new_tokens": decode_defaults.max_new_tokens,
        "min_new_tokens": decode_defaults.min_new_tokens,
        "repetition_penalty": decode_defaults.repetition_penalty,
    }


def tokenizer_config(roles: dict, jieba: bool) -> dict:
    """tokenizer_config.json: rgpt's class by auto_map for a jieba vocabulary, else transformers' own."""
    kind = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if jieba:
        kind = {
            "tokenizer_class": "RgptTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_rgpt.RgptTokenizer", None]},
        }
    return {
        **kind,
        "bos_token": roles["<bos>"],
        "eos_token": roles["<eos>"],
        "pad_token": roles["<pad>"],
        "unk_token": roles["<unk>"],
        "extra_special_tokens": [roles["<user>"], roles["<assistant>"]],
        "chat_template": chat_template(roles),
        "clean_up_tokenization_spaces": False,
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
    tok = load_tokenizer(src / ckpt.VOCAB)
    tensors = to_llama(ckpt.load_tensors(src), cfg)
    jieba = not isinstance(tok, JsonTokenizer)
    if jieba:
        roles, ids = {s: s for s in SPECIALS}, {s: i for i, s in enumerate(SPECIALS)}
    else:  # back to the tokenizer's own ids: row hf_ids[r] of the output is row r of rgpt's
        roles, ids = tok.roles, {s: int(tok.hf_ids[i]) for i, s in enumerate(SPECIALS)}
        index = torch.from_numpy(tok.hf_ids)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.empty_like(tensors[name]).index_copy_(0, index, tensors[name])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", llama_config(cfg, ids))
        _write_json(tmp / "generation_config.json", generation_config(decode_defaults, ids))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(roles, jieba))
        if jieba:
            shutil.copyfile(src / ckpt.VOCAB, tmp / "vocab.json")
            shutil.copyfile(TOKENIZER_FILE, tmp / "tokenization_rgpt.py")
        else:
            (tmp / "tokenizer.json").write_text(tok.tokenizer_json, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- transformers -> rgpt ------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} not found: not a transformers model directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not JSON ({e})") from None


def rgpt_config(hf: dict, where, block_size: int | None = None) -> GPTConfig:
    """The GPTConfig of a Llama config.json, or ConversionError naming what rgpt cannot compute."""
    if hf.get("model_type") != "llama":
        raise ConversionError(f"{where}: model_type {hf.get('model_type')!r}; rgpt imports llama only")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", ROPE_THETA))
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    wrong = [
        (
            hf.get("hidden_act", "silu") != "silu",
            f"hidden_act={hf.get('hidden_act')} (rgpt's SwiGLU uses silu)",
        ),
        (hf.get("attention_bias") or hf.get("mlp_bias"), "biases (rgpt's model=llama has none)"),
        (rope.get("rope_type", rope.get("type", "default")) != "default", f"rope scaling {rope}"),
        (theta != ROPE_THETA, f"rope_theta={theta} (rgpt rotates with base {ROPE_THETA:g})"),
        (
            hf.get("rms_norm_eps", RMS_EPS) != RMS_EPS,
            f"rms_norm_eps={hf.get('rms_norm_eps')} (rgpt's is {RMS_EPS:g})",
        ),
        (
            hf.get("head_dim", C // H) != C // H,
            f"head_dim={hf.get('head_dim')} != hidden_size/heads={C // H}",
        ),
    ]
    for bad, what in wrong:
        if bad:
            raise ConversionError(f"{where}: no rgpt equivalent for {what}")
    n_hidden = (3 * hf["intermediate_size"] + 1) // 2  # swiglu_hidden(n_hidden) == intermediate_size
    cfg = GPTConfig(
        vocab_size=hf["vocab_size"],
        n_embd=C,
        n_head=H,
        n_kv_head=hf.get("num_key_value_heads") or H,
        n_layer=hf["num_hidden_layers"],
        n_hidden=n_hidden,
        block_size=block_size or min(hf.get("max_position_embeddings", 2048), MAX_BLOCK),
        **LLAMA,
    )
    assert swiglu_hidden(n_hidden) == hf["intermediate_size"]
    try:
        return cfg.validate()
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


MAX_BLOCK = 4096  # an imported block_size's default ceiling: rgpt keeps a (T, T) causal mask per layer


def from_llama(tensors: dict, cfg: GPTConfig, hf_ids) -> dict:
    """transformers' Llama weights -> rgpt's names, with the rows of wte and lm_head in rgpt's id order
    (row r is the tokenizer's id hf_ids[r]); a tied head becomes an untied copy (see LLAMA)."""
    index = torch.as_tensor(hf_ids)
    embed = tensors["model.embed_tokens.weight"]
    out = {
        "wte.weight": embed.index_select(0, index),
        "lm_head.weight": tensors.get("lm_head.weight", embed).index_select(0, index),
        "ln_f.weight": tensors["model.norm.weight"],
    }
    for i in range(cfg.n_layer):
        h, m = f"h.{i}.", f"model.layers.{i}."
        qkv = [tensors[f"{m}self_attn.{p}_proj.weight"] for p in "qkv"]
        out |= {
            h + "ln_1.weight": tensors[m + "input_layernorm.weight"],
            h + "attn.c_attn.weight": torch.cat(qkv),  # [q | k | v] rows
            h + "attn.c_proj.weight": tensors[m + "self_attn.o_proj.weight"],
            h + "ln_2.weight": tensors[m + "post_attention_layernorm.weight"],
            h + "mlp.c_fc.weight": torch.cat(
                (tensors[m + "mlp.gate_proj.weight"], tensors[m + "mlp.up_proj.weight"])
            ),
            h + "mlp.c_proj.weight": tensors[m + "mlp.down_proj.weight"],
        }
    return out


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def roles_of(src: Path, named: dict) -> dict:
    """rgpt special -> the tokenizer.json token playing it: `named` (bos=, user=, ...), else
    tokenizer_config.json's bos/eos/unk/pad tokens, else ROLE_DEFAULTS for user and assistant."""
    config = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").exists() else {}
    roles = {f"<{k}>": _token_text(config.get(f"{k}_token")) for k in ("pad", "unk", "bos", "eos")}
    roles |= ROLE_DEFAULTS
    roles |= {f"<{k}>": v for k, v in named.items()}
    return roles


def load_llama(src, block_size: int | None = None, named_roles: dict | None = None):
    """(GPTConfig, rgpt-named float32 weights, JsonTokenizer) of a local transformers Llama directory."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such directory")
    cfg = rgpt_config(_read_json(src / "config.json"), src / "config.json", block_size)
    if not (src / "model.safetensors").exists():
        sharded = (src / "model.safetensors.index.json").exists()
        why = (
            "sharded weights are not supported yet"
            if sharded
            else "no model.safetensors (only safetensors are read)"
        )
        raise ConversionError(f"{src}: {why}")
    if not (src / "tokenizer.json").exists():
        raise ConversionError(f"{src}: no tokenizer.json (a jieba vocabulary comes from rgpt, not from here)")
    try:
        tensors = load_file(src / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"cannot read {src / 'model.safetensors'}: {e}") from None
    roles = roles_of(src, named_roles or {})
    try:
        tok = JsonTokenizer((src / "tokenizer.json").read_text(encoding="utf-8"), roles, cfg.vocab_size)
    except ValueError as e:
        names = "pad= unk= bos= eos= user= assistant="
        raise ConversionError(f"{src / 'tokenizer.json'}: {e} (name them with {names})") from None
    try:
        params = {k: v.to(torch.float32) for k, v in from_llama(tensors, cfg, tok.hf_ids).items()}
    except KeyError as e:
        raise ConversionError(
            f"{src / 'model.safetensors'}: no tensor {e} for a Llama of this config"
        ) from None
    return cfg, params, tok


def import_(src, out, block_size: int | None = None, named_roles: dict | None = None) -> Path:
    """A transformers Llama directory as rgpt checkpoint `out` (written by checkpoint.save, then renamed)."""
    from rgpt.nn.model import GPT  # imported here: only the import direction builds a model

    out = Path(out)
    if out.exists():
        raise ConversionError(f"{out} exists; choose a new checkpoint path")
    cfg, params, tok = load_llama(src, block_size, named_roles)
    model = GPT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.params.items()}
    got = {k: tuple(v.shape) for k, v in params.items()}
    if expected != got:
        diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ConversionError(
            f"{src}: {diff[0]} has shape {got.get(diff[0])}, the config says {expected.get(diff[0])}"
        )
    for name, value in params.items():
        model.store.params[name].copy_(value)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.import")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        saved = ckpt.save(tmp, "final", 0, model, tok, {"imported_from": str(Path(src).resolve())})
        os.replace(saved, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
