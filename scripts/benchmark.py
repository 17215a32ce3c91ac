"""The README's benchmark row for one model: held-out bits per character and dialogue scores, and its
replies to ten questions that no corpus contains.

    python scripts/benchmark.py CHECKPOINT [--data data] [--out outputs/benchmarks.jsonl]

CHECKPOINT is a run, checkpoints/ or checkpoint directory, as for `python -m rgpt.eval`. Measured with the
real CLIs, one process each:
- bits/char on data/news/heldout.txt (never trained on) and data/mix/heldout.txt (the slice of every
  fetched source held out by document hash), where `python -m rgpt.data.fetch news|mix` put them;
- exact match and char F1 of greedy replies on the built-in dialogues: the taught ones (the training
  split) and the held-out ones (the validation split, chosen by the same hash as training's);
- the greedy reply to each line of benchmarks/unseen_questions.txt.
Prints a Markdown row and the replies; appends everything as one JSON line to --out.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rgpt.data import CORPUS_DIR  # noqa: E402
from rgpt.data.corpus import read_dialogues  # noqa: E402
from rgpt.data.dataset import DataConfig, in_val  # noqa: E402
from rgpt.data.tokenizer import normalise  # noqa: E402

QUESTIONS = REPO / "benchmarks" / "unseen_questions.txt"
VAL_FRACTION = DataConfig.val_fraction  # the split sft trains with by default (DataConfig's default)


def split_dialogues(tmp: Path) -> dict[str, Path]:
    """The built-in dialogues as training's hash split cut them: taught (train) and held-out (val)."""
    out = {"taught": [], "held_out": []}
    for turns in read_dialogues([str(CORPUS_DIR / "sft")]):
        turns = [(role, normalise(c)) for role, c in turns]
        key = "held_out" if in_val(json.dumps(turns, ensure_ascii=False), VAL_FRACTION) else "taught"
        out[key].append({"conversations": [{"role": r, "content": c} for r, c in turns]})
    paths = {}
    for key, records in out.items():
        paths[key] = tmp / f"{key}.jsonl"
        paths[key].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return paths


def run(module: str, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],  # in the caller's directory: its paths are relative to it
        input=stdin,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0:
        sys.exit(f"error: {module} {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def evaluate(checkpoint: str, path: Path, task: str) -> dict:
    out = run("rgpt.eval", f"checkpoint={checkpoint}", f"data.path={path}", f"task={task}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="data", help="where `python -m rgpt.data.fetch` put news/ and mix/")
    p.add_argument("--out", default="outputs/benchmarks.jsonl", help="results are appended here")
    args = p.parse_args(argv)
    data = Path(args.data)
    for name in ("news", "mix"):
        if not (data / name / "heldout.txt").exists():
            sys.exit(
                f"error: {data / name / 'heldout.txt'} is missing: run `python -m rgpt.data.fetch {name}`"
            )
    t0, row = time.time(), {"checkpoint": args.checkpoint}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("news", "mix"):
            row[f"{name}_bpc"] = evaluate(args.checkpoint, data / name / "heldout.txt", "lm")["bpc"]
            print(f"{name} held-out: {row[f'{name}_bpc']:.3f} bits/char", file=sys.stderr, flush=True)
        for key, path in split_dialogues(Path(tmp)).items():
            r = evaluate(args.checkpoint, path, "sft")
            row[f"{key}_exact_match"], row[f"{key}_char_f1"] = r["exact_match"], r["char_f1"]
            print(
                f"{key} dialogues: exact match {r['exact_match']:.3f}, char F1 {r['char_f1']:.3f}",
                file=sys.stderr,
            )
    questions = QUESTIONS.read_text(encoding="utf-8").splitlines()
    replies = run(
        "rgpt.chat", f"checkpoint={args.checkpoint}", stdin="\n".join(questions) + "\n"
    ).splitlines()
    row["replies"] = dict(zip(questions, replies))
    row["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(
        f"| {args.checkpoint} | {row['news_bpc']:.2f} | {row['mix_bpc']:.2f} | "
        f"{row['taught_exact_match']:.1%} | {row['held_out_char_f1']:.2f} |"
    )
    for q, a in row["replies"].items():
        print(f"- {q} → {a}")


if __name__ == "__main__":
    main()
