"""Data parallelism through the real CLI: `torchrun --nproc_per_node=2` (gloo, loopback) against one process.

Two processes must train the same model as one process given the same global batch: same losses, same final
parameters up to float32 reduction-order rounding. Runs resume across world sizes, only rank 0 writes files,
a signal to one rank stops every rank at the same step, and a dead or silent rank ends the job with a message
instead of a hang.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rgpt.runtime import checkpoint as ckpt
from rgpt.training.distributed import Dist, hydra_overrides
from tests.helpers import ALL_OPTIONS, assert_close, write_tiny_corpus

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS_PER_EPOCH = 4  # 13 micro-batches of 4 windows, grad_accum 4: groups of 4, 4, 4 and 1 (rank 1 idle)

# Tolerance for 2 processes vs 1. A step's gradient is the same sum of the same float32 micro-batch gradients,
# added in another order ((g0 + g2) + (g1 + g3) instead of ((g0 + g1) + g2) + g3): a few float32 ulps apart
# (relative ~1e-7). Losses agree to that (observed: equal); parameters after 12 steps at lr 3e-3 to 2e-7
# (observed), so 2e-6 leaves a 10x margin. One exception: the key bias, whose true gradient is exactly 0
# (softmax ignores a constant added to a row of scores), so its computed gradient is pure rounding noise;
# Adam divides by sqrt(v), which turns that noise into steps of up to lr in a direction the summation order
# decides (observed: 3e-6). A real error (a micro-batch lost or counted twice, a wrong token weight) changes
# the loss in the 3rd digit and moves parameters by ~lr = 3e-3 per step, far outside these tolerances.
LOSS_RTOL, PARAM_ATOL, KEY_BIAS_ATOL = 1e-5, 2e-6, 1e-4


# ---- single-process behaviour (fast) ----------------------------------------------------------------
def test_without_torchrun_every_collective_is_a_no_op(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = Dist.from_env("cpu")
    assert (d.rank, d.world, d.is_main) == (0, 1, True)
    t = torch.arange(3.0)
    d.all_reduce_sum(t)
    d.broadcast_(t)
    d.barrier()
    assert t.tolist() == [0.0, 1.0, 2.0]
    assert d.any(True) and not d.any(False)
    calls = []
    assert d.first_then_rest(lambda: calls.append(1) or "x") == "x" and calls == [1]
    assert hydra_overrides() == []


def test_ranks_other_than_0_keep_hydra_out_of_the_run_directory(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert hydra_overrides() == ["hydra.output_subdir=null", "hydra/job_logging=none"]


# ---- torchrun end to end ------------------------------------------------------------------------------
def write_corpus(root: Path) -> tuple[Path, Path]:
    """52 short pretraining sentences (49 training windows) and 20 dialogues, the same every time."""
    return write_tiny_corpus(root, seed=8, n_pre=52, n_sft=20, n_subjects=10, n_words=5)


# Rank != 0 under an audit hook: every file it opens for writing, renames or removes under PROBE_WATCH is
# logged. Python's own audit events see Hydra, TensorBoard, numpy, json and the checkpoint writer's files.
PROBE = """
import os, runpy, sys
WATCH, LOG = os.environ["PROBE_WATCH"], os.environ["PROBE_LOG"]
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def hook(event, args):
    if event == "open":
        path, writes = args[0], isinstance(args[2], int) and args[2] & WRITE
    elif event in ("os.rename", "os.remove", "shutil.rmtree"):
        path, writes = args[0], True
    else:
        return
    if writes and isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(WATCH):
        with open(LOG, "a") as f:
            f.write(f"rank {os.environ['RANK']}: {event} {os.fspath(path)}\\n")
if os.environ["RANK"] != "0":
    sys.addaudithook(hook)
runpy.run_module("rgpt.train", run_name="__main__", alter_sys=True)
"""


class Runner:
    def __init__(self, root: Path):
        self.pre, self.sft = write_corpus(root)
        self.probe = root / "probe.py"
        self.probe.write_text(PROBE)

    def args(self, out_dir: Path, nproc: int, *extra) -> list[str]:
        if nproc == 1:
            launch = [sys.executable, "-m", "rgpt.train"]
        else:
            with socket.socket() as s:  # a free loopback port for the rendezvous
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            launch = [
                str(TORCHRUN),
                f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(self.probe),
            ]
        return [
            *launch,
            "stage=pretrain",
            "model=tiny",  # dropout 0.1 stays on: masks must not depend on the rank
            f"out_dir={out_dir}",
            f"data.files=[{self.pre}]",
            f"tokenizer.files.pretrain=[{self.pre}]",
            f"tokenizer.files.sft=[{self.sft}]",
            f"data.cache_dir={out_dir}/cache",  # in out_dir: rank 0 alone may fill it
            "monitor.progress=false",
            "monitor.sample_tokens=4",
            "train.batch_size=4",
            "train.grad_accum=4",
            "train.lr=3e-3",
            "train.warmup_steps=2",
            "threads=1",  # two ranks on two cores
            "precision=fp32",  # the tolerances below are float32 rounding
            *extra,
        ]

    def env(self, out_dir: Path) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "HYDRA_FULL_ERROR")}
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            PROBE_WATCH=str(out_dir),
            PROBE_LOG=str(out_dir.parent / f"{out_dir.name}.writes"),
        )
        return env

    def run(self, out_dir: Path, nproc: int, *extra, rc=0) -> subprocess.CompletedProcess:
        p = subprocess.run(
            self.args(out_dir, nproc, *extra),
            cwd=REPO,
            env=self.env(out_dir),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == rc, (
            f"exit {p.returncode} (want {rc})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        )
        assert_rank_0_wrote_alone(out_dir)
        return p

    @contextmanager
    def start(self, out_dir: Path, nproc: int, *extra):
        """A run in the background (its output merged into proc.stdout), ended if the test fails early."""
        proc = subprocess.Popen(
            self.args(out_dir, nproc, *extra),
            cwd=REPO,
            env=self.env(out_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()  # torchrun passes it on to the ranks
                try:
                    proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()


def assert_rank_0_wrote_alone(out_dir: Path) -> None:
    writes = out_dir.parent / f"{out_dir.name}.writes"  # PROBE_LOG
    assert not writes.exists(), f"a rank other than 0 wrote into {out_dir}:\n{writes.read_text()}"


def run_dir(out_dir: Path) -> Path:
    return out_dir / "pretrain" / "default"


def checkpoint(out_dir: Path, kind: str) -> Path:
    (path,) = ckpt.list_checkpoints(run_dir(out_dir) / "checkpoints", kind)[:1]
    return path


def losses(out_dir: Path) -> tuple[list[int], torch.Tensor]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir(out_dir)), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    return [e.step for e in events], torch.tensor([e.value for e in events], dtype=torch.float64)


def assert_same_training(out: Path, ref: Path, what: str) -> None:
    """Same per-step losses and final parameters as the reference run, to float32 reduction-order rounding."""
    steps, got = losses(out)
    ref_steps, want = losses(ref)
    assert steps == ref_steps, f"{what}: logged steps {steps} != {ref_steps}"
    assert_close(got, want, f"{what}: train/loss per step", rtol=LOSS_RTOL, atol=0)
    final, ref_final = checkpoint(out, "final"), checkpoint(ref, "final")
    assert final.name == ref_final.name, f"{what}: {final.name} != {ref_final.name}"
    a, b = load_file(final / ckpt.MODEL), load_file(ref_final / ckpt.MODEL)
    for name in b:
        atol = [PARAM_ATOL]
        if name.endswith("attn.c_attn.bias"):  # (q, k, v) biases, k's true gradient is 0 (see above)
            atol = [PARAM_ATOL, KEY_BIAS_ATOL, PARAM_ATOL]
        for x, y, tol in zip(a[name].chunk(len(atol)), b[name].chunk(len(atol)), atol):
            assert_close(x, y, f"{what}: final {name}", rtol=0, atol=tol)
    hist, ref_hist = ckpt.read_state(final)["history"], ckpt.read_state(ref_final)["history"]
    for key in ("train_loss", "val_loss"):
        assert_close(
            [h[key] for h in hist], [h[key] for h in ref_hist], f"{what}: {key}", rtol=LOSS_RTOL, atol=0
        )


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def one(runner, tmp_path_factory) -> Path:
    """The reference: 3 epochs (12 steps) in one process."""
    out = tmp_path_factory.mktemp("one")
    proc = runner.run(out, 1, "train.max_epochs=3")
    assert "13 micro-batches per epoch, 4 steps per epoch" in proc.stdout, proc.stdout
    return out


@pytest.fixture(scope="module")
def two(runner, tmp_path_factory) -> Path:
    """The same 3 epochs with 2 processes, rank 1 under the write probe."""
    out = tmp_path_factory.mktemp("two")
    runner.run(out, 2, "train.max_epochs=3")
    return out


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(one, two):
    assert_same_training(two, one, "2 processes vs 1")


@pytest.mark.slow
def test_only_rank_0_writes_files(one, two):
    assert_rank_0_wrote_alone(two)

    def files(out):  # relative paths, the events file's host/pid/time suffix dropped
        found = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        return {f.split(".out.tfevents.")[0] if ".out.tfevents." in f else f for f in found}

    assert len(list(run_dir(two).glob("events.out.tfevents.*"))) == 1, "more than one TensorBoard writer"
    assert files(two) == files(one), f"2 processes left {files(two) ^ files(one)} unlike 1 process"


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_mid_epoch_with_a_different_number_of_processes(runner, one, tmp_path, first, then):
    runner.run(tmp_path, first, "train.max_epochs=3", "train.max_steps=6")  # stops at batch 8 of epoch 2
    proc = runner.run(tmp_path, then, "resume=true", "train.max_epochs=3")
    assert "resumed at epoch 2, batch 8, step 6" in proc.stdout, proc.stdout
    assert_same_training(tmp_path, one, f"{first} process(es) for 6 steps, then {then} for 6")


def rank_pid(parent: int, rank: int, timeout=60.0) -> int:
    """The pid of the torchrun child with RANK=rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    if f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                        return int(d.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under torchrun pid {parent}")


def wait_for_epoch(proc: subprocess.Popen) -> list[str]:
    """Read torchrun's output until rank 0 reports a finished epoch: both ranks are training."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1 |"):
            return lines
    raise AssertionError("the run ended before its first epoch:\n" + "".join(lines))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_a_signal_stops_every_rank_at_the_same_step_and_rank_0_saves_last(runner, tmp_path, target):
    """Ctrl-C on torchrun reaches every rank; a SIGTERM to rank 1 alone must stop rank 0 at the same step."""
    with runner.start(tmp_path, 2, "train.max_epochs=1000", "train.patience=1000") as proc:
        lines = wait_for_epoch(proc)
        if target == "launcher":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
        t0 = time.monotonic()
        out = "".join(lines) + proc.communicate(timeout=120)[0]
        assert time.monotonic() - t0 < 20, f"the ranks took {time.monotonic() - t0:.0f} s to stop:\n{out}"
        assert proc.returncode != 0, out
        assert "forcefully exiting" not in out, f"torchrun had to SIGKILL a rank:\n{out}"
        stopped = [line for line in out.splitlines() if line.startswith("stopped by SIG")]
        assert len(stopped) == 1 and "saved" in stopped[0], (
            f"rank 0 did not save `last` on the signal:\n{out}"
        )
        last = checkpoint(tmp_path, "last")
        assert ckpt.read_state(last)["step"] > STEPS_PER_EPOCH, out
        assert not list(last.parent.glob(".tmp-*")), "a half-written checkpoint was left behind"
        assert_rank_0_wrote_alone(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_lost_rank_ends_the_job_with_a_message_instead_of_a_hang(runner, tmp_path, fault):
    """A dead rank (SIGKILL) is seen at once; a silent one (SIGSTOP) after dist_timeout_s."""
    with runner.start(
        tmp_path, 2, "train.max_epochs=1000", "train.patience=1000", "dist_timeout_s=5"
    ) as proc:
        lines = wait_for_epoch(proc)
        pid = rank_pid(proc.pid, 1)
        os.kill(pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        t0 = time.monotonic()
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("error: rank 0 of 2"):
                break
        took = time.monotonic() - t0
        if fault == "hangs":
            os.kill(pid, signal.SIGCONT)  # so that torchrun's SIGTERM reaches it
        out = "".join(lines) + proc.communicate(timeout=120)[0]
        assert proc.returncode != 0, out
        if fault == "dies":
            assert took < 20, f"the job took {took:.0f} s to end:\n{out}"
            assert "rank      : 1" in out and "Signal 9 (SIGKILL)" in out, (
                f"torchrun does not name rank 1:\n{out}"
            )
        else:
            assert 4 <= took < 20, f"rank 0 gave up after {took:.0f} s, not after dist_timeout_s=5:\n{out}"
            assert (
                "error: rank 0 of 2: all-reduce failed: another rank died or did not answer within " in out
            ), out


@pytest.mark.slow
def test_the_architecture_options_train_alike_on_two_processes(runner, tmp_path_factory):
    """Every option at once (a tied weight's two gradients, rotated keys, flash tiles) under torchrun."""
    one, two = tmp_path_factory.mktemp("opts1"), tmp_path_factory.mktemp("opts2")
    runner.run(one, 1, "train.max_epochs=1", *ALL_OPTIONS)
    runner.run(two, 2, "train.max_epochs=1", *ALL_OPTIONS)
    state = ckpt.read_state(checkpoint(one, "final"))
    assert state["model_config"]["pos"] == "rope" and state["model_config"]["tie_embeddings"] is True
    assert_same_training(two, one, "all architecture options: 2 processes vs 1")
