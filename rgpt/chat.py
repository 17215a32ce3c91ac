"""python -m rgpt.chat [checkpoint=PATH] [prompt=TEXT] [method=greedy|sample|beam] [key=value ...]

Talk to a trained model in Chinese (every key: ChatConfig below; `--cfg job` prints them). Three ways in:
- interactive (a terminal): replies stream token by token, the conversation is remembered, and /help,
  /clear, /set key=value and /quit are understood; Ctrl-D or Ctrl-C leaves;
- one-shot: prompt="山脉是如何形成的？" prints only the reply;
- piped: each line of stdin is a question of its own, answered on one line (lines starting with / are
  still commands, so /set works in scripts).
Notices (the checkpoint chosen, truncated input, forgotten turns) go to stderr, so stdout holds replies only.
"""

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rgpt.cli import hydra_main, quote_text_overrides, settings
from rgpt.inference.conversation import Chat, ReplySettings, note
from rgpt.inference.load import ModelChoice
from rgpt.runtime.device import RuntimeSettings
from rgpt.settings import FLAT, ConfigError

# Override keys whose values are free text or paths: quoted for Hydra before it parses the command line,
# since its grammar rejects unquoted non-ASCII (prompt=山脉… would otherwise be a parse error).
TEXT_KEYS = ("prompt", "checkpoint", "out_dir")


@dataclass
class ChatConfig:
    model: ModelChoice = field(default_factory=ModelChoice, metadata=FLAT)  # checkpoint=, out_dir=
    # a question: answer it, print only the reply and exit; None: interactive, or stdin lines
    prompt: str | None = None
    reply: ReplySettings = field(default_factory=ReplySettings, metadata=FLAT)  # method=, temperature=, ...
    # device, threads, allocator
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings, metadata=FLAT)

    def validate(self) -> "ChatConfig":
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError('prompt is empty: give a question, e.g. prompt="山脉是如何形成的？"')
        self.reply.validate()
        self.runtime.validate()
        return self


# ---- the loops ---------------------------------------------------------------------------------------
def interactive(chat: Chat, ckpt: Path) -> None:
    print(f"rgpt chat · {ckpt} · {chat.settings()}")
    print("输入问题后回车；/help 查看命令，/quit 或 Ctrl-D 退出。")
    while True:
        try:
            line = input("你> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            msg = chat.command(line)
            if msg is None:
                return
            print(msg)
            continue
        sys.stdout.write("助手> ")
        chat.reply(line, out=sys.stdout)
        sys.stdout.write("\n")


def piped(chat: Chat, lines) -> None:
    """One reply line per question line; commands act and report on stderr."""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            msg = chat.command(line)
            if msg is None:
                return
            note(msg)
            continue
        chat.conversation.clear()  # every line is a question of its own
        chat.reply(line, out=sys.stdout, remember=False)
        sys.stdout.write("\n")
        sys.stdout.flush()


@hydra_main("chat", ChatConfig)
def _main(cfg) -> None:
    c = settings(ChatConfig, cfg)
    device = c.runtime.apply()
    model, tok, path = c.model.open(device)
    chat = Chat(model, tok, c.reply.decode, c.reply.context_tokens)
    for stream_ in (sys.stdin, sys.stdout):  # odd bytes in or an odd terminal must never crash a chat
        if hasattr(stream_, "reconfigure"):
            stream_.reconfigure(errors="replace")
    try:
        if c.prompt is not None:
            chat.reply(c.prompt.strip(), out=sys.stdout)
            sys.stdout.write("\n")
        elif sys.stdin.isatty():
            # someone at a terminal leaves with Ctrl-C, even when started from a context that ignores
            # SIGINT (a shell's background job inherits SIG_IGN, and Python then installs no handler)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            interactive(chat, path)
        else:
            note(f"rgpt chat: {path}")
            piped(chat, sys.stdin)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print(file=sys.stderr)  # Ctrl-C is a normal way to leave a chat: exit 0
    except BrokenPipeError:  # the reader went away (e.g. `| head -1`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is quiet


def main() -> None:
    sys.argv[1:] = quote_text_overrides(sys.argv[1:], TEXT_KEYS)
    with torch.no_grad():
        _main()


if __name__ == "__main__":
    main()
