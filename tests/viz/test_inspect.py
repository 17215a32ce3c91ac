"""python -m rgpt.inspect and what it reads out: attention weights, the per-head summary, the logit lens, the
page (through the real CLI) and the PNG of one head with a CJK font."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rgpt.data.tokenizer import BOS_ID
from rgpt.viz import plot
from rgpt.viz.lens import head_summary, is_punctuation, lens_top, look_inside
from tests.fixtures_ckpt import run_cli, trained
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread

TEXT = "山脉是如何形成的？"


def tiny_prompt():
    model, tok, _ = trained()
    return model, tok, tok.encode_prompt([("user", TEXT)])


# ---- what the model computes inside ---------------------------------------------------------------------
def test_logit_lens_at_the_last_layer_is_the_models_own_logits():
    model, _, ids = tiny_prompt()
    inside = look_inside(model, ids)
    logits = model.forward(torch.tensor([ids]))[0]  # (T, V)
    assert inside.lens.shape == (model.config.n_layer + 1, len(ids), model.config.vocab_size)
    assert torch.equal(inside.lens[-1], logits), (
        f"last layer of the lens differs from the logits by {(inside.lens[-1] - logits).abs().max():.3e}"
    )
    # the first row: the embedding alone through ln_f and lm_head, computed here the plain way
    p = model.params
    x = p["wte.weight"][torch.tensor(ids)] + model.wpe[: len(ids)]
    x = F.layer_norm(x, (x.shape[-1],), p["ln_f.weight"], p["ln_f.bias"])
    assert_close(
        inside.lens[0],
        F.linear(x, p["lm_head.weight"], p["lm_head.bias"]),
        "lens after the embedding",
        rtol=1e-5,
        atol=1e-6,
    )


def test_attention_weights_are_layer_0s_softmax_of_the_scaled_products():
    model, _, ids = tiny_prompt()
    att = look_inside(model, ids).attention  # (L, H, T, T)
    L, H, T = model.config.n_layer, model.config.n_head, len(ids)
    assert att.shape == (L, H, T, T)
    p, C = model.params, model.config.n_embd
    x = p["wte.weight"][torch.tensor(ids)] + model.wpe[:T]
    x = F.layer_norm(x, (C,), p["h.0.ln_1.weight"], p["h.0.ln_1.bias"])
    q, k, _ = F.linear(x, p["h.0.attn.c_attn.weight"], p["h.0.attn.c_attn.bias"]).split(C, -1)
    q, k = (t.view(T, H, C // H).transpose(0, 1) for t in (q, k))  # (H, T, D)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
    want = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    assert_close(att[0], want, "layer 0 attention", rtol=1e-5, atol=1e-7)
    assert_close(att.sum(-1), torch.ones(L, H, T), "rows sum to 1", rtol=1e-5, atol=1e-6)
    assert model.training is False, "look_inside leaves the model's mode as it found it"


def test_head_summary_names_previous_token_bos_punctuation_broad_and_focused_heads():
    tokens = ["<bos>", "山脉", "，", "是", "的"]
    ids = [BOS_ID, 10, 11, 12, 13]
    T = len(tokens)
    att = torch.zeros(1, 5, T, T)
    att[0, 0, 0, 0] = 1
    att[0, 0, torch.arange(1, T), torch.arange(T - 1)] = 1  # head 0: the previous token
    att[0, 1, :, 0] = 1  # head 1: <bos>
    att[0, 2] = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # head 2: uniform
    att[0, 3, 0, 0] = att[0, 3, 1, 1] = 1
    att[0, 3, 2:, 2] = 1  # head 3: the comma, once it can see it
    att[0, 4, 0, 0] = 1
    att[0, 4, 1:, 1] = 1  # head 4: always 山脉, which is none of those
    ((prev, bos, uniform, punct, focused),) = head_summary(att, ids, tokens)
    assert (
        prev["kind"] == "previous"
        and prev["entropy"] == 0
        and prev["lookback"] == 1
        and prev["previous"] == 1
    )
    assert bos["kind"] == "bos" and bos["bos"] == 1 and bos["lookback"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    want_entropy = sum(math.log2(t + 1) for t in range(1, T)) / (T - 1)
    assert uniform["kind"] == "broad" and uniform["entropy"] == pytest.approx(want_entropy)
    assert uniform["spread"] == pytest.approx(1.0)
    assert punct["kind"] == "punct" and punct["punct"] == pytest.approx(3 / 4), punct
    assert focused["kind"] == "focused" and focused["previous"] == focused["self"] == 1 / 4, focused
    assert (
        is_punctuation("？")
        and is_punctuation("，。")
        and not is_punctuation("山脉")
        and not is_punctuation("")
    )


def test_lens_top_gives_the_likeliest_tokens_and_the_rank_of_the_real_next_one():
    logits = torch.log(torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]]))  # (1 layer, T=2, V=3)
    top = lens_top(logits, [0, 2], k=2)
    assert top["ids"] == [[[1, 2], [0, 2]]]
    assert np.allclose(top["probs"], [[[0.6, 0.3], [0.5, 0.3]]])
    assert top["p_next"][0][0] == pytest.approx(0.3) and top["rank_next"][0] == [1, None]


# ---- the PNG and its font ----------------------------------------------------------------------------------
def glyph(font, text):
    img = Image.new("L", (64, 64), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(img).text((4, 4), text, fill=255, font=font)
    return np.asarray(img)


def test_the_png_font_draws_chinese_glyphs_not_boxes():
    if plot.find_cjk_font() is None:
        pytest.skip("no CJK font on this system (Debian: apt-get install fonts-noto-cjk)")
    fonts = plot.load_fonts(log=lambda m: pytest.fail(f"unexpected notice: {m}"))
    assert fonts.cjk
    tofu = glyph(fonts.label, "\u0378")  # an unassigned code point: what a missing glyph looks like
    shapes = [glyph(fonts.label, c) for c in "山脉形成"]
    for c, g in zip("山脉形成", shapes):
        assert g.sum() > 0 and not np.array_equal(g, tofu), f"{c} is drawn as the missing-glyph box"
    assert len({g.tobytes() for g in shapes}) == 4, "four characters, four different glyphs"


def test_without_a_cjk_font_the_png_is_still_drawn_and_a_notice_says_why(monkeypatch):
    monkeypatch.setattr(plot, "find_cjk_font", lambda: None)
    notices = []
    fonts = plot.load_fonts(log=notices.append)
    assert notices == [plot.NO_FONT] and not fonts.cjk and "fonts-noto-cjk" in plot.NO_FONT
    img = plot.head_image(np.eye(3), ["<bos>", "山", "。"], "layer 0 head 0", fonts)
    assert img.width > 3 * 22 and np.asarray(img).min() < 50


# ---- the command ------------------------------------------------------------------------------------------
def page_data(html: str) -> dict:
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob)


@pytest.fixture(scope="module")
def page(tiny_run, tmp_path_factory):
    """The page and PNG that `python -m rgpt.inspect` writes for the tiny model (a real subprocess)."""
    out_dir, ckpt = tiny_run
    where = tmp_path_factory.mktemp("inspect")
    proc = run_cli(
        "inspect",
        f"checkpoint={ckpt}",
        f"text={TEXT}",
        "out=page/attn.html",
        "png=head.png",
        "layer=1",
        "head=2",
        "threads=1",
        cwd=where,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return where, proc


def test_the_page_holds_every_token_and_every_layer_and_head(page):
    where, proc = page
    model, tok, ids = tiny_prompt()
    html = (where / "page" / "attn.html").read_text(encoding="utf-8")
    data = page_data(html)
    tokens = [tok.tokens[i] for i in ids]
    assert tokens == ["<bos>", "<user>", "山脉", "是", "如何", "形成", "的", "？", "<assistant>"]
    assert data["tokens"] == tokens and data["template"] == "prompt", "an sft checkpoint gets chat's template"
    for t in [t for t in tokens if not t.startswith("<")]:  # <bos> etc. are escaped in the data
        assert t in html, f"token {t} not in the page"
    L, H, T = model.config.n_layer, model.config.n_head, len(ids)
    assert np.array(data["attention"]).shape == (L, H, T, T)
    assert len(data["heads"]) == L and all(len(h) == H for h in data["heads"])
    assert np.array(data["lens"]["top"], dtype=object).shape[:2] == (L + 1, T)
    assert not re.search(r"<(script|link)[^>]+(src|href)=", html), "the page loads nothing from elsewhere"
    assert f"wrote page/attn.html ({T} tokens, {L} layers x {H} heads)" in proc.stdout


def test_the_png_shows_the_chosen_head(page):
    where, proc = page
    img = np.asarray(Image.open(where / "head.png").convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 200, img.shape
    assert (img.sum(-1) < 200).mean() > 0.01, "the picture has dark cells and labels"
    assert "wrote head.png (layer 1, head 2)" in proc.stdout


@pytest.mark.parametrize(
    "override, needle",
    [("layer=2", "layer=2: the model has 2 layers"), ("template=chat", "template='chat': must be one of")],
)
def test_bad_settings_are_one_line_errors(tiny_run, tmp_path, override, needle):
    _, ckpt = tiny_run
    proc = run_cli("inspect", f"checkpoint={ckpt}", override, "threads=1", cwd=tmp_path)
    assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir()), "nothing written"


def test_lens_and_attention_with_every_architecture_option():
    """RoPE, RMSNorm, SwiGLU, tied embeddings and the flash core: the lens still ends at the logits, and a
    flash model is read through the standard core (same maths, weights kept), then left as it was."""
    from rgpt.nn.flash import FlashCore
    from rgpt.nn.model import GPT, GPTConfig

    torch.manual_seed(0)
    kw = dict(vocab_size=40, n_embd=16, n_head=2, n_layer=2, n_hidden=24, block_size=16, dropout=0.1)
    kw |= dict(activation="swiglu", norm="rmsnorm", pos="rope", tie_embeddings=True)
    flash, standard = GPT(GPTConfig(**kw, attn="flash")), GPT(GPTConfig(**kw))
    standard.store.load(flash.params)
    ids = [BOS_ID, 7, 8, 9, 10, 11, 12]
    idx = torch.tensor([ids])
    inside, plain = look_inside(flash, ids), look_inside(standard, ids)
    assert all(isinstance(block.attn.core, FlashCore) for block in flash.h), "the flash core is put back"
    assert flash.training, "and the model's mode"
    standard.eval()
    flash.eval()
    assert torch.equal(plain.lens[-1], standard.forward(idx)[0])
    assert torch.equal(inside.attention, plain.attention) and torch.equal(inside.lens, plain.lens)
    assert_close(inside.lens[-1], flash.forward(idx)[0], "flash logits", rtol=1e-5, atol=1e-6)
    assert_close(inside.attention.sum(-1), torch.ones(2, 2, len(ids)), "rows sum to 1", rtol=1e-5, atol=1e-6)
