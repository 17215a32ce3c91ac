"""python -m rgpt.hf import: a random transformers LlamaForCausalLM (GQA, tied or untied head, a tokenizer.json)
becomes an rgpt checkpoint that computes its logits, that chat, eval and train use, and that exports back to
the same tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rgpt.data.tokenizer import SPECIALS
from rgpt.data.vocab import load_tokenizer
from rgpt.inference.generate import DecodeConfig, generate
from rgpt.nn.model import GPT
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime.hf import from_llama, load_llama
from tests.fixtures_ckpt import run_cli
from tests.helpers import assert_close
from tests.runtime.test_hf import exact_llama  # noqa: F401  (a fixture)
from tests.training.test_train_cli import cli_args, run, write_corpus

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a sun moon river city forms shapes lights rivers mountains is of and what how".split()
# the roles sit at the end, so rgpt's ids are a real permutation of the tokenizer's
VOCAB = {w: i for i, w in enumerate(WORDS)} | {
    t: len(WORDS) + i for i, t in enumerate(("<unk>", "</s>", "<|user|>", "<s>", "<pad>", "<|assistant|>"))
}
EXTRA_ROWS = 3  # a model's vocabulary may be larger than its tokenizer's


def write_tokenizer(where):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    tk.add_special_tokens(["<unk>", "</s>", "<|user|>", "<s>", "<pad>", "<|assistant|>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(where)


def random_llama(where, *, tied, dtype, n_kv_head=2, intermediate=24):
    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB) + EXTRA_ROWS,
        hidden_size=16,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # ones for the norms and 0.02-sized weights would hide a swapped or missing scale
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(where)
    write_tokenizer(where)
    return model


def import_cli(src, out, cwd, *extra):
    return run_cli("hf", "import", f"src={src}", f"out={out}", *extra, cwd=cwd)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_rgpt_computes_transformers_logits_after_import(tmp_path, exact_llama, tied, n_kv_head):  # noqa: F811
    hf = random_llama(tmp_path, tied=tied, dtype=torch.float64, n_kv_head=n_kv_head, intermediate=23)
    cfg, _, tok = load_llama(tmp_path)
    model = GPT(cfg, dtype=torch.float64)
    for name, value in from_llama(load_file(tmp_path / "model.safetensors"), cfg, tok.hf_ids).items():
        model.store.params[name].copy_(value)
    model.eval()
    hf_idx = torch.randint(0, len(VOCAB), (3, 10))
    ours = model.forward(torch.from_numpy(tok.rgpt_ids)[hf_idx])  # (B, T, V) in rgpt's id order
    theirs = hf(hf_idx).logits[:, :, torch.from_numpy(tok.hf_ids)]
    assert_close(ours, theirs, f"rgpt vs transformers logits ({n_kv_head=}, {tied=})", rtol=0, atol=1e-10)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_then_export_gives_back_the_same_tensors(tmp_path, tied):
    src = tmp_path / "src"
    random_llama(src, tied=tied, dtype=torch.float32)
    proc = import_cli(src, tmp_path / "ckpt", tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "hf", "export", f"checkpoint={tmp_path / 'ckpt'}", f"out={tmp_path / 'back'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    if tied:  # rgpt's tied head is another function (see LLAMA): the head comes back as its own copy
        before["lm_head.weight"] = before["model.embed_tokens.weight"]
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed on the round trip"
    assert json.loads((src / "tokenizer.json").read_text()) == json.loads(
        (tmp_path / "back" / "tokenizer.json").read_text()
    )
    tok = load_tokenizer(tmp_path / "ckpt")
    assert [tok.tokens[i] for i in range(6)] == ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    messages = [{"role": "user", "content": "what is the sun"}]
    ids = back.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    ours = tok.encode_prompt([("user", "what is the sun")])
    assert ids == [int(tok.hf_ids[i]) for i in ours], f"template {ids} vs rgpt's prompt {ours}"


def test_chat_eval_and_sft_use_an_imported_checkpoint(tmp_path):
    src = tmp_path / "src"
    random_llama(src, tied=False, dtype=torch.float32)
    path = tmp_path / "ckpt"
    assert import_cli(src, path, tmp_path, "block_size=24").returncode == 0
    assert ckpt.model_config(ckpt.read_state(path), path).block_size == 24
    assert import_cli(src, tmp_path / "back-out", tmp_path).returncode == 0  # export for the comparison
    back = tmp_path / "back"
    assert (
        run_cli("hf", "export", f"checkpoint={tmp_path / 'back-out'}", f"out={back}", cwd=tmp_path).returncode
        == 0
    )
    question = "what is the moon"
    chat = run_cli("chat", f"checkpoint={path}", f"prompt={question}", "max_new_tokens=6", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr
    model, tok, _ = ckpt.load_model(path)
    prompt = tok.encode_prompt([("user", question)])
    ours = generate(model, prompt, DecodeConfig(max_new_tokens=6))
    assert tok.decode(ours) + "\n" == chat.stdout, (
        f"chat printed {chat.stdout!r}, its tokens say {tok.decode(ours)!r}"
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(back)
    hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    enc = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = torch.tensor([enc["input_ids"]])
    assert ids[0].tolist() == [int(tok.hf_ids[i]) for i in prompt], "the chat template is rgpt's prompt"
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)[
        0, ids.shape[1] :
    ].tolist()
    theirs = (
        theirs[:-1] if theirs[-1] in hf.generation_config.eos_token_id else theirs
    )  # rgpt stops before it
    assert theirs == [int(tok.hf_ids[i]) for i in ours], f"transformers {theirs}, rgpt {ours} (rgpt ids)"
    corpus = write_corpus(tmp_path)
    out = tmp_path / "out"
    run(cli_args(corpus, out, f"resume_from={path}", "train.max_steps=3", stage="sft"))
    final = ckpt.list_checkpoints(out / "sft" / "default" / "checkpoints", "final")
    assert final and load_tokenizer(final[-1]).to_dict() == load_tokenizer(path).to_dict(), (
        "the tokenizer travels on"
    )
    ev = run_cli("eval", f"checkpoint={final[-1]}", f"data.path={corpus.sft}", "task=sft", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr


@pytest.mark.parametrize(
    "change, says",
    [
        ({"hidden_act": "gelu"}, "hidden_act=gelu"),
        ({"rope_theta": 500000.0}, "rope_theta"),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
        ({"attention_bias": True}, "biases"),
        ({"model_type": "mistral"}, "llama only"),
    ],
)
def test_a_llama_rgpt_cannot_compute_is_one_line(tmp_path, change, says):
    src = tmp_path / "src"
    random_llama(src, tied=False, dtype=torch.float32)
    config = json.loads((src / "config.json").read_text()) | change
    (src / "config.json").write_text(json.dumps(config))
    proc = import_cli(src, tmp_path / "ckpt", tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_missing_roles_and_files_are_one_line(tmp_path):
    src = tmp_path / "src"
    random_llama(src, tied=False, dtype=torch.float32)
    proc = import_cli(src, tmp_path / "ckpt", tmp_path, "user=<|human|>")
    assert proc.returncode == 1 and "<user>" in proc.stderr and "user=" in proc.stderr, proc.stderr
    proc = import_cli(src, tmp_path / "ckpt", tmp_path, "user=<s>")
    assert proc.returncode == 1 and "six different tokens" in proc.stderr, proc.stderr
    (src / "tokenizer.json").unlink()
    proc = import_cli(src, tmp_path / "ckpt", tmp_path)
    assert proc.returncode == 1 and "no tokenizer.json" in proc.stderr, proc.stderr
    (src / "model.safetensors").unlink()
    proc = import_cli(src, tmp_path / "ckpt", tmp_path)
    assert proc.returncode == 1 and "no model.safetensors" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "ckpt").exists()
    assert set(SPECIALS) == {"<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>"}


def test_inspect_draws_an_imported_checkpoint(tmp_path):
    src = tmp_path / "src"
    random_llama(src, tied=False, dtype=torch.float32)
    path = tmp_path / "ckpt"
    assert import_cli(src, path, tmp_path).returncode == 0
    proc = run_cli(
        "inspect", f"checkpoint={path}", "text=the sun lights the river", "out=attn.html", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "river" in (tmp_path / "attn.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("stage", ["lora", "dpo"])
def test_lora_and_dpo_train_from_an_imported_checkpoint(tmp_path, stage):
    from tests.stages.test_dpo_cli import DPO, PAIRS
    from tests.stages.test_lora_cli import LORA

    src = tmp_path / "src"
    random_llama(src, tied=False, dtype=torch.float32)
    path = tmp_path / "ckpt"
    assert import_cli(src, path, tmp_path).returncode == 0
    corpus, out = write_corpus(tmp_path), tmp_path / "out"
    args = [a for a in cli_args(corpus, out, stage="sft") if not a.startswith(("stage=", "data.files="))]
    extra = [*LORA, f"data.files=[{corpus.sft}]"] if stage == "lora" else [*DPO, f"data.files=[{PAIRS}]"]
    run([*args, f"stage={stage}", f"resume_from={path}", "train.max_steps=2", *extra])
    final = ckpt.list_checkpoints(out / stage / "default" / "checkpoints", "final")
    assert final, f"{stage} saved no final checkpoint"
    assert load_tokenizer(final[-1]).to_dict() == load_tokenizer(path).to_dict()


def test_serve_answers_with_an_imported_checkpoint(tmp_path):
    openai = pytest.importorskip("openai")
    from tests.fixtures_serve import Server

    src = tmp_path / "src"
    random_llama(src, tied=False, dtype=torch.float32)
    path = tmp_path / "ckpt"
    assert import_cli(src, path, tmp_path).returncode == 0
    question = "how is the river"
    chat = run_cli("chat", f"checkpoint={path}", f"prompt={question}", "max_new_tokens=5", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr
    server = Server(f"checkpoint={path}", cwd=tmp_path)
    try:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": question}]
        r = api.chat.completions.create(model=server.model, messages=messages, max_tokens=5, temperature=0)
        assert r.choices[0].message.content + "\n" == chat.stdout, (r.choices[0].message.content, chat.stdout)
    finally:
        code, stderr = server.stop()
    assert code == 0 and "Traceback" not in stderr, stderr
