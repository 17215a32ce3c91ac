"""Smoke tests of scripts/bench.py: its quickest settings on a tiny corpus print every table, with the ratio
columns filled in, and write the same report to --out. The figures themselves are not checked."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rgpt.nn.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench.py"
RATIO = re.compile(r"^\d+\.\d\d× \(\d+\.\d\d–\d+\.\d\d\)$")  # "1.23× (1.10–1.40)"


def write_corpus(tmp_path):
    pre, sft = tmp_path / "pre.txt", tmp_path / "sft.jsonl"
    facts = ["山脉是由地壳运动形成的", "降雨是水蒸气遇冷凝结的结果", "一年有四个季节", "长江是中国最长的河流"]
    pre.write_text("".join(f"{f}，这是第{i}句。\n" for i in range(6) for f in facts), encoding="utf-8")
    with open(sft, "w", encoding="utf-8") as f:
        for i in range(12):
            turns = [
                {"role": "user", "content": f"你好{i}"},
                {"role": "assistant", "content": f"你好！第{i}次。"},
            ]
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    return pre, sft


def run_bench(tmp_path, *extra) -> str:
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--no-compile", "--device", "cpu", "--threads", "1"]
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (
        f"bench.py exited with {proc.returncode}; stderr ends:\n{proc.stderr[-3000:]}"
    )
    assert out.read_text(encoding="utf-8").strip() == proc.stdout.strip(), (
        "--out differs from what was printed"
    )
    return proc.stdout


def rows(report: str, heading: str) -> list[dict]:
    """The rows of the Markdown table under `heading`, as {column: cell}."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, f"no table under {heading!r}:\n{section}"
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_quick_run_prints_training_generation_and_data_tables(tmp_path):
    pre, sft = write_corpus(tmp_path)
    report = run_bench(
        tmp_path, "--pretrain", str(pre), "--sft", str(sft), "--only", "train,generate,tokenizer,epoch"
    )
    assert report.startswith("# rgpt benchmark") and "- machine: " in report and "torch " in report

    train = rows(report, "## Training throughput")
    shapes = [(r["batch B×T"].rsplit("×", 1)[0], r["precision"]) for r in train]
    assert shapes == [
        (shape, prec) for shape in ("4", "2", "pretrain batch 4", "sft batch 2") for prec in ("fp32", "bf16")
    ], shapes
    for r in train[4:]:  # real corpus micro-batches: tokens counted, no FLOP count
        assert r["rgpt tok/s"][0].isdigit() and r["rgpt GFLOP/s"] == "—", r
    for r in train:
        assert r["compiled tok/s"] == "skipped", r
        if r["precision"] == "fp32" or not r["rgpt tok/s"].startswith("n/a"):
            assert RATIO.match(r["rgpt / autograd"]), f"ratio cell {r['rgpt / autograd']!r} in {r}"
            assert r["rgpt MFU"].endswith("%") or r in train[4:], r
    assert "× Rust ref" in train[0]

    gen = rows(report, "## Generation")
    fp32 = next(r for r in gen if r["precision"] == "fp32")
    assert RATIO.match(fp32["cache / recompute"]), fp32
    assert fp32["new tokens"] == "8", fp32  # --quick decodes 8 tokens
    assert fp32["same tokens"] == "yes" or fp32["same tokens"].startswith("no, from token"), fp32

    data = {r["what"]: r["result"] for r in rows(report, "## Data and a full epoch")}
    assert data["tokenizer, pretrain corpus"].endswith("chars/s") and data["tokenizer, sft corpus"].endswith(
        "chars/s"
    )
    epoch = next(v for k, v in data.items() if k.startswith("full pretraining epoch"))
    assert "tokens/s" in epoch, epoch
    assert "Model FLOPs per token = 6·N + 6·C·V + 12·L·T·C" in report and "≈ 300 tokens/s" in report


@pytest.mark.slow
def test_quick_run_measures_memory_in_child_processes_and_profiles(tmp_path):
    report = run_bench(tmp_path, "--vocab", "50", "--only", "memory,profile")
    (mem,) = rows(report, "## Peak memory of a training step")
    for impl in ("rgpt", "autograd"):
        cell = next(v for k, v in mem.items() if k.startswith(impl))
        assert re.match(r"^[\d,.]+ \(\+[\d,.e-]+\)$", cell), f"{impl} memory cell {cell!r}"
    # the quick model is so small that its growth may round to zero pages, leaving no ratio ("—")
    assert re.match(r"^(\d+\.\d\d|—)$", mem["rgpt / autograd"]), mem
    assert "Median phase times: forward" in report and "aten::" in report


def test_flop_formula_counts_the_models_matmul_weights():
    spec = importlib.util.spec_from_file_location("bench_measure", ROOT / "scripts" / "bench_measure.py")
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    cfg = GPTConfig(vocab_size=37, n_embd=16, n_head=4, n_layer=3, n_hidden=24, block_size=8)
    model = GPT(cfg)
    blocks = sum(
        p.numel()
        for n, p in model.params.items()
        if n.startswith("h.") and n.endswith(".weight") and p.dim() == 2
    )
    head = model.params["lm_head.weight"].numel()
    T = 5
    expected = 6 * blocks + 6 * head + 12 * cfg.n_layer * T * cfg.n_embd
    assert bm.flops_per_token(cfg, T) == expected, (bm.flops_per_token(cfg, T), expected)


@pytest.mark.slow
def test_the_load_test_runs_on_the_tiny_model():
    """scripts/load.py --tiny: a row per client count with every reply complete, the web and decoder CPU
    columns (the decoder's counted), the bare decode, no reply changed in company, and the in-process
    ceiling at each count, idle and beside a spin. Figures unchecked."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "load.py"),
        "--tiny",
        "--clients",
        "1,4",
        "--max-tokens",
        "8",
    ]
    cmd += ["--seconds", "0.2", "--threads", "1", "--bare", "--ceiling"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served, ceiling = proc.stdout.split("The ceiling")
    rows = [line.split("|")[1:-1] for line in served.splitlines() if re.match(r"^\| [14] \|", line)]
    assert [int(r[0]) for r in rows] == [1, 4] and all(int(r[-1]) == int(r[0]) for r in rows), proc.stdout
    head = next(line for line in proc.stdout.splitlines() if line.startswith("| clients"))
    assert "web CPU %" in head and "decoder CPU %" in head
    assert float(rows[1][head.split("|")[1:-1].index(" decoder CPU % ")]) > 0, "the decoder's CPU is counted"
    assert "bare KV-cache decode" in proc.stdout and "replies that changed in company of 4: 0" in proc.stdout
    limits = [line.split("|")[1:-1] for line in ceiling.splitlines() if re.match(r"^\| [14] \|", line)]
    assert [int(r[0]) for r in limits] == [1, 4] and all(float(r[2]) > 0 and float(r[4]) > 0 for r in limits)
    assert "4 rows ÷ 1 row in-process" in ceiling
