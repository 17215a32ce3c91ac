"""The web side's handle on the decoding process: requests go to it, their text comes back.

python -m rgpt.serve decodes in a process of its own (rgpt.inference.decoder: why, and what crosses the
socket between the two). Here, in the web process, an Engine starts it, bounds the queue (check_room,
submit), passes cancellations on, and turns what comes back into each reply's events. Its run(), in the
main thread, reads the decoder's messages and hands each reply's events to the asyncio loop that waits for
them (call_soon_threadsafe): ("text", new text) as it is decoded, then ("end", finish_reason, tokens
generated); or ("error", HTTP status, message) if decoding failed or the server is shutting down.

Should the decoding process die (its loop failed, or it was killed), every open reply is ended with a 503,
`failure` says why, /health answers 503 and submit() refuses at once instead of queueing replies nobody
decodes.
"""

import asyncio
import itertools
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection

from rgpt.inference.decoder import receive, send, submission
from rgpt.inference.generate import DecodeConfig
from rgpt.settings import ConfigError


class Busy(Exception):
    """The queue is full: the request should be retried later."""


class Unavailable(Exception):
    """No reply can be made: the decoding process has stopped (it failed, or the server is shutting down)."""


@dataclass(eq=False)
class Reply:
    """One request being answered. The web side reads `events`; Engine.run writes them."""

    prompt: list[int]
    decode: DecodeConfig
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = -1  # the decoder's name for it (submit)


class Engine:
    """The decoding process: start() waits until it has loaded the model, run() reads it until it ends,
    shutdown() stops it."""

    def __init__(self, model, runtime, max_active: int, max_queue: int, decoding: dict):
        """model: a ModelChoice, runtime: RuntimeSettings; decoding: the rest of Decoder's arguments."""
        self.max_active, self.max_queue = max_active, max_queue
        self.settings = {
            "model": asdict(model),
            "runtime": asdict(runtime),
            "max_active": max_active,
            **decoding,
        }
        self.open: dict[int, Reply] = {}  # submitted and not ended, by id
        self.ids = itertools.count()
        self.told = {"active": 0, "queued": 0, "served": 0}  # the decoder's last counts
        self.lock = threading.Lock()  # self.open, and the sending end of the socket
        self.stopping = False
        self.failure: str | None = None  # why the decoding process died, if it did
        self.running = False  # from start() until the decoding process ends
        self.proc = self.conn = None

    def start(self) -> dict:
        """Start the decoding process and wait until its model is loaded: {"path", "block_size"}, or
        ConfigError with the one-line reason it gives (a checkpoint that is not there, a bad precision)."""
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "rgpt.inference.decoder", str(theirs.fileno())]
        # a session of its own: Ctrl-C at a terminal reaches only this process, which then stops it
        self.proc = subprocess.Popen(
            command, pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        send(self.conn, self.settings)
        try:
            answer = receive(self.conn)
        except (EOFError, OSError):
            raise ConfigError(
                f"the decoding process failed to start (exit code {self.proc.wait()})"
            ) from None
        if "failed" in answer:
            self.proc.wait()
            raise ConfigError(answer["failed"])
        self.running = True
        return answer["ready"]

    def shutdown(self, why: str) -> None:
        """End every open reply with a 503 and stop the decoding process (it exits when its socket closes)."""
        with self.lock:
            self.stopping = True
            self._end_all(why)
            if self.conn is not None:
                self.conn.close()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.running = False

    def problem(self) -> str | None:
        """Why no reply can be made now (the decoding process died, is stopping or has ended), or None."""
        if self.failure is not None:
            return f"the decoding loop has stopped ({self.failure})"
        if self.stopping:
            return "the server is shutting down"
        return None if self.running else "the decoding loop is not running"

    def counts(self) -> dict:
        return dict(self.told)

    def check_room(self) -> None:
        """Raise Busy when max_active are decoding and max_queue more are waiting, Unavailable when the
        decoding process has stopped: cheap, so a request is refused before its prompt is tokenized."""
        with self.lock:
            self._check_room()

    def _check_room(self) -> None:
        why = self.problem()
        if why is not None:
            raise Unavailable(why)
        if len(self.open) >= self.max_active + self.max_queue:
            raise Busy(f"{len(self.open) - self.max_active} requests are already waiting")

    def submit(self, reply: Reply) -> Reply:
        """Send a reply to the decoder, or raise Busy or Unavailable (see check_room)."""
        with self.lock:
            self._check_room()
            reply.id = next(self.ids)
            self.open[reply.id] = reply
            self._send(submission(reply.id, reply.prompt, reply.decode, reply.stop))
        return reply

    def cancel(self, reply: Reply) -> None:
        """The client left: the decoder drops the reply (a waiting one now, an active one at its next turn)."""
        with self.lock:
            if self.open.pop(reply.id, None) is not None:
                self._send({"cancel": reply.id})

    def _send(self, message: dict) -> None:
        try:
            send(self.conn, message)
        except OSError:  # the decoding process is gone: run() is ending every reply
            pass

    # ---- what comes back -----------------------------------------------------------------------------
    def run(self) -> None:
        """Read the decoder's messages, in the calling thread, until it ends (its loop died or it was
        killed; the web side then answers 503) or Ctrl-C, which propagates (the caller calls shutdown())."""
        while True:
            try:
                message = receive(self.conn)
            except (EOFError, OSError):
                code = self.proc.wait()
                return self._die(f"the decoding process exited with code {code}")
            if "died" in message:
                return self._die(message["died"])
            self._hand_over(message["events"])
            self.told = message["counts"]

    def _hand_over(self, events: list) -> None:
        """The decoder's events, each to its open reply (an end or an error closes it)."""
        items = []
        with self.lock:
            for rid, *event in events:
                reply = self.open.get(rid)
                if reply is None:  # cancelled: its client has gone
                    continue
                if event[0] != "text":
                    del self.open[rid]
                items.append((reply, tuple(event)))
        _to_loops(items)

    def _die(self, why: str) -> None:
        print(
            f"rgpt serve: the decoding loop stopped: {why}; /health answers 503",
            file=sys.stderr,
            flush=True,
        )
        with self.lock:
            self.failure = why
            self._end_all(f"the decoding loop has stopped ({why})")
        self.running = False

    def _end_all(self, why: str) -> None:
        """End every open reply with a 503 (the lock is held)."""
        _to_loops([(reply, ("error", 503, why)) for reply in self.open.values()])
        self.open = {}


def _to_loops(items: list) -> None:
    """(reply, event) pairs to the replies' queues, on each reply's event loop: one wake-up of each loop."""
    by_loop: dict = {}
    for reply, event in items:
        by_loop.setdefault(reply.loop, []).append((reply, event))
    for loop, theirs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put, theirs)
        except RuntimeError:  # the event loop has closed (the server is shutting down)
            pass


def _put(items: list) -> None:
    """On the event loop: each event into its reply's queue."""
    for reply, event in items:
        reply.events.put_nowait(event)
