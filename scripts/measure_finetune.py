"""The README's LoRA-vs-full-SFT and DPO-after-SFT measurements, with the real CLIs on the built-in corpus.

    python scripts/measure_finetune.py --pairs rgpt/corpus/dpo [--out outputs/measure17] [--model small]

Runs, in --out (run_name m17): pretrain, full sft and lora (same epochs, from the same pretrained model),
merges the adapters, then dpo from the full sft model. Prints one JSON object and a Markdown summary:
- trainable parameters, Adam state bytes (optimizer.safetensors), weights-file bytes, seconds per epoch
  (state.json's elapsed over the epochs) and, measured in this process with the two variants taking turns,
  the ratio of their step times; greedy exact match on the first --em taught dialogues (rgpt.eval);
- the held-out preference pairs (the dpo stage's hash split) scored by the sft model and the dpo model:
  how often log π(chosen) > log π(rejected), and DPO's implicit-reward accuracy against the sft model;
  taught-dialogue exact match before and after; greedy replies to a few prompts before and after.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from rgpt.data.preference import prepare_pairs  # noqa: E402
from rgpt.nn.lora import Adapters, LoRASettings  # noqa: E402
from rgpt.nn.optim import Adam  # noqa: E402
from rgpt.runtime import checkpoint as ckpt  # noqa: E402
from rgpt.stages.dpo import score_pairs  # noqa: E402

PROMPTS = ["山脉是如何形成的？", "你好", "3加5等于几？", "天为什么会下雪？", "你能帮我写作业吗？"]


def cli(module: str, *args: str) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(f"  {module} {' '.join(args[:3])} … {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return proc.stdout


def best(out: Path, stage: str) -> Path:
    d = out / stage / "m17" / "checkpoints"
    return ckpt.find(d, "best") or ckpt.find(d, "final")


def taught_subset(path: Path, n: int) -> Path:
    """The first n dialogues of the built-in set that the sft stage trains on (its hash split)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark import split_dialogues

    taught = split_dialogues(path.parent)["taught"]
    lines = taught.read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def exact_match(checkpoint: Path, data: Path) -> float:
    out = cli("rgpt.eval", f"checkpoint={checkpoint}", f"data.path={data}", "task=sft", "threads=1")
    return json.loads(out.strip().splitlines()[-1])["exact_match"]


def replies_to(checkpoint: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "rgpt.chat", f"checkpoint={checkpoint}", "threads=1", "max_new_tokens=60"],
        cwd=REPO,
        input="\n".join(PROMPTS) + "\n",
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    return proc.stdout.strip().splitlines()


def step_time_ratio(base: Path, lora: LoRASettings, rounds: int = 5, steps: int = 4) -> dict:
    """Seconds per training step (forward, backward, clipping-free Adam) of full tuning and of LoRA, the two
    taking turns in this process on the same random batch of 8 x 64 tokens."""
    models = {}
    for kind in ("full", "lora"):
        model, _, _ = ckpt.load_model(base)
        model.train()
        store = model.store if kind == "full" else Adapters(model, lora).store
        models[kind] = (model, store, Adam(store))
    V = models["full"][0].config.vocab_size
    idx, targets = torch.randint(6, V, (8, 64)), torch.randint(6, V, (8, 64))
    times = {k: [] for k in models}
    for _ in range(rounds):
        for kind, (model, store, opt) in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                store.zero_grad()
                model.forward(idx, targets)
                model.backward()
                opt.step(1e-4)
            times[kind].append((time.perf_counter() - t0) / steps)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"full_s": med["full"], "lora_s": med["lora"], "lora_over_full": med["lora"] / med["full"]}


def preference_scores(pairs, sft: Path, dpo: Path, beta: float) -> dict:
    sft_model, tok, _ = ckpt.load_model(sft)
    dpo_model, _, _ = ckpt.load_model(dpo)
    _, val = prepare_pairs([pairs], tok, sft_model.config.block_size, 0.1, log=lambda *a: None)
    ref_c, ref_r = score_pairs(sft_model, val, 16)
    c, r = score_pairs(dpo_model, val, 16)
    margin = beta * ((c - ref_c) - (r - ref_r))
    return {
        "held_out_pairs": len(val),
        "logp_accuracy_before": float((ref_c > ref_r).double().mean()),
        "logp_accuracy_after": float((c > r).double().mean()),
        "reward_accuracy_after": float((margin > 0).double().mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", required=True, help="the preference pairs (file or directory)")
    p.add_argument("--out", default="outputs/measure17")
    p.add_argument("--model", default="small")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--sft-epochs", type=int, default=5)
    p.add_argument("--dpo-lr", default="1e-5")
    p.add_argument("--em", type=int, default=300, help="taught dialogues for exact match")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    common = [f"model={a.model}", f"out_dir={out}", "run_name=m17", "monitor.progress=false", "threads=1"]
    sft_steps = -(-2205 // 16) * a.sft_epochs  # one cosine cycle over the stage, as rgpt/conf/stage/sft.yaml
    tune = [f"train.max_epochs={a.sft_epochs}", f"train.cycle_steps={sft_steps}"]
    pairs = f"data.files=[{Path(a.pairs).resolve()}]"
    stages = {
        "pretrain": ["stage=pretrain", f"train.max_epochs={a.pretrain_epochs}", "train.patience=100"],
        "sft": ["stage=sft", "resume=true", *tune],
        "lora": ["stage=lora", "resume=true", *tune],
        "dpo": ["stage=dpo", "resume=true", pairs, f"train.lr={a.dpo_lr}"],
    }
    for stage, args in stages.items():  # a stage already run to its end in --out is kept
        if ckpt.find(out / stage / "m17" / "checkpoints", "final") is None:
            cli("rgpt.train", *args, *common)
        if stage == "lora" and ckpt.find(out / "lora" / "m17" / "merged", "final") is None:
            cli("rgpt.lora", "merge", str(out / "lora" / "m17"))

    em_data = taught_subset(out / "taught_first.jsonl", a.em)
    sft, lora_ckpt = best(out, "sft"), best(out, "lora")
    merged = ckpt.find(out / "lora" / "m17" / "merged", "final")
    dpo = ckpt.find(out / "dpo" / "m17" / "checkpoints", "final")
    result = {"model": a.model, "pretrain_epochs": a.pretrain_epochs, "sft_epochs": a.sft_epochs}
    for name, c, weights in (("full", sft, ckpt.MODEL), ("lora", lora_ckpt, ckpt.ADAPTER)):
        st = ckpt.read_state(c)
        final = ckpt.find(c.parent, "final")
        fst = ckpt.read_state(final)
        result[name] = {
            "checkpoint": str(c),
            "weights_bytes": st["files"][weights]["bytes"],
            "optimizer_bytes": st["files"][ckpt.OPTIM]["bytes"],
            "seconds_per_epoch": fst["elapsed"] / max(fst["epoch"], 1),
            "final_train_loss": fst["history"][-1]["train_loss"],
        }
    lora_cfg = LoRASettings()
    result["lora"]["trainable"] = Adapters(ckpt.load_model(sft)[0], lora_cfg).store.numel()
    result["full"]["trainable"] = ckpt.load_model(sft)[0].num_params()
    result["step_time"] = step_time_ratio(best(out, "pretrain"), lora_cfg)
    result["full"]["exact_match"] = exact_match(sft, em_data)
    result["lora"]["exact_match"] = exact_match(merged, em_data)
    result["dpo"] = preference_scores(Path(a.pairs), sft, dpo, 0.1)
    result["dpo"]["exact_match_after"] = exact_match(dpo, em_data)
    result["dpo"]["lr"] = a.dpo_lr
    result["replies"] = {"prompts": PROMPTS, "sft": replies_to(sft), "dpo": replies_to(dpo)}
    print(json.dumps(result, ensure_ascii=False, indent=1))
    (out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
