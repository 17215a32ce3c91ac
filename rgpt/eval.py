"""python -m rgpt.eval [checkpoint=PATH] [data.path=FILE] [task=lm|sft|verify] [key=value ...]

Measures a checkpoint on a corpus: loss, perplexity, bits per character, <unk> rate; with task=sft also
the replies' exact match and character F1 (rgpt/inference/evaluate.py says how). task=verify instead answers
the held-out problems of the verifiable tasks greedily (rgpt/data/tasks.py) and reports each task's accuracy
and mean reward. The last line printed is one JSON object with these numbers. Every key: EvalConfig
(`--cfg job` prints them).
"""

import json
import sys

import torch

from rgpt.cli import hydra_main, quote_text_overrides, settings
from rgpt.data import CorpusError, expand_paths
from rgpt.data.tasks import held_out
from rgpt.inference.evaluate import EvalConfig, evaluate
from rgpt.inference.verify import verify


def summary(result: dict, ckpt, cfg: EvalConfig) -> str:
    what = "passages" if cfg.task == "lm" else "dialogues"
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"checkpoint   {ckpt}",
        f"data         {cfg.data_path}: {result['_passages']:,} {what}, {result['chars']:,} characters, "
        f"{result['tokens']:,} tokens scored",
        f"loss         {result['loss']:.4f} nats/token   perplexity {fmt(result['ppl'], '.2f')}",
        f"bpc          {fmt(result['bpc'], '.4f')} bits/character",
        f"unk rate     {result['unk_rate']:.2%}",
    ]
    if cfg.task == "sft":
        lines.append(
            f"replies      exact match {fmt(result['exact_match'], '.1%')}, char F1 "
            f"{fmt(result['char_f1'], '.3f')} over {result['_prompts']:,} prompts ({cfg.decode.method})"
        )
    return "\n".join(lines)


@hydra_main("eval", EvalConfig)
def _main(cfg) -> None:
    c = settings(EvalConfig, cfg)
    device = c.runtime.apply()
    if c.task == "verify":
        return _verify(c, device)
    expand_paths(c.data_path)  # a missing file fails before the model loads
    model, tok, path = c.model.open(device)
    try:
        result = evaluate(model, tok, c)
    except CorpusError as e:
        if c.task == "lm" and "conversations" in str(e):
            raise CorpusError(f"{e}; for an instruction set use task=sft") from None
        raise
    print(summary(result, path, c))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, ensure_ascii=False))


def _verify(c: EvalConfig, device) -> None:
    model, tok, path = c.model.open(device)
    model.eval()
    result = verify(model, tok, held_out(limit=c.max_problems), c.decode.max_new_tokens, c.reply_batch)
    print(f"checkpoint   {path}")
    for name, r in result.items():
        print(
            f"{name:12} accuracy {r['accuracy']:.1%}, mean reward {r['reward']:.3f} over {r['n']:,} held-out problems"
        )
    print(json.dumps(result, ensure_ascii=False))


def main() -> None:
    sys.argv[1:] = quote_text_overrides(sys.argv[1:], ("checkpoint", "out_dir", "data.path"))
    with torch.no_grad():
        _main()


if __name__ == "__main__":
    main()
