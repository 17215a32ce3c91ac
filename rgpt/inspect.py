"""python -m rgpt.inspect [checkpoint=PATH] [text=TEXT] [out=inspect.html] [png=PATH layer=N head=N] [...]

See inside a trained model on one text (every key: conf/inspect.yaml). Writes one self-contained HTML page
(no network needed to open it) with:
- every layer x head's attention as a heatmap over the jieba tokens, Chinese on both axes, the weight on hover;
- a summary per head: entropy, how far back it looks, and whether it attends to the previous token, <bos>,
  punctuation or itself;
- the logit lens: per layer and position, the tokens the residual stream would predict if it went straight
  to ln_f + lm_head, with their probabilities (the last layer's row is the model's own prediction).
With png=PATH, also a picture of one head (layer=, head=), drawn with the system's CJK font.
"""

import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rgpt.chat import note, open_model, quote_text_overrides
from rgpt.checkpoint import read_state
from rgpt.cli import ConfigError, hydra_main, setup_runtime
from rgpt.lens import display_token, head_summary, lens_top, look_inside
from rgpt.tokenizer import SPECIALS, UNK_ID

TEMPLATES = ("auto", "plain", "prompt")
PAGE = Path(__file__).resolve().parent / "web" / "inspect.html"


@dataclass
class InspectConfig:
    checkpoint: str | None = None
    out_dir: str = "outputs"
    text: str = "山脉是如何形成的？"
    template: str = "auto"
    out: str = "inspect.html"
    png: str | None = None
    layer: int = 0
    head: int = 0
    top_k: int = 5
    font: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "InspectConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]} (known: {', '.join(sorted(known))})")
        for key in ("layer", "head", "top_k"):
            v = d.get(key, getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "top_k" else 0):
                raise ConfigError(
                    f"{key}={v!r} must be a {'positive' if key == 'top_k' else 'non-negative'} integer"
                )
        if d.get("template", "auto") not in TEMPLATES:
            raise ConfigError(f"template={d['template']!r} is not one of {', '.join(TEMPLATES)}")
        text = lambda v: None if v is None else str(v)  # noqa: E731  (text=123 arrives as an int)
        c = cls(
            **{
                k: (text(v) if k in ("checkpoint", "text", "out", "png", "font", "out_dir") else v)
                for k, v in d.items()
            }
        )
        if not (c.text or "").strip():
            raise ConfigError("text is empty: give the text to look inside, e.g. text=山脉是如何形成的？")
        if not str(c.out).strip():
            raise ConfigError("out is empty: the HTML page to write, e.g. out=inspect.html")
        return c


def encode(tok, text: str, template: str, stage: str | None) -> tuple[list[int], str]:
    """(ids, template used): `prompt` is chat's <bos><user> text <assistant>; `plain` is pretraining's
    <bos> text; `auto` picks prompt for an instruction-tuned (sft) checkpoint, plain otherwise."""
    if template == "auto":
        template = "prompt" if stage == "sft" else "plain"
    ids = tok.encode_prompt([("user", text)]) if template == "prompt" else tok.encode_pretrain(text)[:-1]
    return ids, template


def page_data(model, tok, ids: list[int], *, checkpoint, template: str, top_k: int) -> dict:
    """Everything the page shows, as JSON-ready numbers and strings."""
    inside = look_inside(model, ids)
    tokens = [tok.tokens[i] for i in ids]
    top = lens_top(inside.lens, ids, top_k)
    L = model.config.n_layer
    return {
        "checkpoint": str(checkpoint),
        "template": template,
        "tokens": [display_token(t) for t in tokens],
        "ids": ids,
        "special": [i < len(SPECIALS) and i != UNK_ID for i in ids],
        "n_layer": L,
        "n_head": model.config.n_head,
        "attention": [
            [[[round(w, 4) for w in row] for row in head] for head in layer]
            for layer in inside.attention.tolist()
        ],
        "heads": head_summary(inside.attention, ids, tokens),
        "lens": {
            "layers": ["嵌入 embedding"]
            + [f"第 {i} 层后 after block {i}" for i in range(L - 1)]
            + [f"第 {L - 1} 层后 = 输出 output"],
            "top": [
                [
                    [[display_token(tok.tokens[i]), round(p, 4)] for i, p in zip(ti, tp)]
                    for ti, tp in zip(li, lp)
                ]
                for li, lp in zip(top["ids"], top["probs"])
            ],
            "p_next": top["p_next"],
            "rank_next": top["rank_next"],
        },
    }


def render_page(data: dict) -> str:
    """The page: the template with the data inlined (every '<' escaped, so no text can close the script)."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return PAGE.read_text(encoding="utf-8").replace("{{DATA}}", blob)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_png(model, tok, ids, c: InspectConfig) -> Path:
    from rgpt.plot import head_image, load_fonts, save_png

    try:
        fonts = load_fonts(c.font, log=note)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    att = look_inside(model, ids).attention[c.layer, c.head].numpy()
    title = f"第 {c.layer} 层 · 头 {c.head}   layer {c.layer}, head {c.head}"
    path = Path(c.png)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(head_image(att, [tok.tokens[i] for i in ids], title, fonts), path)
    return path


def check_against(model, ids, c: InspectConfig) -> None:
    cfg = model.config
    if c.layer >= cfg.n_layer:
        raise ConfigError(f"layer={c.layer}: the model has {cfg.n_layer} layers (0-{cfg.n_layer - 1})")
    if c.head >= cfg.n_head:
        raise ConfigError(f"head={c.head}: the model has {cfg.n_head} heads per layer (0-{cfg.n_head - 1})")
    if len(ids) > cfg.block_size:
        raise ConfigError(
            f"text is {len(ids)} tokens with its template; the model reads at most {cfg.block_size}"
        )


@hydra_main("inspect")
def _main(cfg) -> None:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    device = setup_runtime(raw.pop("device"), raw.pop("threads"), raw.pop("allocator"))
    c = InspectConfig.from_dict(raw)
    model, tok, path = open_model(c.checkpoint, c.out_dir, device)
    ids, template = encode(tok, c.text, c.template, read_state(path).get("stage"))
    check_against(model, ids, c)
    data = page_data(model, tok, ids, checkpoint=path, template=template, top_k=c.top_k)
    out = Path(c.out)
    write_atomic(out, render_page(data))
    print(f"wrote {out} ({len(ids)} tokens, {model.config.n_layer} layers x {model.config.n_head} heads)")
    if c.png:
        print(f"wrote {write_png(model, tok, ids, c)} (layer {c.layer}, head {c.head})")
    named = [
        f"{layer}.{h} {s['kind']}"
        for layer, heads in enumerate(data["heads"])
        for h, s in enumerate(heads)
        if s["kind"] not in ("mixed", "broad")
    ]
    print("heads: " + (", ".join(named) if named else "none attends mostly to one kind of token"))


def main() -> None:
    sys.argv[1:] = quote_text_overrides(
        sys.argv[1:], keys=("text", "checkpoint", "out_dir", "out", "png", "font")
    )
    with torch.no_grad():
        _main()


if __name__ == "__main__":
    main()
