"""One model answering many requests: a decoding loop that decodes every active reply together.

Requests wait in a bounded queue; up to `max_active` replies are decoded at once by a Batcher
(rgpt.inference.batch): each step prefills a chunk of the prompts that are starting and decodes one token of
every other active reply in one forward, so replies join and leave between steps and a long prompt never
stalls the others for long. Each reply has its own slot of KV caches, its own random generator and its own
position, so tokens cannot cross between conversations: the same request and seed give the same text
alone or among others (tested with 32 streams). A reply whose client went away is dropped before the next step.

The decoding loop (Engine.run) owns the model and runs in the process's main thread (python -m rgpt.serve puts
the web server in a thread of its own): torch's CPU thread pool, driven from any other thread, decoded
model=small at half the speed (one reply: 360 against 660-740 tokens/s with 2 threads). The web server's
event loop only submits, cancels and reads events.
Events reach a reply's asyncio queue through call_soon_threadsafe: ("text", new text) as it is decoded,
then ("end", finish_reason, tokens generated); or ("error", HTTP status, message) if decoding failed
or the server is shutting down.

What fails for one reply (its admission, its prefill, its token, its text) ends that reply alone with a 500;
should a step fail for all (the batched forward), every active reply gets the error and the loop goes on.
Should the loop itself die, every reply is ended with a 503, `failure` says why, and submit() refuses
at once instead of queueing replies nobody decodes.
"""

import asyncio
import collections
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from rgpt.inference.batch import Batcher, Event, Row
from rgpt.inference.conversation import ReplyText
from rgpt.inference.generate import DecodeConfig


class Busy(Exception):
    """The queue is full: the request should be retried later."""


class Unavailable(Exception):
    """No reply can be made: the decoding loop has stopped (it failed, or the server is shutting down)."""


@dataclass(eq=False)
class Reply:
    """One request being answered. The web side reads `events`; the worker writes them."""

    prompt: list[int]
    decode: DecodeConfig
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the web side when its client left; the worker drops the reply
    done: bool = False
    row: Row | None = None  # the worker's: its place in the Batcher, its text so far, events posted
    text: ReplyText | None = None
    posted: int = 0


class Engine:
    """The queue of replies and the loop that decodes them (run() it; after Ctrl-C, shutdown() ends them)."""

    def __init__(
        self, model, tok, max_active: int, max_queue: int, prefill_chunk: int = 64, hand_over: float = 0.0
    ):
        self.model, self.tok = model, tok
        self.hand_over, self.handed = hand_over, 0.0  # see _flush
        self.max_active, self.max_queue = max_active, max_queue
        self.batcher = Batcher(model, max_active, prefill_chunk)
        self.waiting: collections.deque[Reply] = collections.deque()
        self.active: list[Reply] = []  # admitted to the batcher, in admission order
        self.served = 0
        self.lock = threading.Condition()
        self.stopping = False
        self.failure: str | None = None  # why the decoding loop died, if it did
        self.running = True  # until run() returns: requests that come before it starts wait in the queue
        self.outbox: list[tuple[Reply, tuple]] = []  # events not yet handed to the event loop (_flush)
        self.urgent = False  # the outbox holds a first token, an end or an error: hand it over now

    def shutdown(self, why: str) -> None:
        """After run() was interrupted (Ctrl-C): end every reply, active or waiting, with a 503."""
        with self.lock:
            self.stopping = True
            self._end_all(why)
            self._flush()

    def problem(self) -> str | None:
        """Why no reply can be made now (the decoding loop died, is stopping or has ended), or None."""
        if self.failure is not None:
            return f"the decoding loop has stopped ({self.failure})"
        if self.stopping:
            return "the server is shutting down"
        return None if self.running else "the decoding loop is not running"

    def counts(self) -> dict:
        with self.lock:
            return {"active": len(self.active), "queued": len(self.waiting), "served": self.served}

    def check_room(self) -> None:
        """Raise Busy when max_active are decoding and max_queue more are waiting, Unavailable when the
        loop has stopped: cheap, so a request is refused before its prompt is tokenized."""
        with self.lock:
            self._check_room()

    def _check_room(self) -> None:
        why = self.problem()
        if why is not None:
            raise Unavailable(why)
        if len(self.active) + len(self.waiting) >= self.max_active + self.max_queue:
            raise Busy(f"{len(self.waiting)} requests are already waiting")

    def submit(self, reply: Reply) -> Reply:
        """Queue a reply, or raise Busy or Unavailable (see check_room)."""
        with self.lock:
            self._check_room()
            self.waiting.append(reply)
            self.lock.notify()
        return reply

    def cancel(self, reply: Reply) -> None:
        """The client left: a waiting reply leaves the queue now, an active one at its next turn."""
        with self.lock:
            reply.cancelled = True
            if reply in self.waiting:
                self.waiting.remove(reply)

    # ---- the decoding loop --------------------------------------------------------------------------
    def run(self) -> None:
        """Decode, in the calling thread (the main one: see the module docstring), until Ctrl-C, which
        propagates (the caller ends the replies with shutdown()); returns only if the loop died (the web
        side then answers 503)."""
        try:
            self._loop()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # the loop is dying: no reply may wait for it, and /health must say so
            traceback.print_exc()  # a bug in the loop itself: its traceback belongs in the server's log
            self._die(f"{type(e).__name__}: {e}")
        finally:
            self.running = False

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # inference, as in chat
        while True:
            with self.lock:
                while not (self.waiting or self.active):
                    self.lock.wait()
                while self.waiting and len(self.active) < self.max_active:
                    self._admit(self.waiting.popleft())
                gone = [reply for reply in self.active if reply.cancelled and not reply.done]
            for reply in gone:  # outside the lock: submit and cancel never wait for a step
                self.batcher.drop(reply.row)
                reply.done = True
            self._step()
            if self.urgent or time.monotonic() - self.handed >= self.hand_over or not self.active:
                self._flush()
            with self.lock:
                finished = sum(reply.done for reply in self.active)
                self.served += finished
                if finished:
                    self.active = [reply for reply in self.active if not reply.done]

    def _admit(self, reply: Reply) -> None:
        """A waiting reply becomes active: its text and its row in the batcher (a failure ends it alone)."""
        self.active.append(reply)
        try:
            reply.text = ReplyText(self.tok, reply.stop)
            reply.row = self.batcher.add(Row(reply.prompt, reply.decode, key=reply))  # seeded by decode.seed
        except Exception as e:
            self._fail(reply, e)

    def _step(self) -> None:
        """One step of the batcher, and its tokens delivered; a step that fails as a whole fails every reply
        in it (their slots are freed) and the loop goes on."""
        if not len(self.batcher):
            return
        try:
            events = self.batcher.step()
        except Exception as e:
            for reply in self.active:
                if not reply.done:
                    self.batcher.drop(reply.row)
                    self._fail(reply, e)
            return
        for event in events:
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        """A reply's new token (or its end) as text events, all of it guarded: a failure ends it alone."""
        reply = event.row.key
        if reply.done:  # its client left during the step
            return
        try:
            if event.error is not None:
                raise event.error
            text = reply.text
            if event.token is not None:
                new = text.add(event.token)
                if new:
                    self._post(reply, ("text", new))
                if text.stopped:  # a stop string: the reply ends here, whatever the batcher would do next
                    self.batcher.drop(reply.row)
                    return self._finish(reply, text, "stop")
            if event.end is not None:
                self._finish(reply, text, event.end)
        except Exception as e:
            self.batcher.drop(reply.row)
            self._fail(reply, e)

    def _finish(self, reply: Reply, text: ReplyText, reason: str) -> None:
        held = text.rest()
        if held:
            self._post(reply, ("text", held))
        reply.done = True
        self._post(reply, ("end", reason, len(text.ids)))

    def _fail(self, reply: Reply, e: Exception) -> None:
        reply.done = True
        message = f"decoding failed: {type(e).__name__}: {e}"
        print(f"rgpt serve: a reply's {message}", file=sys.stderr, flush=True)
        self._post(reply, ("error", 500, message))

    def _end_all(self, why: str) -> None:
        """End every reply, active or waiting, with a 503 (the lock is held)."""
        for reply in [*self.active, *self.waiting]:
            if not reply.done:
                self._post(reply, ("error", 503, why))
        self.active, self.waiting = [], collections.deque()

    def _die(self, why: str) -> None:
        print(
            f"rgpt serve: the decoding loop stopped: {why}; /health answers 503",
            file=sys.stderr,
            flush=True,
        )
        with self.lock:
            self.failure = why
            self._end_all(f"the decoding loop has stopped ({why})")
            self._flush()

    def _post(self, reply: Reply, event: tuple) -> None:
        """Hold an event for its reply until _flush: a step's events cross to the event loop together."""
        self.outbox.append((reply, event))
        if event[0] != "text" or not reply.posted:  # an end, an error, or the reply's first text
            self.urgent = True
        reply.posted += 1

    def _flush(self) -> None:
        """Hand the held events to their event loops: one wake-up of each loop per step, not per token, and
        at most one each `hand_over` seconds while only more text waits. Each wake-up costs the decoding
        loop the GIL while the web side writes (model=small, one stream: a fifth of its time when every step
        woke it), so with fast steps a few tokens go out together; a first token, an end and an error go
        at once."""
        self.handed, self.urgent = time.monotonic(), False
        by_loop: dict = {}
        for reply, event in self.outbox:
            by_loop.setdefault(reply.loop, []).append((reply, event))
        self.outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:  # the event loop has closed (the server is shutting down)
                for reply, _ in items:
                    reply.cancelled = True


def _hand_over(items: list) -> None:
    """On the event loop: each event into its reply's queue."""
    for reply, event in items:
        reply.events.put_nowait(event)
