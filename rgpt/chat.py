"""python -m rgpt.chat [checkpoint=PATH] [prompt=TEXT] [method=greedy|sample|beam] [key=value ...]

Talk to a trained model in Chinese (every key: conf/chat.yaml and conf/decode.yaml). Three ways in:
- interactive (a terminal): replies stream token by token, the conversation is remembered, and /help,
  /clear, /set key=value and /quit are understood; Ctrl-D or Ctrl-C leaves;
- one-shot: prompt="山脉是如何形成的？" prints only the reply;
- piped: each line of stdin is a question of its own, answered on one line (lines starting with / are
  still commands, so /set works in scripts).
Notices (the checkpoint chosen, truncated input, forgotten turns) go to stderr, so stdout holds replies only.
"""

import os
import re
import signal
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from rgpt.checkpoint import CheckpointError, default_for_inference, find, load_model
from rgpt.cli import ConfigError, hydra_main, setup_runtime
from rgpt.generate import DecodeConfig, generate, make_generator, stream
from rgpt.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, USER_ID

# Override keys whose values are free text or paths: quoted for Hydra before it parses the command line,
# since its grammar rejects unquoted non-ASCII (prompt=山脉… would otherwise be a parse error).
TEXT_KEYS = ("prompt", "checkpoint", "out_dir", "data.path")
SETTABLE = tuple(f.name for f in fields(DecodeConfig))  # every decoding setting, from its one definition
HELP = """命令 (commands):
  /help               显示本帮助 (this help)
  /clear              清空对话历史 (forget the conversation)
  /set key=value      修改解码设置, 例如 /set method=sample temperature=0.7 top_p=0.9
                      keys: {keys}
  /quit               退出 (also /exit, Ctrl-D, Ctrl-C)
当前设置 (current): {settings}"""


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- command line ------------------------------------------------------------------------------------
_HYDRA_ESCAPES = {"'": "\\'", "${": "\\${", "": ""}


def hydra_quote(value: str) -> str:
    """`value` as a Hydra quoted string that parses back to exactly `value` (quotes, backslashes, ${)."""
    body = re.sub(r"(\\*)('|\$\{|$)", lambda m: m.group(1) * 2 + _HYDRA_ESCAPES[m.group(2)], value)
    return f"'{body}'"


def quote_text_overrides(args: list[str], keys=TEXT_KEYS) -> list[str]:
    """Quote the values of `key=value` overrides of `keys`, unless already quoted (or null)."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        keep = value == "null" or (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"")
        out.append(f"{key}={hydra_quote(value)}" if eq and key.lstrip("+") in keys and not keep else arg)
    return out


def open_model(checkpoint, out_dir, device):
    """(model, tokenizer, checkpoint path): `checkpoint` (a checkpoint, a run or its checkpoints/ dir) or,
    when None, the best checkpoint of the newest SFT run under out_dir (else pretraining, with a notice)."""
    if checkpoint is None:
        path = default_for_inference(out_dir, warn=lambda m: note(f"note: {m}"))
        if path is None:
            raise CheckpointError(
                f"no trained checkpoint found under {out_dir}/ (looked in {out_dir}/sft/*/checkpoints and "
                f"{out_dir}/pretrain/*/checkpoints). Train one first: python -m rgpt.train stage=pretrain, "
                "then python -m rgpt.train stage=sft; or pass checkpoint=PATH"
            )
    else:
        path = Path(checkpoint)
        if not (path / "state.json").exists():  # a run directory or its checkpoints/ directory also do
            for ckpt_dir in (path / "checkpoints", path):
                found = [find(ckpt_dir, kind, warn=note) for kind in ("best", "final", "last")]
                if any(found):
                    path = next(f for f in found if f)
                    break
    model, tok, _ = load_model(path, device=device)
    return model, tok, path


@dataclass
class ChatConfig:
    checkpoint: str | None
    out_dir: str
    prompt: str | None
    context_tokens: int | None
    decode: DecodeConfig

    @classmethod
    def from_dict(cls, d: dict) -> "ChatConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)} | set(SETTABLE)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]} (known: {', '.join(sorted(known - {'decode'}))})")
        text = lambda v: None if v is None else str(v)  # noqa: E731  (prompt=123 arrives as an int)
        return cls(
            checkpoint=text(d.get("checkpoint")),
            out_dir=str(d.get("out_dir", "outputs")),
            prompt=text(d.get("prompt")),
            context_tokens=check_context_tokens(d.get("context_tokens")),
            decode=decode_settings(d),
        )


def decode_settings(d: dict) -> DecodeConfig:
    """The decoding settings among a config's keys (conf/decode.yaml), checked; the rest keep their defaults."""
    decode = DecodeConfig()
    for key in SETTABLE:
        if key in d:
            decode = set_decode(decode, key, d[key])
    return decode


def check_context_tokens(ctx):
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 8):
        raise ConfigError(f"context_tokens={ctx!r} must be an integer >= 8 (or null for the model's window)")
    return ctx


# the integer settings (int, or int | None for seed); the others are floats, and method a word
INT_KEYS = tuple(f.name for f in fields(DecodeConfig) if f.type is int or str(f.type).startswith("int |"))


def _parse(key: str, value):
    """A /set or YAML value for DecodeConfig.key, or ValueError."""
    if key == "method":
        return str(value).strip()
    if key == "seed" and (value is None or str(value).strip().lower() in ("none", "null")):
        return None
    if isinstance(value, bool):
        raise ValueError
    if key in INT_KEYS:
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    return float(value)


def set_decode(decode: DecodeConfig, key: str, value) -> DecodeConfig:
    """A copy of `decode` with key=value (a string or a YAML scalar), checked; ConfigError if bad."""
    if key not in SETTABLE:
        raise ConfigError(f"unknown setting {key!r} (settable: {', '.join(SETTABLE)})")
    try:
        parsed = _parse(key, value)
    except (TypeError, ValueError, OverflowError):
        kind = "an integer" if key in INT_KEYS else "a number"
        raise ConfigError(f"{key}={value!r} is not {kind}") from None
    try:
        return replace(decode, **{key: parsed}).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ---- a conversation ----------------------------------------------------------------------------------
class Conversation:
    """The turns so far, as token ids, and the prompt for the next question within a token budget.

    The prompt is the tokenizer's chat template: <bos>, then <user> q <assistant> a <eos> per exchange,
    then <user> question <assistant>. Ids, not text, are kept: the model sees its own replies exactly.
    """

    def __init__(self, budget: int):
        self.budget = budget  # most tokens a prompt may take
        self.exchanges: list[tuple[list[int], list[int]]] = []

    def clear(self) -> None:
        self.exchanges = []

    def add(self, question: list[int], reply: list[int]) -> None:
        self.exchanges.append((question, reply))

    def prompt(self, question: list[int]) -> tuple[list[int], list[int], list[str]]:
        """(prompt ids, question ids as kept, notices): oldest exchanges dropped, then the question cut."""
        notices = []
        room = self.budget - 3  # <bos> <user> … <assistant>
        if len(question) > room:
            notices.append(
                f"（输入过长：{len(question)} 个词元，只保留最后 {room} 个）input truncated to fit"
            )
            question = question[-room:]
        sizes = [len(q) + len(a) + 3 for q, a in self.exchanges]  # <user> q <assistant> a <eos>
        history, dropped = sum(sizes), 0
        while dropped < len(sizes) and history + len(question) > room:  # oldest first, a running sum
            history -= sizes[dropped]
            dropped += 1
        del self.exchanges[:dropped]
        if dropped:
            notices.append(f"（对话过长，已忘记最早的 {dropped} 轮）oldest turns dropped to fit the window")
        ids = [BOS_ID]
        for q, a in self.exchanges:
            ids += [USER_ID, *q, ASSISTANT_ID, *a, EOS_ID]
        return ids + [USER_ID, *question, ASSISTANT_ID], question, notices


def context_window(model, context_tokens: int | None) -> int:
    """Tokens of prompt + reply a conversation keeps: context_tokens, or the model's whole window."""
    n = model.config.block_size
    if context_tokens is not None and context_tokens > n:
        raise ConfigError(f"context_tokens={context_tokens} exceeds the model's window of {n} tokens")
    return context_tokens or n


def prompt_budget(context_tokens: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed: the context less room for the reply, but never under half the context."""
    return max(context_tokens - max_new_tokens, context_tokens // 2)


class ReplyText:
    """A reply's text as its tokens arrive. add() returns the text that is new and final: each token's
    piece whole (decoding joins pieces, so the text grows by exactly that piece), except that text ending
    in the start of a stop string is held back until it is known not to be one. At a stop string the
    reply ends, the stop string cut off."""

    def __init__(self, tok, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tok, tuple(s for s in stop if s)
        self.longest = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        if self.stopped:  # the reply has ended: later tokens are not part of it
            return ""
        self.ids.append(token)
        piece = self.tok.decode([token])
        self.text += piece
        # Only the tail a new piece can complete is searched: a stop string found now ends in the piece, so
        # it starts in the last len(longest) + len(piece) characters (and not before `sent`). A token then
        # costs the same however long the reply; the plain form searches all of self.text.
        at = max(self.sent, len(self.text) - len(piece) - self.longest)
        tail = self.text[at:]
        cuts = [at + i for i in (tail.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self.rest()
        held = max((k for s in self.stop for k in range(1, len(s)) if tail.endswith(s[:k])), default=0)
        new = self.text[self.sent : len(self.text) - held]
        self.sent += len(new)
        return new

    def rest(self) -> str:
        """What is still held back (the reply has ended)."""
        new, self.sent = self.text[self.sent :], len(self.text)
        return new


class Chat:
    """One chat session: a model, its tokenizer, decoding settings and the conversation."""

    def __init__(self, model, tok, decode: DecodeConfig, context_tokens: int | None = None):
        self.model, self.tok, self.decode = model, tok, decode
        self.context_tokens = context_window(model, context_tokens)
        self.generator = make_generator(decode.seed, model.device)
        self.conversation = Conversation(self.budget())

    def budget(self) -> int:
        return prompt_budget(self.context_tokens, self.decode.max_new_tokens)

    def set(self, **values) -> None:
        """Change decoding settings, all or none (ConfigError names the first bad one)."""
        decode = self.decode
        for key, value in values.items():
            decode = set_decode(decode, key, value)
        if decode.seed != self.decode.seed:
            self.generator = make_generator(decode.seed, self.model.device)
        self.decode = decode
        self.conversation.budget = self.budget()

    def reply(self, text: str, out=None, remember: bool = True) -> str:
        """Answer `text`, writing the reply to `out` as it is generated (when given); return the reply."""
        question = self.tok.encode(text)
        prompt, question, notices = self.conversation.prompt(question)
        for n in notices:
            note(n)
        if self.decode.method == "beam":  # beams cannot stream: the best one is known only at the end
            ids = generate(self.model, prompt, self.decode)
            shown = self.tok.decode(ids)
            if out is not None:
                out.write(shown)
        else:
            text = ReplyText(self.tok)
            for token in stream(self.model, prompt, self.decode, generator=self.generator):
                new = text.add(token)
                if out is not None:
                    out.write(new)
                    out.flush()
            ids, shown = text.ids, text.text
        if remember:
            self.conversation.add(question, ids)
        return shown

    def command(self, line: str) -> str | None:
        """Run a /command; returns a message to show, or None for /quit."""
        name, _, rest = line.strip().partition(" ")
        name = name.lower()
        if name in ("/quit", "/exit", "/q"):
            return None
        if name in ("/help", "/h", "/?"):
            return self.help()
        if name == "/clear":
            self.conversation.clear()
            return "（已清空对话历史）history cleared"
        if name == "/set":
            pairs = re.findall(r"([\w.]+)\s*[=\s]\s*(\S+)", rest)
            if not pairs:
                return "用法 (usage): /set key=value, e.g. /set temperature=0.7"
            try:
                self.set(**dict(pairs))
            except ConfigError as e:
                return f"无效设置 (invalid): {e}"
            done = [f"{key}={getattr(self.decode, key)}" for key, _ in pairs]
            hint = ""
            if self.decode.method == "greedy" and any(
                k in ("temperature", "top_k", "top_p") for k, _ in pairs
            ):
                hint = "  (method=greedy ignores it: /set method=sample to sample)"
            return "已设置 (set): " + " ".join(done) + hint
        return f"未知命令 (unknown command) {name}: /help lists the commands"

    def settings(self) -> str:
        return " ".join(f"{k}={getattr(self.decode, k)}" for k in SETTABLE)

    def help(self) -> str:
        return HELP.format(keys=", ".join(SETTABLE), settings=self.settings())


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


@hydra_main("chat")
def _main(cfg) -> None:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    device = setup_runtime(raw.pop("device"), raw.pop("threads"), raw.pop("allocator"))
    c = ChatConfig.from_dict(raw)
    if c.prompt is not None and not c.prompt.strip():
        raise ConfigError('prompt is empty: give a question, e.g. prompt="山脉是如何形成的？"')
    model, tok, path = open_model(c.checkpoint, c.out_dir, device)
    chat = Chat(model, tok, c.decode, c.context_tokens)
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
    sys.argv[1:] = quote_text_overrides(sys.argv[1:])
    with torch.no_grad():
        _main()


if __name__ == "__main__":
    main()
