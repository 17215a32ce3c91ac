"""The research workflow around training: an honest ETA, train.log as the run goes, Hydra sweeps with a
directory per job, one-line errors for unknown keys in every entry point, and the emulated-bf16 notice."""

import math
import re
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rgpt import cli
from rgpt.cli import overrides
from rgpt.runtime import checkpoint as ckpt
from rgpt.runtime import device as rdevice
from rgpt.training.monitor import estimate_eta
from rgpt.training.settings import TrainSettings
from tests.fixtures_ckpt import run_cli as run_entry
from tests.training.test_train_cli import (
    REPO,
    assert_same_weights,
    ckpts,
    cli_args,
    cli_env,
    run_cli,
    scalar_curve,
    write_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


# ---- the ETA ----------------------------------------------------------------------------------------------
def simulate(
    t: TrainSettings, *, batches=100, sec_per_batch=0.5, tokens_per_batch=1000, minutes_left=math.inf
):
    """An ETA at every step of a simulated run with a fixed pace, and the time each budget really ends it."""
    tps = tokens_per_batch / sec_per_batch
    return lambda epoch, pos, step, bad=0: estimate_eta(
        t,
        epoch=epoch,
        pos=pos,
        batches=batches,
        step=step,
        tokens=(epoch * batches + pos) * tokens_per_batch,
        sec_per_batch=sec_per_batch,
        tokens_per_sec=tps,
        seconds_left=minutes_left * 60,
        bad_epochs=bad,
    )


def test_eta_is_the_time_to_the_budget_that_ends_the_run_first():
    base = TrainSettings(max_epochs=500, grad_accum=4, patience=30)
    eta = simulate(base)(epoch=2, pos=40, step=60)  # 100 batches an epoch at 0.5 s: 50 s an epoch
    assert (eta.budget, eta.epoch, eta.run) == ("max_epochs", 30.0, (498 * 100 - 40) * 0.5)
    eta = simulate(replace(base, max_steps=100))(epoch=2, pos=40, step=60)
    assert (eta.budget, eta.run) == ("max_steps", 40 * 4 * 0.5)
    eta = simulate(replace(base, max_tokens=300_000))(epoch=2, pos=40, step=60)  # 240k seen, 2k tok/s
    assert (eta.budget, eta.run, eta.epoch) == ("max_tokens", 30.0, 30.0)
    eta = simulate(base, minutes_left=0.25)(epoch=2, pos=40, step=60)
    assert (eta.budget, eta.run, eta.epoch) == ("max_minutes", 15.0, 15.0), "the epoch cannot outlast the run"
    assert "run 0:15 (max_minutes)" in eta.text() and not eta.may_stop_early


def test_a_budget_that_early_stopping_may_beat_is_shown_as_an_upper_bound():
    t = TrainSettings(max_epochs=500, patience=3)
    eta = simulate(t)(epoch=0, pos=10, step=0)
    assert eta.may_stop_early and eta.early_stop is None, "no sign of early stopping yet: only a bound"
    assert eta.text() == "epoch 0:45, run <= 6:56:35 (max_epochs, or early stopping)", eta.text()
    eta = simulate(replace(t, max_epochs=2))(epoch=0, pos=10, step=0)
    assert not eta.may_stop_early and eta.text() == "epoch 0:45, run 1:35 (max_epochs)", eta.text()


def test_early_stopping_is_announced_only_when_the_loss_stops_improving():
    t = TrainSettings(max_epochs=500, patience=3)
    at = simulate(t)
    assert at(epoch=10, pos=20, step=0, bad=0).early_stop is None
    eta = at(epoch=10, pos=20, step=0, bad=1)  # stops after this epoch and 1 more if nothing improves
    assert eta.early_stop == pytest.approx(80 * 0.5 + 100 * 0.5) and "early stop <= 1:30" in eta.text()
    assert at(epoch=10, pos=20, step=0, bad=2).early_stop == pytest.approx(40.0)
    short = simulate(replace(t, max_epochs=11))(epoch=10, pos=20, step=0, bad=1)
    assert short.early_stop is None, "max_epochs ends the run first: no early-stop figure"


def test_a_simulated_run_never_overestimates_its_end_tenfold():
    """Walk a run that max_minutes ends at 90 s (an epoch is 50 s of a 500-epoch budget): at every step the
    ETA is the true time left, never the 7-hour time to max_epochs."""
    t = TrainSettings(max_epochs=500, max_minutes=1.5, grad_accum=1)
    for k in range(0, 180, 7):  # micro-batch k of the run, 0.5 s each
        epoch, pos = divmod(k, 100)
        eta = simulate(t, minutes_left=(90 - 0.5 * k) / 60)(epoch=epoch, pos=pos, step=k)
        assert eta.budget == "max_minutes" and eta.run == pytest.approx(90 - 0.5 * k)


# ---- train.log, sweeps ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_log_holds_the_console_log_while_the_run_goes(corpus, tmp_path):
    proc = subprocess.Popen(
        cli_args(corpus, tmp_path, "train.max_epochs=500", "train.patience=500"),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = Path(tmp_path) / "pretrain" / "default" / "train.log"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "epoch   1 |" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.2)
        during = log.read_text() if log.exists() else ""
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert "epoch   1 |" in during, f"train.log while running:\n{during}\nstderr:\n{err}"
    for needle in ("built vocabulary", "tokenized", "parameters", "train loss", "val loss", "tok/s"):
        assert needle in during, f"{needle!r} missing from train.log:\n{during}"
    after = log.read_text()
    assert "stopped by SIGINT" in after and after.startswith(during), after


def run_sweep(corpus, out_dir, *overrides, stage="pretrain") -> subprocess.CompletedProcess:
    args = cli_args(corpus, out_dir, *overrides, stage=stage)
    args.insert(3, "-m")  # python -m rgpt.train -m key=a,b ...
    proc = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_a_sweep_gives_every_job_its_own_run_and_sft_finds_its_pretrained_job(corpus, tmp_path):
    sweep = ("train.lr=1e-3,2e-3", "train.max_epochs=1")
    run_sweep(corpus, tmp_path, *sweep)
    root = Path(tmp_path) / "pretrain" / "default"
    jobs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert jobs == ["train.lr=0.001", "train.lr=0.002"], jobs
    for job in jobs:
        assert list((root / job).glob("events.out.tfevents.*")), f"{job}: no TensorBoard run of its own"
        assert list((root / job / "checkpoints").glob("final-*")), f"{job}: no checkpoint"
        assert "done: reached max_epochs=1." in (root / job / "train.log").read_text()
    assert not (root / "checkpoints").exists(), "a job wrote into the shared run directory"
    sft = run_sweep(corpus, tmp_path, "resume=true", *sweep, stage="sft")
    for job in jobs:
        assert f"pretrained model {root / job / 'checkpoints'}/best-" in sft.stdout, sft.stdout
        assert list((Path(tmp_path) / "sft" / "default" / job / "checkpoints").glob("final-*"))


# ---- every entry point: shared keys and unknown keys -------------------------------------------------------
@pytest.mark.parametrize("module", ["train", "chat", "eval", "serve"])
def test_an_unknown_key_is_one_line_with_a_suggestion_in_every_entry_point(module, tmp_path):
    proc = run_entry(module, f"out_dir={tmp_path}", "thread=1", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr == "error: unknown key 'thread' (did you mean 'threads'?)\n", proc.stderr
    assert not list(Path(tmp_path).iterdir()), "an entry point wrote files despite the error"


@pytest.mark.parametrize(
    "config, typo, suggestion",
    [
        ("config", "train.lrr", "train.lr"),
        ("config", "trian.lr", "train.lr"),
        ("chat", "temprature", "temperature"),
        ("eval", "data.pth", "data.path"),
        ("serve", "api_ky", "api_key"),
    ],
)
def test_unknown_keys_are_matched_with_their_siblings_first(config, typo, suggestion):
    with pytest.raises(cli.ConfigError) as e:
        overrides.check_overrides(config, [f"{typo}=1"])
    assert str(e.value) == f"unknown key '{typo}' (did you mean '{suggestion}'?)"
    with pytest.raises(
        cli.ConfigError, match=re.escape("see `python -m rgpt.train --cfg job` for every key")
    ):
        overrides.check_overrides("config", ["train.bogus=1"])  # nothing close to bogus among train's keys


@pytest.mark.parametrize("module", ["chat", "eval", "serve"])
def test_inference_entry_points_take_the_shared_keys(module, tmp_path):
    """threads and allocator are accepted: the run then fails only for want of a checkpoint."""
    proc = run_entry(
        module, f"out_dir={tmp_path}", "threads=1", "allocator=system", "device=cpu", cwd=tmp_path
    )
    assert proc.returncode == 1 and "no trained checkpoint found" in proc.stderr, proc.stderr


def test_shared_keys_are_checked():
    for args, needle in [(("auto", 0, "keep"), "threads=0"), (("auto", None, "fast"), "allocator='fast'")]:
        with pytest.raises(cli.ConfigError, match=re.escape(needle)):
            rdevice.setup_runtime(*args)
    assert rdevice.setup_runtime("cpu", None, "system") == torch.device("cpu")


def test_a_sweep_over_a_group_checks_every_choice():
    presets = ", ".join(sorted(p.stem for p in (cli.CONF_DIR / "model").glob("*.yaml")))
    assert "base" in presets and "tiny" in presets, presets
    with pytest.raises(cli.ConfigError, match=re.escape(f"model='huge' is not one of {presets}")):
        overrides.check_overrides("config", ["-m", "model=small,huge"])
    overrides.check_overrides("config", ["-m", "model=small,base", "+preset=quick", "train.lr=1e-3,2e-3"])


def test_sweep_job_names_hold_only_the_swept_keys():
    argv = ["-m", "stage=sft", "resume=true", "train.lr=1e-3,2e-3", "model=small,base", "threads=1"]
    job = ["stage=sft", "resume=true", "train.lr=0.001", "model=small", "threads=1"]
    assert overrides.sweep_job_name(job, argv) == "train.lr=0.001,model=small"
    assert overrides.sweep_job_name(["data.files=[a/b.txt]"], ["-m", "data.files=[a/b.txt],[c.txt]"]) == (
        "data.files=[a_b.txt]"
    )


# ---- the emulated-bf16 notice -------------------------------------------------------------------------------
def test_bf16_without_native_support_says_so_and_fp32_does_not(monkeypatch):
    said = []
    monkeypatch.setattr(rdevice, "native_bf16", lambda device: False)
    assert rdevice.resolve_precision("bf16", torch.device("cpu"), log=said.append) == "bf16"
    assert len(said) == 1 and "precision=bf16 will be slow here" in said[0] and "precision=fp32" in said[0]
    assert rdevice.resolve_precision("fp32", torch.device("cpu"), log=said.append) == "fp32"
    assert rdevice.resolve_precision("auto", torch.device("cpu"), log=said.append) == "fp32"
    monkeypatch.setattr(rdevice, "native_bf16", lambda device: True)
    assert rdevice.resolve_precision("bf16", torch.device("cpu"), log=said.append) == "bf16"
    assert rdevice.resolve_precision("auto", torch.device("cpu"), log=said.append) == "bf16"
    assert len(said) == 1, said


# ---- evaluation every N steps -------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_every_validates_checkpoints_and_resumes_exactly_mid_epoch(corpus, tmp_path):
    """eval_every=3 over an epoch of 10 steps: validation, `last` and `best` at steps 3, 6 and 9, mid-epoch;
    a run stopped at step 7 and resumed ends bit-identical to the straight run."""
    knobs = ("train.eval_every=3", "train.max_epochs=1", "train.patience=100")
    straight, split = Path(tmp_path) / "straight", Path(tmp_path) / "split"
    proc = run_cli(corpus, straight, *knobs)
    run = straight / "pretrain" / "default"
    assert [s for s, _ in scalar_curve(run, "val/loss")] == [3, 6, 9]
    assert "step      3 | epoch 1 batch 6/19" in proc.stdout, proc.stdout
    best = [p.name for p in ckpts(straight, "best")]
    assert best and all(int(n.split("-")[1]) % 3 == 0 for n in best), best
    history = ckpt.read_state(ckpts(straight, "final")[0])["history"]
    assert [h["step"] for h in history] == [3, 6, 9]
    run_cli(corpus, split, "train.max_steps=7", *knobs)
    (last,) = ckpts(split, "last")
    assert last.name == "last-00000007" and ckpt.read_state(last)["pos"] == 14
    run_cli(corpus, split, "resume=true", *knobs)
    finals = {p.name: p for p in ckpts(split, "final")}
    assert_same_weights(finals["final-00000010"], ckpts(straight, "final")[0], "eval_every: 7 + resume")
    assert scalar_curve(split / "pretrain" / "default", "val/loss") == scalar_curve(run, "val/loss")


@pytest.mark.slow
def test_eval_every_early_stopping_counts_evaluations(corpus, tmp_path):
    proc = run_cli(corpus, tmp_path, "train.eval_every=2", "train.min_delta=1e9", "train.patience=2")
    assert "did not improve for 2 evaluations (every 2 steps)" in proc.stdout, proc.stdout
    final = ckpts(tmp_path, "final")[0]
    assert ckpt.read_state(final)["step"] == 6, "stopped at the third evaluation (2 without improvement)"
    assert_same_weights(final, ckpts(tmp_path, "best")[0], "rolled back to the first evaluation's weights")
