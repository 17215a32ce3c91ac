"""python -m rgpt.chat on a tiny trained checkpoint: one-shot, piped and interactive (through a pty) runs
of the real CLI, plus the conversation logic (/clear, /set, history trimming) in-process."""

import dataclasses
import os
import pty
import re
import select
import signal
import sys
import time

import pytest
import torch

from rgpt.chat import TEXT_KEYS, ChatConfig
from rgpt.cli import hydra_quote, quote_text_overrides
from rgpt.inference.conversation import SETTABLE, Chat, Conversation, set_decode
from rgpt.inference.generate import DecodeConfig
from rgpt.inference.load import open_model
from rgpt.settings import ConfigError, defaults, load
from tests.fixtures_ckpt import ANSWERS, run_cli, save_tiny, trained

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread


Q_MOUNTAIN, Q_HELLO, Q_SEASONS = "山脉是如何形成的？", "你好", "一年有几个季节？"


def chat_session(**decode):
    model, tok, _ = trained()
    return Chat(model, tok, DecodeConfig(**decode))


def no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr


# ---- one-shot and piped runs of the real CLI ----------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_shot_prints_only_the_reply(tiny_run, tmp_path, precision):
    """In fp32 and bf16 alike (precision=: bfloat16 products, as training computes them under bf16)."""
    out_dir, _ = tiny_run
    proc = run_cli(
        "chat", f"out_dir={out_dir}", f"prompt={Q_MOUNTAIN}", f"precision={precision}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ANSWERS[Q_MOUNTAIN] + "\n", "stdout must hold the reply only, with no spaces"
    assert list(tmp_path.iterdir()) == [], "chat must write no files (no .hydra/, no log)"
    no_traceback(proc)


def test_piped_stdin_gives_one_reply_per_line(tiny_run, tmp_path):
    out_dir, ckpt = tiny_run
    stdin = f"{Q_HELLO}\n\n   \n{Q_SEASONS}\n/set method=beam beam_width=3\n{Q_MOUNTAIN}\n龘𠀀 hello\n"
    proc = run_cli("chat", f"checkpoint={ckpt}", cwd=tmp_path, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[:3] == [ANSWERS[Q_HELLO], ANSWERS[Q_SEASONS], ANSWERS[Q_MOUNTAIN]], proc.stdout
    assert len(lines) == 5 and lines[3] and lines[4] == "", (
        "blank lines are skipped; unknown text is answered"
    )
    assert "method=beam" in proc.stderr, "a /set reports on stderr, keeping stdout to replies"
    no_traceback(proc)


def test_falls_back_to_pretraining_with_a_notice(tmp_path):
    save_tiny(tmp_path / "outputs", stage="pretrain")
    proc = run_cli("chat", f"prompt={Q_HELLO}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no instruction-tuned (SFT) checkpoint" in proc.stderr
    assert proc.stdout == ANSWERS[Q_HELLO] + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["out_dir=nowhere"], "python -m rgpt.train stage=pretrain"),
        (["checkpoint=missing/best-00000001"], "checkpoint not found"),
        (["method=nucleus"], "method='nucleus' is not one of"),
        (["precision=fp16"], "precision='fp16' is not one of auto, fp32, bf16"),
        (["prompt="], "prompt is empty"),
        (["colour=blue"], "colour"),  # Hydra's own message: "Could not override 'colour'. …"
    ],
)
def test_errors_are_a_clear_message_and_status_1(tiny_run, tmp_path, args, message):
    out_dir, _ = tiny_run
    proc = run_cli("chat", f"out_dir={out_dir}", *args, cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert message in proc.stderr and proc.stdout == "", proc.stderr
    no_traceback(proc)


def test_prompts_survive_hydra_quoting():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    for text in [Q_MOUNTAIN, "it's", "a\\b", "a\\", "\\'", "${x} 与 $5", "a,b", '"引号"', "x=y", "null", "3"]:
        value = parser.parse_override(f"prompt={hydra_quote(text)}").value()
        assert OmegaConf.create({"prompt": value}).prompt == text, f"{text!r} came back as {value!r}"
    given = ["prompt=你好", "method=beam", "prompt='\"as is\"'", "checkpoint=null", "+out_dir=输出"]
    assert quote_text_overrides(given, TEXT_KEYS) == [
        "prompt='你好'",
        "method=beam",
        "prompt='\"as is\"'",
        "checkpoint=null",
        "+out_dir='输出'",
    ]


# ---- the interactive loop, through a pseudo-terminal ----------------------------------------------------
class Terminal:
    """The real CLI on a pty, so stdin is a tty (interactive mode) and Ctrl-C / Ctrl-D work as typed."""

    def __init__(self, args, cwd):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the CLI
            os.chdir(cwd)
            os.environ["OMP_NUM_THREADS"] = "1"
            # start as a shell's background job would: with SIGINT ignored, which exec inherits;
            # Ctrl-C at the prompt must still end the chat
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.execv(sys.executable, [sys.executable, "-m", "rgpt.chat", *args])
        self.out = b""
        self.mark = 0  # where the output after the last keystrokes starts: markers are looked for there

    def read_until(self, marker: str, timeout=60.0) -> str:
        end = time.monotonic() + timeout
        while marker.encode() not in self.out[self.mark :] and time.monotonic() < end:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        text = self.out.decode(errors="replace")
        assert marker.encode() in self.out[self.mark :], f"never saw {marker!r}; terminal so far:\n{text}"
        return text

    def type(self, text: str):
        self.mark = len(self.out)
        os.write(self.fd, text.encode())

    def exit_code(self, timeout=30.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.fd, 4096)
                except OSError:
                    pass
        os.kill(self.pid, 9)
        raise AssertionError(f"chat did not exit; terminal:\n{self.out.decode(errors='replace')}")


@pytest.mark.parametrize("key, name", [("\x04", "Ctrl-D"), ("\x03", "Ctrl-C")])
def test_interactive_session_and_clean_exit(tiny_run, tmp_path, key, name):
    out_dir, _ = tiny_run
    term = Terminal([f"out_dir={out_dir}"], tmp_path)
    term.read_until("你> ")
    term.type(f"{Q_HELLO}\r")
    term.read_until(f"助手> {ANSWERS[Q_HELLO]}")
    term.type("/set temperature=0.5 method=sample seed=1\r")
    term.read_until("已设置 (set): temperature=0.5 method=sample seed=1")
    term.type("/clear\r")
    term.read_until("history cleared")
    term.type("/help\r")
    term.read_until("当前设置 (current)")  # the last line of the help, not the banner's mention of /quit
    term.read_until("你> ")  # the next prompt is on screen ...
    time.sleep(0.3)  # ... and readline is waiting: a key typed before that could be flushed with the ^C
    term.type(key)
    assert term.exit_code() == 0, f"{name} must leave with status 0"
    assert "Traceback" not in term.out.decode(errors="replace")


# ---- the conversation, in-process ---------------------------------------------------------------------
def test_history_is_kept_in_the_chat_template():
    chat = chat_session(max_new_tokens=20)  # leaves 44 of the 64-token window for the prompt
    tok = chat.tok
    assert chat.reply(Q_HELLO) == ANSWERS[Q_HELLO]
    assert chat.reply(Q_SEASONS) == ANSWERS[Q_SEASONS], "the model was trained on this two-turn dialogue"
    turns = [("user", Q_HELLO), ("assistant", ANSWERS[Q_HELLO]), ("user", Q_SEASONS)]
    turns += [("assistant", ANSWERS[Q_SEASONS]), ("user", Q_MOUNTAIN)]
    prompt, _, notices = chat.conversation.prompt(tok.encode(Q_MOUNTAIN))
    assert prompt == tok.encode_prompt(turns) and notices == [], "the prompt must be the tokenizer's template"


def test_clear_forgets_the_history():
    chat = chat_session()
    chat.reply(Q_HELLO)
    assert chat.command("/clear") == "（已清空对话历史）history cleared"
    prompt, _, _ = chat.conversation.prompt(chat.tok.encode(Q_MOUNTAIN))
    assert prompt == chat.tok.encode_prompt([("user", Q_MOUNTAIN)])


def test_set_changes_decoding_and_rejects_bad_values():
    chat = chat_session()
    assert "temperature=0.7" in chat.command("/set temperature=0.7 top_p=0.9")
    assert (chat.decode.temperature, chat.decode.top_p) == (0.7, 0.9)
    assert "method=greedy ignores it" in chat.command("/set top_k=5")
    assert chat.command("/set method=beam").startswith("已设置")
    assert chat.reply(Q_MOUNTAIN) == ANSWERS[Q_MOUNTAIN], "beam search finds the memorised answer"
    for bad, why in [("top_p=2", "top_p=2.0 must be in (0, 1]"), ("bogus=1", "unknown setting 'bogus'")]:
        assert why in chat.command(f"/set {bad}"), bad
    assert chat.command("/set max_new_tokens=2.5").endswith("max_new_tokens='2.5' is not an integer")
    assert chat.command("/set seed=18446744073709551616").endswith("must fit in 64 bits"), "not a crash"
    assert "top_k=-1" in chat.command("/set top_p=0.5 top_k=-1")
    assert chat.decode.top_p == 0.9 and chat.decode.method == "beam", "a bad /set changes nothing"
    assert "usage" in chat.command("/set")
    assert "unknown command" in chat.command("/frobnicate")
    assert chat.command("/quit") is None and chat.command("/exit") is None


def test_seeded_sampling_repeats_and_max_new_tokens_caps_the_reply():
    replies = [chat_session(method="sample", temperature=3.0, seed=5).reply(Q_MOUNTAIN) for _ in range(2)]
    assert replies[0] == replies[1], "same seed, same reply"
    chat = chat_session(max_new_tokens=3)
    assert len(chat.tok.encode(chat.reply(Q_MOUNTAIN))) <= 3


def test_oldest_turns_are_dropped_when_the_window_fills(capsys):
    model, tok, _ = trained()
    chat = Chat(model, tok, DecodeConfig(max_new_tokens=16), context_tokens=40)  # budget 24 prompt tokens
    for i in range(8):  # far more history than fits: every reply still comes, never empty
        assert chat.reply(Q_SEASONS if i % 2 else Q_HELLO), f"turn {i} got an empty reply"
    assert len(chat.conversation.exchanges) < 8
    assert "已忘记最早的" in capsys.readouterr().err, "dropping turns is announced on stderr"


def test_conversation_drops_whole_turns_and_keeps_the_question():
    conv = Conversation(budget=20)
    conv.add([10] * 5, [11] * 4)  # 12 tokens with its markers
    conv.add([12] * 2, [13] * 2)  # 7 tokens
    prompt, question, notices = conv.prompt([14] * 6)  # 1 + 12 + 7 + 8 > 20: the first exchange goes
    assert len(conv.exchanges) == 1 and conv.exchanges[0][0] == [12] * 2
    assert prompt[-8:] == [4, *([14] * 6), 5] and len(prompt) <= 20 and question == [14] * 6
    assert any("忘记" in n for n in notices)
    prompt, question, notices = conv.prompt(list(range(100, 140)))  # longer than the whole budget
    assert conv.exchanges == [], "the current question is always kept, the history goes first"
    assert question == list(range(123, 140)) and len(prompt) == 20, "a long input keeps its end"
    assert any("输入过长" in n for n in notices)


def test_long_and_unknown_input_still_get_an_answer(capsys):
    chat = chat_session(max_new_tokens=10)
    assert chat.reply("龘" * 500)  # far past the window: truncated with a notice, then answered
    assert "输入过长" in capsys.readouterr().err
    assert chat.reply("🙂 ☃ qwerty")  # characters the vocabulary never saw: <unk>, not a crash


def test_chat_config_from_yaml_values():
    c = load(ChatConfig, {"prompt": 123, "top_k": "5", "seed": None, "context_tokens": 32})
    assert c.prompt == "123" and c.reply.decode.top_k == 5 and c.reply.context_tokens == 32
    for bad, why in [
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"temperature": "hot"}, "temperature='hot' is not a number"),
        ({"max_new_tokens": True}, "max_new_tokens=True is not an integer"),
        ({"colour": "blue"}, "unknown key colour"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            load(ChatConfig, bad)
    with pytest.raises(ConfigError, match="context_tokens"):
        load(ChatConfig, {"context_tokens": 2})
    with pytest.raises(ConfigError, match="beam_width"):
        load(ChatConfig, {"beam_width": 0})
    model, tok, _ = trained()
    with pytest.raises(ConfigError, match="window of 64"):
        Chat(model, tok, DecodeConfig(), context_tokens=65)


def test_open_model_resolves_run_directories(tiny_run):
    out_dir, ckpt = tiny_run
    for given in (ckpt, out_dir / "sft" / "default", out_dir / "sft" / "default" / "checkpoints"):
        model, _, path = open_model(given, out_dir, torch.device("cpu"))
        assert path == ckpt, f"{given} resolved to {path}"
    assert open_model(None, out_dir, torch.device("cpu"))[2] == ckpt


def test_every_decoding_setting_is_settable_with_set_and_on_the_command_line():
    """DecodeConfig is the one list: /set and chat's, eval's and serve's keys all follow its fields."""
    from rgpt.inference.evaluate import EvalConfig
    from rgpt.serve import ServeConfig

    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    assert set(SETTABLE) == names
    for cls in (ChatConfig, EvalConfig, ServeConfig):
        keys = set(defaults(cls))
        assert names <= keys, f"{cls.__name__} lacks {names - keys}"
    assert set_decode(DecodeConfig(), "min_new_tokens", "3").min_new_tokens == 3
