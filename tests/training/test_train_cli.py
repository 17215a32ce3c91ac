"""End to end through the real CLI (`python -m rgpt.train`) on a tiny model and corpus in a temp directory.

Covers the run directory, every TensorBoard tag, pretrain -> SFT, exact resume (after max_epochs, mid-epoch
after max_steps, after Ctrl-C, after SIGKILL, from an older checkpoint when the newest is damaged), early
stopping with rollback, frozen attention, and one-line errors for bad configs and bad checkpoints.
One pretraining run and one straight 4-epoch run are shared by the tests of this module.
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rgpt.runtime import checkpoint as ckpt
from rgpt.training.diagnostics import GROUPS
from tests.helpers import ALL_OPTIONS, write_tiny_corpus

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 10  # 80 documents -> 74 training windows -> 19 micro-batches of 4 -> 10 steps of 2


# ---- a tiny corpus and the CLI ---------------------------------------------------------------------
@dataclass
class Corpus:
    pre: Path
    sft: Path
    cache: Path


def write_corpus(root: Path) -> Corpus:
    """80 short pretraining sentences and 60 dialogues, the same every time."""
    pre, sft = write_tiny_corpus(root, seed=0, n_pre=80, n_sft=60, n_subjects=12, n_words=6)
    return Corpus(pre, sft, root / "cache")


def cli_args(corpus: Corpus, out_dir, *extra, stage="pretrain", precision="fp32") -> list[str]:
    """The training command line of the CLI tests. precision is pinned: auto is bf16 on a CPU with AVX-512
    BF16 and fp32 elsewhere, so these tests would take another path on another machine; both precisions
    of every stage are run on purpose by tests/stages/test_precision_matrix.py."""
    files = corpus.pre if stage == "pretrain" else corpus.sft
    return [
        sys.executable,
        "-m",
        "rgpt.train",
        f"stage={stage}",
        "model=tiny",
        f"out_dir={out_dir}",
        f"data.files=[{files}]",
        f"tokenizer.files.pretrain=[{corpus.pre}]",
        f"tokenizer.files.sft=[{corpus.sft}]",
        f"data.cache_dir={corpus.cache}",
        "monitor.progress=false",
        "monitor.sample_tokens=8",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.warmup_steps=5",
        "train.cycle_steps=10",
        "threads=1",
        f"precision={precision}",
        *extra,
    ]


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "HYDRA_FULL_ERROR")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(args, rc=0) -> subprocess.CompletedProcess:
    """A command line (an entry point and its overrides) run from the repository; its exit status must be rc."""
    p = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == rc, f"exit {p.returncode} (want {rc})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def run_cli(corpus, out_dir, *extra, stage="pretrain", rc=0) -> subprocess.CompletedProcess:
    return run(cli_args(corpus, out_dir, *extra, stage=stage), rc=rc)


def run_dir(out_dir, stage="pretrain") -> Path:
    return Path(out_dir) / stage / "default"


def ckpts(out_dir, kind, stage="pretrain") -> list[Path]:
    return ckpt.list_checkpoints(run_dir(out_dir, stage) / "checkpoints", kind)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / ckpt.MODEL)


def assert_same_weights(a, b, what):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys(), f"{what}: parameter names differ"
    diff = {n: (wa[n] - wb[n]).abs().max().item() for n in wa if not torch.equal(wa[n], wb[n])}
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {sorted(diff.items())[:3]} (max abs diff)"


def history(path) -> list[dict]:
    return [
        {k: v for k, v in h.items() if k != "elapsed"}
        for h in json.loads((path / ckpt.STATE).read_text())["history"]
    ]


def tensorboard(run: Path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def scalar_curve(run: Path, tag="train/loss") -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in tensorboard(run).Scalars(tag)]


def copy_out_dir(src, dst) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    return Path(dst)


# ---- shared runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pretrain(corpus, tmp_path_factory):
    """A 2-epoch pretraining run (20 steps); tests copy its out_dir before changing anything."""
    out = tmp_path_factory.mktemp("pretrain")
    proc = run_cli(corpus, out, "train.max_epochs=2")
    return out, proc


@pytest.fixture(scope="module")
def straight4(corpus, tmp_path_factory):
    """The reference for every resume test: 4 epochs (40 steps) in one go, same settings."""
    out = tmp_path_factory.mktemp("straight4")
    run_cli(corpus, out, "train.max_epochs=4")
    (final,) = ckpts(out, "final")
    return out, final


def assert_equals_straight_run(out, straight4, what):
    ref_out, ref_final = straight4
    (final,) = [p for p in ckpts(out, "final") if p.name == ref_final.name]
    assert_same_weights(final, ref_final, f"{what}: final parameters")
    assert history(final) == history(ref_final), f"{what}: per-epoch loss history differs"
    got, want = scalar_curve(run_dir(out)), scalar_curve(run_dir(ref_out))
    steps = [s for s, _ in got]
    assert steps == sorted(set(steps)), f"{what}: train/loss steps repeat or go back: {steps}"
    assert got == want, f"{what}: train/loss curve differs from the straight run's"
    got, want = scalar_curve(run_dir(out), "val/loss"), scalar_curve(run_dir(ref_out), "val/loss")
    assert got == want, f"{what}: val/loss curve {got} != {want}"


# ---- the run directory and TensorBoard ------------------------------------------------------------------
TAGS = [
    "train/loss",
    "train/ppl",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_sec",
    "train/eta_sec",
    "train/eta_epoch_sec",
    "val/loss",
    "val/ppl",
]


def test_pretrain_writes_the_run_directory_and_every_tensorboard_tag(pretrain):
    out, proc = pretrain
    run = run_dir(out)
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events file"
    kinds = {p.name.split("-")[0] for p in (run / "checkpoints").iterdir()}
    assert kinds == {"last", "best", "final"}, f"checkpoint kinds {kinds}"
    for kind in ("last", "best", "final"):
        for path in ckpts(out, kind):
            files = {f.name for f in path.iterdir()}
            assert files == {ckpt.MODEL, ckpt.OPTIM, ckpt.VOCAB, ckpt.STATE}, f"{path.name}: {files}"
            ckpt.read_state(path)
    assert [p.name for p in ckpts(out, "last")] == ["last-00000020"], "only the newest `last` is kept"
    assert [p.name for p in ckpts(out, "final")] == ["final-00000020"]

    acc = tensorboard(run)
    scalars = acc.Tags()["scalars"]
    missing = [t for t in TAGS if t not in scalars]
    assert not missing, f"missing TensorBoard scalars {missing}; have {scalars}"
    assert [t for t in scalars if t.startswith("time/")], f"no time/* scalars in {scalars}"
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20]
    for tag in TAGS:
        values = [e.value for e in acc.Scalars(tag)]
        assert all(math.isfinite(v) for v in values), f"{tag}: {values}"
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("sample")]
    assert texts, f"no text sample; tensors {acc.Tags()['tensors']}"
    (sample, *_) = acc.Tensors(texts[0])
    assert "→" in sample.tensor_proto.string_val[0].decode("utf-8")
    (eta, *_) = acc.Tensors("eta/text_summary")
    assert "(max_epochs)" in eta.tensor_proto.string_val[0].decode("utf-8"), "the ETA names its budget"

    assert "done: reached max_epochs=2." in proc.stdout
    assert "Traceback" not in proc.stderr
    diag = [t for t in scalars if t.split("/")[0] in (*GROUPS, "gradcheck")]
    assert not diag and not acc.Tags()["histograms"], f"diagnostics are off by default, yet {diag[:3]}"
    assert not acc.Tags()["images"], "attention images every 100 steps: none in 20"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # the probes read bf16 activations in bf16
def test_diagnostics_gradient_check_and_attention_images_reach_tensorboard(
    corpus, pretrain, tmp_path, precision
):
    out = tmp_path / "out"
    proc = run(
        cli_args(
            corpus,
            out,
            "train.max_steps=4",
            "monitor.diagnostics=true",
            "monitor.diagnostics_every=2",
            "monitor.gradcheck_every=3",
            "monitor.attention_every=2",
            precision=precision,
        )
    )
    assert f"precision {precision}" in proc.stdout
    acc = tensorboard(run_dir(out))
    scalars = acc.Tags()["scalars"]
    for group in GROUPS:
        tags = [t for t in scalars if t.startswith(group + "/")]
        assert tags, f"no {group}/* scalars in {scalars}"
        assert [e.step for e in acc.Scalars(tags[0])] == [2, 4], tags[0]
    names = list(weights(ckpts(out, "last")[0]))
    assert sorted(acc.Tags()["histograms"]) == sorted(f"{k}/{n}" for k in ("grads", "weights") for n in names)
    assert "update_ratio/h.0.attn.c_attn.weight" in scalars and "attn_entropy/h.1.head_3" in scalars
    assert sorted(acc.Tags()["images"]) == ["attention/layer_0", "attention/layer_1"]
    assert [e.step for e in acc.Images("attention/layer_0")] == [2, 4]
    (check,) = acc.Scalars("gradcheck/worst_rel_error")
    assert check.step == 3 and check.value < 1e-6, check
    assert "step 3: gradient check along" in proc.stdout and "GRADIENT CHECK FAILED" not in proc.stdout
    assert "diagnostics" in proc.stdout.split("time: ")[1], "the time report counts the diagnostics' cost"
    # none of it changes the run: the same loss curve as the default run's first 4 steps (the shared run is fp32)
    plain = pretrain[0] if precision == "fp32" else tmp_path / "plain"
    if precision != "fp32":
        run(cli_args(corpus, plain, "train.max_steps=4", precision=precision))
    assert scalar_curve(run_dir(out)) == scalar_curve(run_dir(plain))[:4]


def test_same_seed_and_settings_give_the_same_loss_curve(corpus, pretrain, tmp_path):
    out, _ = pretrain
    run_cli(corpus, tmp_path, "train.max_epochs=2")
    (a,), (b,) = ckpts(out, "final"), ckpts(tmp_path, "final")
    assert history(a) == history(b), "per-epoch losses differ between two identical runs"
    assert scalar_curve(run_dir(out)) == scalar_curve(run_dir(tmp_path)), "train/loss curves differ"
    assert_same_weights(a, b, "two identical runs")
    assert scalar_curve(run_dir(out), "val/loss") != [], "no validation curve"


# ---- pretrain -> SFT --------------------------------------------------------------------------------------
def test_sft_resume_starts_from_the_pretrained_best(corpus, pretrain, tmp_path):
    out = copy_out_dir(pretrain[0], tmp_path / "out")
    best = ckpt.find(run_dir(out) / "checkpoints", "best")
    proc = run_cli(corpus, out, "resume=true", "train.max_epochs=1", stage="sft")
    assert "starting instruction tuning from the pretrained model" in proc.stdout and str(best) in proc.stdout
    sft_run = run_dir(out, "sft")
    assert (sft_run / ".hydra").is_dir() and list(sft_run.glob("events.out.tfevents.*"))
    (final,) = ckpts(out, "final", stage="sft")
    assert (final / ckpt.VOCAB).read_bytes() == (best / ckpt.VOCAB).read_bytes(), "SFT changed the vocabulary"
    state = ckpt.read_state(final)
    assert state["stage"] == "sft" and state["step"] > 0
    # SFT moved away from the pretrained weights it started from
    wa, wb = weights(final), weights(best)
    assert any(not torch.equal(wa[n], wb[n]) for n in wa)


def test_sft_without_a_pretrained_model_says_to_pretrain_first(corpus, tmp_path):
    proc = run_cli(corpus, tmp_path, "resume=true", stage="sft", rc=1)
    assert_one_line_error(proc, "stage=pretrain")
    assert "first" in proc.stderr


def test_split_digits_reaches_the_checkpoints_vocabulary(corpus, tmp_path):
    """tokenizer.split_digits=true: the vocabulary saved with the model has no word with a digit, and the
    model trained on the numbers spelled digit by digit."""
    numbers = tmp_path / "numbers.jsonl"
    lines = [f"{a}加{b}等于{a + b}。{a + b}是一个数。" for a in range(10, 40) for b in (11, 22)]
    numbers.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), "utf-8")
    digits = Corpus(numbers, corpus.sft, tmp_path / "cache")
    run_cli(digits, tmp_path / "words", "train.max_epochs=1")
    run_cli(digits, tmp_path / "digits", "train.max_epochs=1", "tokenizer.split_digits=true")
    words = json.loads((ckpts(tmp_path / "words", "final")[-1] / ckpt.VOCAB).read_text("utf-8"))
    vocab = json.loads((ckpts(tmp_path / "digits", "final")[-1] / ckpt.VOCAB).read_text("utf-8"))
    assert {"33", "44"} <= set(words["tokens"]) and "split_digits" not in words["settings"]
    assert vocab["settings"]["split_digits"] is True
    assert [t for t in vocab["tokens"] if len(t) > 1 and any(c.isdigit() for c in t)] == []
    assert set("0123456789") <= set(vocab["tokens"])


def test_freeze_attn_keeps_attention_weights_and_trains_the_rest(corpus, pretrain, tmp_path):
    out = copy_out_dir(pretrain[0], tmp_path / "out")
    best = ckpt.find(run_dir(out) / "checkpoints", "best")
    # weight decay on: a frozen weight must not decay either
    run_cli(
        corpus,
        out,
        "resume=true",
        "train.max_epochs=1",
        "train.freeze_attn=true",
        "train.weight_decay=0.1",
        stage="sft",
    )
    (final,) = ckpts(out, "final", stage="sft")
    start, end = weights(best), weights(final)
    attn = [n for n in start if ".attn." in n]
    assert attn, "no attention parameters found by name"
    moved = [n for n in attn if not torch.equal(start[n], end[n])]
    assert not moved, f"frozen attention weights changed: {moved}"
    rest = [n for n in start if n not in attn]
    still = [n for n in rest if torch.equal(start[n], end[n])]
    assert not still, f"non-attention weights did not train: {still}"


# ---- exact resume ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_max_epochs_is_bit_identical_to_a_straight_run(corpus, pretrain, straight4, tmp_path):
    out = copy_out_dir(pretrain[0], tmp_path / "out")  # run A: 2 epochs
    proc = run_cli(corpus, out, "resume=true", "train.max_epochs=4")
    assert "resuming" in proc.stdout and "last-00000020" in proc.stdout
    assert_equals_straight_run(out, straight4, "2 epochs + resume to 4")


@pytest.mark.slow
def test_stop_mid_epoch_by_max_steps_then_resume_is_bit_identical(corpus, pretrain, straight4, tmp_path):
    out = copy_out_dir(pretrain[0], tmp_path / "out")
    proc = run_cli(corpus, out, "resume=true", "train.max_epochs=4", "train.max_steps=25")
    assert "max_steps=25" in proc.stdout
    (last,) = ckpts(out, "last")
    state = ckpt.read_state(last)
    assert (state["step"], state["epoch"]) == (25, 2), "`last` is not where max_steps stopped"
    assert state["pos"] == 10, f"`last` holds no mid-epoch position (pos {state['pos']})"
    run_cli(corpus, out, "resume=true", "train.max_epochs=4")
    assert_equals_straight_run(out, straight4, "stop at step 25 + resume")


@pytest.mark.slow
def test_sft_with_replay_stops_mid_epoch_and_resumes_bit_identically(corpus, pretrain, tmp_path):
    """The replay pool rotates by epoch: a run stopped mid-epoch resumes onto the same windows."""
    replay = [f"data.replay_files=[{corpus.pre}]", "data.replay_fraction=0.5", "data.replay_ratio=0.5"]
    straight = copy_out_dir(pretrain[0], tmp_path / "straight")
    proc = run_cli(corpus, straight, "resume=true", "train.max_epochs=3", *replay, stage="sft")
    assert "windows an epoch (data.replay_ratio=0.5)" in proc.stdout, proc.stdout
    split = copy_out_dir(pretrain[0], tmp_path / "split")
    run_cli(corpus, split, "resume=true", "train.max_epochs=3", "train.max_steps=7", *replay, stage="sft")
    proc = run_cli(corpus, split, "resume=true", "train.max_epochs=3", *replay, stage="sft")
    assert "resumed at epoch 1" in proc.stdout, proc.stdout
    final = [ckpt.find(run_dir(out, "sft") / "checkpoints", "final") for out in (straight, split)]
    assert_same_weights(*final, "sft with replay: stop at step 7 + resume")


@pytest.mark.slow
def test_every_architecture_option_resumes_bit_identically(corpus, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli(corpus, straight, "train.max_epochs=3", *ALL_OPTIONS)
    run_cli(corpus, split, "train.max_epochs=2", *ALL_OPTIONS)
    proc = run_cli(corpus, split, "resume=true", "train.max_epochs=3", *ALL_OPTIONS)
    assert "resuming" in proc.stdout and "checkpoint's architecture" not in proc.stdout, proc.stdout
    (final,) = ckpts(straight, "final")
    assert "lm_head.weight" not in weights(final), "the tied head must not save a weight of its own"
    assert_equals_straight_run(split, (straight, final), "every option: 2 epochs + resume to 3")


def assert_one_line_error(proc, *needles):
    err = proc.stderr.strip()
    assert proc.returncode == 1, f"exit {proc.returncode}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert err.startswith("error: ") and "\n" not in err, f"not a one-line error:\n{proc.stderr}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


@pytest.mark.slow
def test_sigint_saves_last_exits_130_and_resume_continues(corpus, straight4, tmp_path):
    proc = subprocess.Popen(
        cli_args(corpus, tmp_path, "train.max_epochs=4"),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # the banner is printed once the signal handlers are in place
        lines.append(line)
        if "parameters" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    stdout = "".join(lines) + out
    assert proc.returncode == 130, f"exit {proc.returncode}\n{stdout}\n{err}"
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped by SIGINT")]
    assert len(stopped) == 1 and "resume=true" in stopped[0], stdout
    assert "Traceback" not in err
    (last,) = ckpts(tmp_path, "last")
    step = ckpt.read_state(last)["step"]
    assert 1 <= step < 4 * STEPS_PER_EPOCH, f"interrupted at step {step}: the signal came too late"
    resumed = run_cli(corpus, tmp_path, "resume=true", "train.max_epochs=4")
    assert f"resuming {last}" in resumed.stdout
    assert_equals_straight_run(tmp_path, straight4, f"Ctrl-C at step {step} + resume")


@pytest.mark.slow
def test_resume_after_sigkill_starts_from_an_intact_checkpoint(corpus, tmp_path):
    proc = subprocess.Popen(
        cli_args(corpus, tmp_path, "train.max_epochs=500", "train.patience=500"),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not ckpts(tmp_path, "last") and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.3))  # somewhere in a later epoch, perhaps mid-save
    proc.kill()
    proc.wait()
    for kind in ckpt.CHECKPOINT_KINDS:
        for path in ckpts(tmp_path, kind):
            ckpt.read_state(path)  # every directory under a real name is intact
    steps = max(int(p.name.split("-")[1]) for p in ckpts(tmp_path, "last"))
    resumed = run_cli(corpus, tmp_path, "resume=true", f"train.max_steps={steps + 3}", "train.max_epochs=500")
    assert "resuming" in resumed.stdout
    assert ckpt.read_state(ckpts(tmp_path, "final")[0])["step"] == steps + 3


@pytest.mark.slow
def test_resume_skips_a_damaged_newest_last_and_says_so(corpus, pretrain, straight4, tmp_path):
    out = copy_out_dir(pretrain[0], tmp_path / "out")
    cdir = run_dir(out) / "checkpoints"
    shutil.copytree(cdir / "best-00000010", cdir / "last-00000010")  # an older intact `last`
    damaged = cdir / "last-00000020" / ckpt.MODEL
    damaged.write_bytes(damaged.read_bytes()[:-100])
    proc = run_cli(corpus, out, "resume=true", "train.max_epochs=4")
    assert "skipping damaged checkpoint" in proc.stdout and str(damaged) in proc.stdout
    assert f"resuming {cdir / 'last-00000010'}" in proc.stdout
    assert_equals_straight_run(out, straight4, "resume from step 10 past a damaged step-20 `last`")
    assert [p.name for p in ckpts(out, "last")] == ["last-00000040"], "the damaged `last` outlived the run"


def test_resume_without_an_intact_last_uses_the_newest_intact_checkpoint(corpus, pretrain, tmp_path):
    out = copy_out_dir(pretrain[0], tmp_path / "out")
    cdir = run_dir(out) / "checkpoints"
    state = cdir / "last-00000020" / ckpt.STATE
    state.write_text(state.read_text()[:50])
    proc = run_cli(corpus, out, "resume=true", "train.max_epochs=2")
    assert "no intact `last` checkpoint; resuming from the newest intact one" in proc.stdout
    assert "-00000020" in proc.stdout.split("newest intact one")[1].splitlines()[0]


# ---- early stopping -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_early_stopping_rolls_back_to_the_best_weights_even_across_a_resume(corpus, tmp_path):
    # min_delta huge: only the first epoch improves (on infinity), so epochs 2, 3, 4 are "bad" and
    # patience=3 stops after epoch 4; the resume after epoch 2 must still roll back to epoch 1's weights
    knobs = ("train.min_delta=1e9", "train.patience=3")
    run_cli(corpus, tmp_path, "train.max_epochs=2", *knobs)
    proc = run_cli(corpus, tmp_path, "resume=true", "train.max_epochs=10", *knobs)
    assert "early stopping" in proc.stdout and "rolled back" in proc.stdout, proc.stdout
    final = ckpts(tmp_path, "final")[0]  # the newest; the first run left final-00000020
    assert ckpt.read_state(final)["epoch"] == 4
    best = ckpt.find(run_dir(tmp_path) / "checkpoints", "best")
    assert best.name == "best-00000010"
    assert_same_weights(final, best, "final after early stopping vs best")
    (last,) = ckpts(tmp_path, "last")
    assert any(not torch.equal(a, b) for a, b in zip(weights(last).values(), weights(final).values()))


# ---- invalid configurations and checkpoints ---------------------------------------------------------------
@pytest.mark.parametrize(
    "override, needle",
    [
        ("stage=finetune", "stage"),
        ("model=huge", "model"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=fast", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("device=tpu", "device"),
        ("+train.bogus=1", "train.bogus"),
        ("data.files=[/nonexistent/corpus.jsonl]", "/nonexistent/corpus.jsonl"),
        ("data.replay_fraction=0.1", "data.replay_fraction"),
        ("data.workers=0", "data.workers"),
    ]
    + ([] if torch.cuda.is_available() else [("device=cuda", "device=cuda")]),
)
def test_invalid_config_is_a_one_line_error_naming_the_key(corpus, tmp_path, override, needle):
    if override.startswith("stage="):  # cli_args sets the stage; a second stage= would be a Hydra error
        args = [a for a in cli_args(corpus, tmp_path) if not a.startswith("stage=")] + [override]
    else:
        args = cli_args(corpus, tmp_path, override)
    proc = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, needle)
    assert not list(Path(tmp_path).glob("*/*/checkpoints")), "checkpoints written despite the error"


def test_an_override_of_a_key_not_in_the_config_is_one_line_without_traceback(corpus, tmp_path):
    proc = run_cli(corpus, tmp_path, "train.bogus=1", rc=1)
    assert (
        proc.stderr
        == "error: unknown key 'train.bogus' (see `python -m rgpt.train --cfg job` for every key)\n"
    ), proc.stderr
    assert not list(Path(tmp_path).glob("*/*/checkpoints"))


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[:-64])


def _corrupt_state(f: Path):
    f.write_text(f.read_text()[:-20])


def _flip_byte(f: Path):
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content: only the checksum can tell
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "name, damage, needle",
    [
        (None, None, "checkpoint not found"),
        (ckpt.MODEL, _truncate, "truncated"),
        (ckpt.STATE, _corrupt_state, "corrupted"),
        (ckpt.OPTIM, _flip_byte, "checksum"),
    ],
)
def test_bad_resume_from_is_a_one_line_error_naming_the_file(
    corpus, pretrain, tmp_path, name, damage, needle
):
    src = run_dir(pretrain[0]) / "checkpoints" / "last-00000020"
    path = tmp_path / "copy"
    if name is None:
        path = tmp_path / "no-such-checkpoint"
    else:
        shutil.copytree(src, path)
        damage(path / name)
    proc = run_cli(corpus, tmp_path / "out", f"resume_from={path}", rc=1)
    assert_one_line_error(proc, needle, str(path / name) if name else str(path))
    assert not list((tmp_path / "out").glob("*/*/checkpoints"))


def test_weights_only_starts_a_fresh_run_from_a_checkpoint_of_the_same_stage(corpus, pretrain, tmp_path):
    """resume_from a checkpoint of the same stage resumes it exactly; with weights_only=true it only gives
    the weights: a new run from step 0 (as sft on the tasks' warm-up on top of an sft model)."""
    src = run_dir(pretrain[0]) / "checkpoints" / "last-00000020"
    out = tmp_path / "out"
    proc = run_cli(corpus, out, f"resume_from={src}", "weights_only=true", "train.max_steps=3")
    assert f"starting from the weights of {src}" in proc.stdout + proc.stderr
    assert [p.name for p in ckpts(out, "final")] == ["final-00000003"], "a fresh run counts its own steps"
    w0, w3 = weights(src), weights(ckpts(out, "final")[0])
    assert all(w0[k].shape == w3[k].shape for k in w0) and any(not torch.equal(w0[k], w3[k]) for k in w0)
    proc = run_cli(corpus, tmp_path / "none", "weights_only=true", rc=1)
    assert_one_line_error(proc, "weights_only", "resume_from")


# ---- the non-finite guard (in process) ----------------------------------------------------------------
def make_trainer(corpus, out_dir, *extra):
    """A Trainer on the same settings the CLI tests use, built in this process so it can be patched."""
    from hydra import compose, initialize_config_dir

    from rgpt.cli import CONF_DIR
    from rgpt.stages import STAGES
    from rgpt.train import load_run_config  # importing it registers the ${corpus:...} resolver
    from rgpt.training.loop import Trainer

    overrides = cli_args(corpus, out_dir, *extra)[3:]  # drop `python -m rgpt.train`
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = load_run_config(compose(config_name="config", overrides=overrides))
    logs = []
    return Trainer(cfg, STAGES[cfg.stage], torch.device("cpu"), log=logs.append), logs


def poison(trainer, when):
    """Make the training loss NaN whenever when(trainer) is true (validation too if `when` says so)."""
    model, forward = trainer.model, trainer.model.forward

    def patched(idx, targets=None):
        loss = forward(idx, targets)
        return loss * math.nan if when(trainer) else loss

    model.forward = patched


def test_non_finite_steps_are_skipped_reported_and_leave_the_weights_alone(corpus, tmp_path):
    tr, logs = make_trainer(corpus, tmp_path, "train.max_epochs=1", "checkpoint.strategy=none")
    poison(tr, lambda t: t.model.training and t.step in (3, 4))  # steps 4 and 5 (1-based) go bad
    step, moved = tr.train_step, {}

    def watched(group):
        before = tr.model.store.data.clone()
        out = step(group)
        moved[tr.step] = not torch.equal(before, tr.model.store.data)
        return out

    tr.train_step = watched
    result = tr.run()
    warnings = [line for line in logs if "non-finite" in line]
    assert warnings == [
        "warning: non-finite loss/gradient at step 4 (update skipped)",
        "warning: non-finite loss/gradient at step 5 (update skipped)",
    ], warnings
    assert {s for s, m in moved.items() if not m} == {4, 5}, f"weights moved on a skipped step: {moved}"
    assert result["reason"] == "reached max_epochs=1" and result["step"] == STEPS_PER_EPOCH
    assert all(math.isfinite(h["train_loss"]) for h in result["history"])


def test_max_bad_steps_in_a_row_stop_the_run_with_a_message(corpus, tmp_path):
    from rgpt.training.loop import Stop

    # a huge learning rate blows the weights up after the first update: every later loss is non-finite
    tr, logs = make_trainer(
        corpus, tmp_path, "train.lr=1e30", "train.warmup_steps=0", "train.max_bad_steps=3"
    )
    with pytest.raises(Stop, match="3 non-finite steps in a row"):
        tr.run()
    assert len([line for line in logs if "non-finite" in line]) == 3
    assert not ckpts(tmp_path, "best"), "a best checkpoint was saved from a non-finite run"


def test_a_non_finite_epoch_is_never_saved_as_best(corpus, tmp_path):
    # every step of epoch 2 and its validation are NaN (max_bad_steps high so the run goes on); with
    # train_loss monitored an all-skipped epoch must not count as a 0.0 loss either
    tr, logs = make_trainer(
        corpus, tmp_path, "train.max_epochs=3", "train.max_bad_steps=100", "train.monitor=train_loss"
    )
    poison(tr, lambda t: t.epoch == 1)
    result = tr.run()
    losses = [(h["train_loss"], h["val_loss"]) for h in result["history"]]
    assert all(math.isfinite(x) for x in losses[0] + losses[2]) and all(math.isnan(x) for x in losses[1])
    bests = ckpts(tmp_path, "best")
    assert [p.name for p in bests] == ["best-00000030", "best-00000010"], [p.name for p in bests]
    for p in bests:
        assert math.isfinite(ckpt.read_state(p)["monitor_value"])
    assert all(torch.isfinite(t).all() for t in weights(ckpts(tmp_path, "final")[0]).values())
