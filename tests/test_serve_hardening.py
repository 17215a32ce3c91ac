"""The server against hostile or careless clients (issue 24). First its pieces, each against its plain form:
the stop-string check, which searches only what a new token can complete, and the dropping of old turns."""

import random
import time

from rgpt.chat import Conversation, ReplyText


class Pieces:
    """A tokenizer whose ids are pieces of text of one to three characters from a small alphabet."""

    def __init__(self, rng):
        self.pieces = ["".join(rng.choice("ab山") for _ in range(rng.randint(1, 3))) for _ in range(20)]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


class PlainReplyText(ReplyText):
    """ReplyText.add in its plain form: the whole text searched for each stop string and its prefixes."""

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text += self.tok.decode([token])
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self.rest()
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        new = self.text[self.sent : len(self.text) - held]
        self.sent += len(new)
        return new


def test_reply_text_searches_only_the_tail_and_agrees_with_the_plain_form():
    rng = random.Random(0)
    for case in range(3000):
        tok = Pieces(rng)
        stop = tuple(
            "".join(rng.choice("ab山") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 4))
        )
        ids = [rng.randrange(20) for _ in range(rng.randint(1, 40))]
        fast, plain = ReplyText(tok, stop), PlainReplyText(tok, stop)
        got = ([fast.add(i) for i in ids], fast.stopped, fast.rest(), fast.text)
        want = ([plain.add(i) for i in ids], plain.stopped, plain.rest(), plain.text)
        assert got == want, (case, stop, [tok.pieces[i] for i in ids], got, want)
    # the cost of a token does not grow with the reply: the last 2,000 of 20,000 cost about the first 2,000
    tok = Pieces(random.Random(1))
    tok.pieces = ["a"] * 20  # every stop string's prefix matches the end of the text at every token
    text = ReplyText(tok, tuple("a" * 63 + c for c in "bcde"))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(2000):
            text.add(0)
        times.append(time.perf_counter() - start)
    assert not text.stopped and times[-1] < 3 * times[0] + 0.05, (
        f"first 2,000 {times[0]:.3f} s, last {times[-1]:.3f} s"
    )


def test_dropping_old_turns_is_one_pass():
    """50,000 exchanges, all but a few dropped: one pass (a sum recomputed per dropped turn took minutes)."""
    conversation = Conversation(48)
    for _ in range(50_000):
        conversation.add([5, 6], [7])
    start = time.monotonic()
    conversation.prompt([5])
    assert len(conversation.exchanges) == 7 and time.monotonic() - start < 1.0
