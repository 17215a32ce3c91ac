"""A conversation with a model: the turns kept within the window, the reply's text as tokens arrive, and a
chat session's decoding settings. Shared by `python -m rgpt.chat`, the server and eval."""

import re
import sys
from dataclasses import dataclass, field, fields, replace

from rgpt.data.tokenizer import ASSISTANT_ID, BOS_ID, EOS_ID, USER_ID
from rgpt.inference.generate import DecodeConfig, generate, make_generator, stream
from rgpt.settings import FLAT, ConfigError, check, parse

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


@dataclass
class ReplySettings:
    """How replies are made, shared by chat and serve (and eval's decoding): a request or /set changes them."""

    decode: DecodeConfig = field(default_factory=DecodeConfig, metadata=FLAT)  # method=, temperature=, ...
    # tokens of prompt + reply kept for the conversation; None: the model's window
    context_tokens: int | None = None

    def validate(self) -> "ReplySettings":
        ctx = self.context_tokens
        check(
            ctx is None or ctx >= 8,
            "context_tokens",
            ctx,
            "must be an integer >= 8 (or null for the model's window)",
        )
        try:
            self.decode.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


def set_decode(decode: DecodeConfig, key: str, value) -> DecodeConfig:
    """A copy of `decode` with key=value (a string or a YAML scalar), checked; ConfigError if bad."""
    if key not in SETTABLE:
        raise ConfigError(f"unknown setting {key!r} (settable: {', '.join(SETTABLE)})")
    parsed = getattr(parse(DecodeConfig, {key: value.strip() if isinstance(value, str) else value}), key)
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


def context_window(block_size: int, context_tokens: int | None) -> int:
    """Tokens of prompt + reply a conversation keeps: context_tokens, or the model's whole window."""
    if context_tokens is not None and context_tokens > block_size:
        raise ConfigError(
            f"context_tokens={context_tokens} exceeds the model's window of {block_size} tokens"
        )
    return context_tokens or block_size


def prompt_budget(context_tokens: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed: the context less room for the reply, but never under half the context."""
    return max(context_tokens - max_new_tokens, context_tokens // 2)


class ReplyText:
    """A reply's text as its tokens arrive. add() returns the text that is new and final: what each token adds
    (tok.decode_more: a jieba token's piece whole, since decoding joins pieces), except that text ending
    in the start of a stop string is held back until it is known not to be one. At a stop string the
    reply ends, the stop string cut off."""

    def __init__(self, tok, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tok, tuple(s for s in stop if s)
        self.longest = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False
        self.decoded = ""  # the tokens' text so far; self.text is cut at a stop string

    def add(self, token: int) -> str:
        if self.stopped:  # the reply has ended: later tokens are not part of it
            return ""
        self.ids.append(token)
        piece = self.tok.decode_more(self.ids, self.decoded)
        self.decoded += piece
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
        self.context_tokens = context_window(model.config.block_size, context_tokens)
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
