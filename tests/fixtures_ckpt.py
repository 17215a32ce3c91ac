"""A tiny trained checkpoint for the chat and eval tests: a 2-layer model that has memorised a few dialogues.

Training takes a couple of seconds and happens once per test session (memoised); each test module's
fixture then saves it into its own temporary out_dir laid out like a real run:
``<out_dir>/<stage>/default/checkpoints/best-00000300``.
"""

import functools
import os
import subprocess
import sys

import pytest
import torch

from rgpt.data.tokenizer import Tokenizer
from rgpt.nn.model import GPT, GPTConfig
from rgpt.nn.optim import Adam
from rgpt.runtime.checkpoint import save

DIALOGUES = [
    [("user", "山脉是如何形成的？"), ("assistant", "山脉主要由板块碰撞挤压形成。")],
    [("user", "你好"), ("assistant", "你好！有什么可以帮你？")],
    [("user", "一年有几个季节？"), ("assistant", "一年有四个季节。")],
    [("user", "水的沸点是多少？"), ("assistant", "一百摄氏度。")],
    [
        ("user", "你好"),
        ("assistant", "你好！有什么可以帮你？"),
        ("user", "一年有几个季节？"),
        ("assistant", "一年有四个季节。"),
    ],
]
ANSWERS = {turns[0][1]: turns[1][1] for turns in DIALOGUES}  # question -> the reply greedy decoding gives
BLOCK_SIZE = 64
STEPS = 300


@functools.cache
def trained(arch: tuple = ()):
    """(model, tokenizer, final loss), trained with hand-written Adam on the assistant tokens only.

    arch: (key, value) pairs of GPTConfig settings other than the tiny sizes (model=llama's, say)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids OpenMP overhead on a busy machine (10x)
    try:
        with torch.random.fork_rng(), torch.no_grad():
            return _train(dict(arch))
    finally:
        torch.set_num_threads(threads)


def _train(arch):
    torch.manual_seed(0)
    tok = Tokenizer.build([c for turns in DIALOGUES for _, c in turns] + ["地壳运动"], min_freq=1, idioms=())
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        n_embd=32,
        n_head=4,
        n_layer=2,
        n_hidden=64,
        block_size=BLOCK_SIZE,
        dropout=0.0,
        **arch,
    )
    model = GPT(cfg)
    encoded = [tok.encode_dialogue(turns) for turns in DIALOGUES]
    T = max(len(ids) for ids, _ in encoded) - 1
    idx = torch.zeros(len(encoded), T, dtype=torch.long)
    targets = torch.full((len(encoded), T), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(encoded):
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        idx[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = ids[1:].masked_fill(~mask[1:], -100)
    opt = Adam(model.store)
    for _ in range(STEPS):
        loss = model.forward(idx, targets)
        model.zero_grad()
        model.backward()
        opt.step(1e-2)
    model.eval()
    return model, tok, float(loss)


def save_tiny(out_dir, stage="sft"):
    """Save the tiny model as the best checkpoint of run `default` of `stage` under out_dir; its path."""
    model, tok, loss = trained()
    ckpt_dir = out_dir / stage / "default" / "checkpoints"
    return save(ckpt_dir, "best", STEPS, model, tok, {"monitor_value": loss, "stage": stage})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """out_dir holding one SFT run with the tiny model; returns (out_dir, checkpoint path)."""
    out_dir = tmp_path_factory.mktemp("outputs")
    return out_dir, save_tiny(out_dir)


def run_cli(module, *args, cwd, stdin=""):
    """python -m rgpt.<module> args… in cwd, as a user runs it; the CompletedProcess (text)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONIOENCODING": "utf-8",
    }  # tiny model: 1 thread is fastest
    return subprocess.run(
        [sys.executable, "-m", f"rgpt.{module}", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
    )


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread, whose cost is the work itself; several spin-wait for each other on a busy
    machine (measured 15x slower on a loaded 2-core box). A module asks for it with its pytestmark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
