"""The architecture ablation of the README: each option against the baseline at the same budget on real text.

    python scripts/ablation.py [--tokens 1500000] [--minutes M] [--variants baseline,rope,...] [--out FILE]

Every variant pretrains `data=mix` (python -m rgpt.data.fetch mix news first) through the real CLI with
the same seed, data, schedule and budget, then `python -m rgpt.eval` scores its best checkpoint on the
held-out news (never trained on) and mix slices. Prints a Markdown table (bits/char and the run's own
tokens/s) and appends one JSON line a variant to --out. Give --minutes for an equal wall-clock budget
(what the options cost then counts against them), or --tokens for equal data (the default: comparable
across machines whose load differs, with tokens/s reported beside).
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import evaluate, run  # noqa: E402

VARIANTS = {
    "baseline": [],
    "rope": ["model.pos=rope"],
    "rmsnorm": ["model.norm=rmsnorm"],
    "swiglu": ["model.activation=swiglu"],
    "gelu": ["model.activation=gelu"],
    "tied": ["model.tie_embeddings=true"],
    "flash": ["model.attn=flash"],  # the same maths as standard: its runs differ in tokens/s only
    "llama": ["model.pos=rope", "model.norm=rmsnorm", "model.activation=swiglu"],
}


def budget(args) -> list[str]:
    """The schedule for the budget: warmup then one cosine cycle to its end (8,192 tokens a step)."""
    if args.minutes:
        return [f"train.max_minutes={args.minutes}", "train.max_tokens=null"]
    steps = max(20, args.tokens // 8192)
    warmup = max(10, steps // 10)
    return [
        f"train.max_tokens={args.tokens}",
        "train.max_minutes=null",
        f"train.warmup_steps={warmup}",
        f"train.cycle_steps={steps - warmup}",
        f"train.eval_every={max(10, steps // 4)}",
    ]


def tokens_per_second(names, rounds: int = 5, steps: int = 3) -> dict[str, float]:
    """Training tokens/s of each variant's model=small (vocabulary 8,000, 16 x 128 tokens, fp32), the variants
    taking turns in this process so that the machine's load hits them alike; the median of the rounds."""
    import dataclasses

    import torch
    import yaml

    sys.path.insert(0, str(REPO))
    from rgpt.nn.model import GPT, GPTConfig
    from rgpt.nn.optim import Adam

    small = yaml.safe_load((REPO / "conf" / "model" / "small.yaml").read_text(encoding="utf-8"))
    small.pop("defaults")
    base = GPTConfig(vocab_size=8000, dropout=0.0, **small)
    models = {}
    for name in names:
        opts = dict(o.removeprefix("model.").split("=") for o in VARIANTS[name])
        opts = {k: v == "true" if v in ("true", "false") else v for k, v in opts.items()}
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(base, **opts))
        models[name] = (model, Adam(model.store))
    idx = torch.randint(0, 8000, (16, 129))
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name, (model, opt) in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                model.zero_grad()
                model.forward(idx[:, :-1], idx[:, 1:])
                model.backward()
                opt.step(1e-4)
            times[name].append(16 * 128 * steps / (time.perf_counter() - t0))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per variant")
    p.add_argument("--minutes", type=float, default=None, help="equal wall-clock budget instead of tokens")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    p.add_argument("--data", default="data", help="where `python -m rgpt.data.fetch` put news/ and mix/")
    p.add_argument("--out", default="outputs/ablation.jsonl")
    p.add_argument(
        "--speed", action="store_true", help="only tokens/s, all variants taking turns in one process"
    )
    p.add_argument("extra", nargs="*", help="more overrides for every run, e.g. threads=2")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant {unknown[0]} (known: {', '.join(VARIANTS)})")
    if args.speed:
        rates = tokens_per_second(names)
        print("| variant | tokens/s | × baseline |\n|---|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.0f} | {rate / rates.get('baseline', rate):.2f} |")
        return
    rows = []
    for name in names:
        t0 = time.time()
        run(
            "rgpt.train", "data=mix", f"run_name=ablation-{name}", *VARIANTS[name], *budget(args), *args.extra
        )
        ckpt = REPO / "outputs" / "pretrain" / f"ablation-{name}"
        log = (ckpt / "train.log").read_text(encoding="utf-8")
        speed = [float(m) for m in re.findall(r"\| (\d+) tokens/s", log)]  # the closing report's figure
        row = {
            "variant": name,
            "overrides": VARIANTS[name],
            "budget": budget(args),
            "tokens_per_s": speed[-1] if speed else None,
            "minutes": round((time.time() - t0) / 60, 1),
            "news_bpc": evaluate(str(ckpt), Path(args.data) / "news" / "heldout.txt", "lm")["bpc"],
            "mix_bpc": evaluate(str(ckpt), Path(args.data) / "mix" / "heldout.txt", "lm")["bpc"],
        }
        rows.append(row)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(json.dumps(row, ensure_ascii=False), flush=True)
    print("\n| variant | news bits/char | mix bits/char | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['news_bpc']:.3f} | {r['mix_bpc']:.3f} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
