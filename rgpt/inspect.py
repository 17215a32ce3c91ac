"""python -m rgpt.inspect [checkpoint=PATH] [text=TEXT] [out=inspect.html] [png=PATH layer=N head=N] [...]

See inside a trained model on one text (every key: InspectConfig below; `--cfg job` prints them). Writes one self-contained HTML page
(no network needed to open it) with:
- every layer x head's attention as a heatmap over the jieba tokens, Chinese on both axes, the weight on hover;
- a summary per head: entropy, how far back it looks, and whether it attends to the previous token, <bos>,
  punctuation or itself;
- the logit lens: per layer and position, the tokens the residual stream would predict if it went straight
  to ln_f + lm_head, with their probabilities (the last layer's row is the model's own prediction).
With png=PATH, also a picture of one head (layer=, head=), drawn with the system's CJK font.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rgpt.cli import hydra_main, quote_text_overrides, settings
from rgpt.inference.conversation import note
from rgpt.inference.load import ModelChoice
from rgpt.runtime.checkpoint import read_state
from rgpt.runtime.device import RuntimeSettings
from rgpt.settings import FLAT, ConfigError, check
from rgpt.viz.lens import look_inside
from rgpt.viz.page import encode, page_data, render_page

TEMPLATES = ("auto", "plain", "prompt")


@dataclass
class InspectConfig:
    model: ModelChoice = field(default_factory=ModelChoice, metadata=FLAT)  # checkpoint=, out_dir=
    text: str = "山脉是如何形成的？"  # the text to look inside; the training sample prompt, so the page matches TensorBoard's
    # prompt: chat's <bos><user> text <assistant>; plain: pretraining's <bos> text; auto: prompt for an sft
    # checkpoint, else plain
    template: str = "auto"
    # the page to write (attention of every layer x head, per-head summary, logit lens)
    out: str = "inspect.html"
    png: str | None = None  # also a PNG of one head here (e.g. png=head.png); None: the page only
    layer: int = 0  # the PNG's layer (0 = the first block)
    head: int = 0  # the PNG's head within that layer
    # logit lens: how many likeliest tokens each cell lists on hover (the cell shows the first)
    top_k: int = 5
    font: str | None = None  # the PNG's font file; None: the system's CJK font (Noto CJK, WenQuanYi, ...)
    # device, threads, allocator
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings, metadata=FLAT)

    def validate(self) -> "InspectConfig":
        for key in ("layer", "head"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be a non-negative integer")
        check(self.top_k >= 1, "top_k", self.top_k, "must be a positive integer")
        check(self.template in TEMPLATES, "template", self.template, f"must be one of {', '.join(TEMPLATES)}")
        if not self.text.strip():
            raise ConfigError("text is empty: give the text to look inside, e.g. text=山脉是如何形成的？")
        if not self.out.strip():
            raise ConfigError("out is empty: the HTML page to write, e.g. out=inspect.html")
        self.runtime.validate()
        return self


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_png(model, tok, ids, c: InspectConfig) -> Path:
    from rgpt.viz.plot import head_image, load_fonts, save_png

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


@hydra_main("inspect", InspectConfig)
def _main(cfg) -> None:
    c = settings(InspectConfig, cfg)
    device = c.runtime.apply()
    model, tok, path = c.model.open(device)
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
