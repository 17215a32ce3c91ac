"""rgpt ⇄ transformers (rgpt/runtime/hf.py, python -m rgpt.hf): an exported checkpoint is a LlamaForCausalLM that
computes rgpt's logits, its tokenizer gives rgpt's ids and prompts, and its greedy replies are chat's."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rgpt.data.tokenizer import Tokenizer
from rgpt.inference.generate import DecodeConfig, generate
from rgpt.nn.model import GPT
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.hf import LLAMA, to_llama
from tests.fixtures_ckpt import DIALOGUES, STEPS, run_cli, trained
from tests.helpers import assert_close
from tests.nn.test_model import make_model

os.environ["HF_HUB_OFFLINE"] = (
    "1"  # everything is local: no download, ever (set before transformers reads it)
)
transformers = pytest.importorskip("transformers")

LLAMA_ARCH = (*LLAMA.items(), ("n_kv_head", 2))  # model=llama at the tiny sizes


@pytest.fixture
def exact_llama(monkeypatch):
    """transformers' RMSNorm and rotary tables round to float32 by design (for half-precision training); in a
    float64 comparison that rounding is the only difference left, so these are the same formulas without it."""
    from transformers.models.llama import modeling_llama as ml

    def rms_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary_forward(self, x, position_ids):
        dim = self.inv_freq.shape[0] * 2
        inv_freq = 1.0 / (
            self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        )
        freqs = position_ids[..., None].double() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(ml.LlamaRotaryEmbedding, "forward", rotary_forward)


def tiny_tokenizer():
    return Tokenizer.build([c for turns in DIALOGUES for _, c in turns], min_freq=1, idioms=())


def export_cli(src, out, cwd):
    return run_cli("hf", "export", f"checkpoint={src}", f"out={out}", cwd=cwd)


def saved(model, tok, where):
    return ckpt.save(where, "final", 1, model, tok, {})


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_transformers_computes_rgpt_logits_after_export(tmp_path, exact_llama, n_kv_head):
    tok = tiny_tokenizer()
    model = make_model(**{**dict(LLAMA), "n_kv_head": n_kv_head, "vocab_size": tok.vocab_size})
    model.eval()
    out = tmp_path / "hf"
    proc = export_cli(saved(model, tok, tmp_path / "ckpt"), out, tmp_path)
    assert proc.returncode == 0, proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, tok.vocab_size, (3, 12))
    assert_close(
        hf(idx).logits,
        model.forward(idx),
        f"transformers vs rgpt logits (n_kv_head={n_kv_head})",
        rtol=0,
        atol=1e-10,
    )


def test_export_splits_the_fused_projections_exactly(tmp_path):
    tok = tiny_tokenizer()
    model = GPT(make_model(**dict(LLAMA_ARCH), vocab_size=tok.vocab_size).config)
    out = tmp_path / "hf"
    assert export_cli(saved(model, tok, tmp_path / "ckpt"), out, tmp_path).returncode == 0
    got = load_file(out / "model.safetensors")
    want = to_llama(model.params, model.config)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), f"{name} changed on the way out"
    q, k, v = (got[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat((q, k, v)), model.params["h.1.attn.c_attn.weight"])
    assert k.shape == (2 * 16 // 4, 16), "two kv heads of size 4"
    gate, up = got["model.layers.0.mlp.gate_proj.weight"], got["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(torch.cat((gate, up)), model.params["h.0.mlp.c_fc.weight"])
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


def test_the_tokenizer_travels(tmp_path):
    model, tok, _ = trained(LLAMA_ARCH)
    out = tmp_path / "hf"
    assert export_cli(saved(model, tok, tmp_path / "ckpt"), out, tmp_path).returncode == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    texts = ["山脉是如何形成的？", "  你好\t\n 一年  有几个季节？ ", "龘𠀀 hello world", "", "一百摄氏度。"]
    for text in texts:
        got = hf_tok.encode(text, add_special_tokens=False)
        assert got == tok.encode(text), f"ids of {text!r}: transformers {got}, rgpt {tok.encode(text)}"
        assert hf_tok.decode(got) == tok.decode(tok.encode(text)), f"decode of {text!r}"
    # the one documented difference: transformers turns text that spells a special token into that token
    # (for every tokenizer, which is how the chat template's "<user>" becomes id 4); rgpt spells it out
    assert 3 in hf_tok.encode("a <eos> b", add_special_tokens=False) and 3 not in tok.encode("a <eos> b")
    for turns in DIALOGUES:
        history = turns[:-1]
        messages = [{"role": r, "content": c} for r, c in history]
        got = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
        got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
        assert got == tok.encode_prompt(history), (
            f"prompt of {history}: {got} != {tok.encode_prompt(history)}"
        )
    with pytest.raises(Exception, match="roles user and assistant"):
        hf_tok.apply_chat_template([{"role": "system", "content": "x"}], add_generation_prompt=True)


def test_greedy_generate_gives_chats_reply(tmp_path):
    model, tok, _ = trained(LLAMA_ARCH)
    src = ckpt.save(tmp_path / "run", "best", STEPS, model, tok, {})
    out = tmp_path / "hf"
    assert export_cli(src, out, tmp_path).returncode == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    for question in ("山脉是如何形成的？", "你好", "水的沸点是多少？", "没见过的问题"):
        cli = run_cli("chat", f"checkpoint={src}", f"prompt={question}", cwd=tmp_path)
        assert cli.returncode == 0, cli.stderr
        prompt = tok.encode_prompt([("user", question)])
        ours = generate(model, prompt, DecodeConfig())  # chat's defaults
        enc = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = torch.tensor([enc["input_ids"]])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids))[0, ids.shape[1] :].tolist()
        end_of_turn = hf.generation_config.eos_token_id
        theirs = (
            theirs[:-1] if theirs and theirs[-1] in end_of_turn else theirs
        )  # rgpt's reply stops before it
        assert theirs == list(ours), f"{question}: transformers {theirs}, rgpt {list(ours)}"
        assert hf_tok.decode(theirs, skip_special_tokens=True) + "\n" == cli.stdout, (question, cli.stdout)


def test_unexportable_checkpoint_is_one_line_naming_the_options(tiny_run, tmp_path):
    _, src = tiny_run  # the reference's architecture: sinusoids, LayerNorm, ReLU, biases
    proc = export_cli(src, tmp_path / "hf", tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for option in ("model.pos=rope", "model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false"):
        assert option in proc.stderr, f"{option} missing from: {proc.stderr}"
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.parametrize(
    "args, says",
    [
        ((), "usage"),
        (("export", "checkpoint=x"), "missing out="),
        (("export", "checkpoint=/nonexistent", "out=o"), "checkpoint not found"),
        (("export", "ckpt=x", "out=o"), "expected checkpoint="),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, args, says):
    proc = run_cli("hf", *args, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_export_refuses_a_non_empty_directory(tmp_path):
    model, tok, _ = trained(LLAMA_ARCH)
    src = saved(model, tok, tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    proc = export_cli(src, tmp_path / "hf", tmp_path)
    assert proc.returncode == 1 and "not empty" in proc.stderr, proc.stderr
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
