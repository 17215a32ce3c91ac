"""The inspect page: everything it shows about one text as JSON-ready data, inlined into a self-contained
HTML template (rgpt/viz/web/inspect.html; no network needed to open it)."""

import json
from pathlib import Path

from rgpt.data.tokenizer import SPECIALS, UNK_ID
from rgpt.viz.lens import display_token, head_summary, lens_top, look_inside

PAGE = Path(__file__).resolve().parent / "web" / "inspect.html"


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
