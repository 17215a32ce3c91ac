"""The decoding process: one model decoding every active reply together, fed and read over a socket.

python -m rgpt.serve starts it (rgpt.inference.engine) as `python -m rgpt.inference.decoder FD`, FD its
end of a socket pair. The web process sends the settings, then requests; this process answers with the
replies' text as it is decoded. Each message is one JSON object, framed by multiprocessing's Connection
(send_bytes / recv_bytes: no pickle):

    web -> decoder   {"model": ModelChoice's keys, "runtime": {...}, "max_active": n, ...}   (first)
                     {"submit": id, "prompt": [ids], "decode": DecodeConfig's keys, "stop": [...]}
                     {"cancel": id}                        the client left
    decoder -> web   {"ready": {"path": checkpoint, "block_size": n}}  or  {"failed": "one line"}   (first)
                     {"events": [[id, kind, ...], ...], "counts": {...}}
                         kind: "text" new_text | "end" finish_reason n_tokens | "error" http_status message
                     {"died": why}                         the loop failed: the process then exits

Why a process of its own: the decoding loop and the web server in one process take turns on one GIL, and
every torch call lets the other side in (model=small at 16 streams, 2 cores: the in-process loop ran at
62% of its bare speed). Here the loop has the interpreter to itself and the web process works beside it.

Requests wait in a queue; up to `max_active` replies are decoded at once by a Batcher
(rgpt.inference.batch): each step prefills a chunk of the prompts that are starting and decodes one token of
every other active reply in one forward, so replies join and leave between steps and a long prompt never
stalls the others for long. Each reply has its own slot of KV caches, its own random generator and its own
position, so tokens cannot cross between conversations: the same request and seed give the same text
alone or among others (tested with 32 streams). A reply whose client went away is dropped before the next step.

What fails for one reply (its admission, its prefill, its token, its text) ends that reply alone with a 500;
should a step fail for all (the batched forward), every active reply gets the error and the loop goes on.
Should the loop itself die, it says why ({"died"}) and the process exits: the web side answers 503.
The process ignores Ctrl-C (the web process stops it) and exits when the web process closes its socket.
"""

import collections
import json
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

import torch

from rgpt.inference.batch import Batcher, Event, Row
from rgpt.inference.conversation import ReplyText
from rgpt.inference.generate import DecodeConfig


def send(conn: Connection, message: dict) -> None:
    conn.send_bytes(json.dumps(message, ensure_ascii=False).encode())


def receive(conn: Connection) -> dict:
    """The next message (blocks); EOFError once the other side has closed."""
    return json.loads(conn.recv_bytes())


def submission(rid: int, prompt: list[int], decode: DecodeConfig, stop: tuple[str, ...]) -> dict:
    return {"submit": rid, "prompt": prompt, "decode": asdict(decode), "stop": list(stop)}


@dataclass(eq=False)
class Job:
    """One reply being decoded: its request, its row in the batcher, its text so far."""

    id: int
    prompt: list[int]
    decode: DecodeConfig
    stop: tuple[str, ...]
    cancelled: bool = False
    done: bool = False
    row: Row | None = None
    text: ReplyText | None = None
    posted: int = 0  # events sent for it


class Decoder:
    """The queue of jobs and the loop that decodes them; run() until the web side closes the socket."""

    def __init__(self, model, tok, conn: Connection, max_active: int, prefill_chunk=64, hand_over=0.0):
        self.tok, self.conn = tok, conn
        self.hand_over, self.handed = hand_over, 0.0  # see _flush
        self.max_active = max_active
        self.batcher = Batcher(model, max_active, prefill_chunk)
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []  # admitted to the batcher, in admission order
        self.served = 0
        self.outbox: list[list] = []  # events not yet sent (_flush)
        self.texts: dict[int, list] = {}  # a reply's text event in the outbox, which more text joins (_post)
        self.urgent = False  # the outbox holds a first text, an end or an error: send it now
        self.told: dict | None = None  # the counts last sent

    def run(self) -> None:
        """Decode until the web side closes the socket; a failure of the loop itself is sent as "died"."""
        torch.set_grad_enabled(False)  # inference, as in chat
        try:
            while self._read(wait=not (self.waiting or self.active)):
                self._turn()
        except ConnectionError:  # the web side has gone while we were sending: so has every reply
            return
        except BaseException as e:  # the loop is dying: the web side must end every reply and say why
            traceback.print_exc()  # a bug in the loop itself: its traceback belongs in the server's log
            try:
                send(self.conn, {"died": f"{type(e).__name__}: {e}"})
            except OSError:  # the web side is gone too
                pass
            raise SystemExit(1) from None

    def _read(self, wait: bool) -> bool:
        """Take the requests that came (waiting for one if `wait`); False once the web side has closed."""
        while wait or self.conn.poll():
            wait = False
            try:
                message = receive(self.conn)
            except EOFError:
                return False
            if "submit" in message:
                decode = DecodeConfig(**message["decode"])
                self.waiting.append(Job(message["submit"], message["prompt"], decode, tuple(message["stop"])))
            elif "cancel" in message:  # a waiting job leaves the queue now, an active one at its next turn
                job = next((j for j in [*self.waiting, *self.active] if j.id == message["cancel"]), None)
                if job is not None:
                    job.cancelled = True
                    if job in self.waiting:
                        self.waiting.remove(job)
        return True

    def _turn(self) -> None:
        """Admit, drop the cancelled, one step, and send what it decoded."""
        while self.waiting and len(self.active) < self.max_active:
            self._admit(self.waiting.popleft())
        for job in self.active:
            if job.cancelled and not job.done:
                self.batcher.drop(job.row)
                job.done = True
        self._step()
        finished = sum(job.done for job in self.active)
        if finished:
            self.served += finished
            self.active = [job for job in self.active if not job.done]
        if self.urgent or time.monotonic() - self.handed >= self.hand_over or not self.active:
            self._flush()

    def _admit(self, job: Job) -> None:
        """A waiting job becomes active: its text and its row in the batcher (a failure ends it alone)."""
        self.active.append(job)
        try:
            job.text = ReplyText(self.tok, job.stop)
            job.row = self.batcher.add(Row(job.prompt, job.decode, key=job))  # seeded by decode.seed
        except Exception as e:
            self._fail(job, e)

    def _step(self) -> None:
        """One step of the batcher, and its tokens delivered; a step that fails as a whole fails every job
        in it (their slots are freed) and the loop goes on."""
        if not len(self.batcher):
            return
        try:
            events = self.batcher.step()
        except Exception as e:
            for job in self.active:
                if not job.done:
                    self.batcher.drop(job.row)
                    self._fail(job, e)
            return
        for event in events:
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        """A job's new token (or its end) as text events, all of it guarded: a failure ends it alone."""
        job = event.row.key
        if job.done:  # its client left during the step
            return
        try:
            if event.error is not None:
                raise event.error
            text = job.text
            if event.token is not None:
                new = text.add(event.token)
                if new:
                    self._post(job, "text", new)
                if text.stopped:  # a stop string: the reply ends here, whatever the batcher would do next
                    self.batcher.drop(job.row)
                    return self._finish(job, text, "stop")
            if event.end is not None:
                self._finish(job, text, event.end)
        except Exception as e:
            self.batcher.drop(job.row)
            self._fail(job, e)

    def _finish(self, job: Job, text: ReplyText, reason: str) -> None:
        held = text.rest()
        if held:
            self._post(job, "text", held)
        job.done = True
        self._post(job, "end", reason, len(text.ids))

    def _fail(self, job: Job, e: Exception) -> None:
        job.done = True
        message = f"decoding failed: {type(e).__name__}: {e}"
        print(f"rgpt serve: a reply's {message}", file=sys.stderr, flush=True)
        self._post(job, "error", 500, message)

    def _post(self, job: Job, *event) -> None:
        """Hold an event until _flush: the events of the steps since cross to the web side in one message,
        and a reply's text decoded meanwhile as one piece (one chunk of its stream, not one per token: the
        web process and the client parse each chunk)."""
        if job.cancelled:
            return
        held = self.texts.get(job.id)
        if event[0] == "text" and held is not None:
            held[2] += event[1]
            return
        self.outbox.append([job.id, *event])
        if event[0] == "text":
            self.texts[job.id] = self.outbox[-1]
        if event[0] != "text" or not job.posted:  # an end, an error, or the reply's first text
            self.urgent = True
        job.posted += 1

    def counts(self) -> dict:
        return {"active": len(self.active), "queued": len(self.waiting), "served": self.served}

    def _flush(self) -> None:
        """Send the held events (and the counts, for /health) in one message: at most one each `hand_over`
        seconds while only more text waits, since each wakes the web side; a first text, an end and an error
        go at once."""
        self.handed, self.urgent = time.monotonic(), False
        counts = self.counts()
        if self.outbox or counts != self.told:
            send(self.conn, {"events": self.outbox, "counts": counts})
            self.outbox, self.texts, self.told = [], {}, counts


def main(fd: int) -> None:
    """The process's life: settings, the model, "ready" (or a one-line "failed"), then the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the web process's to handle: it stops this one
    from rgpt.data import CorpusError
    from rgpt.inference.load import ModelChoice
    from rgpt.runtime.checkpoint import CheckpointError
    from rgpt.runtime.device import RuntimeSettings
    from rgpt.settings import ConfigError

    conn = Connection(fd)
    try:
        settings = receive(conn)
        try:
            device = RuntimeSettings(**settings["runtime"]).apply()
            model, tok, path = ModelChoice(**settings["model"]).open(device)
        except (ConfigError, CorpusError, CheckpointError) as e:  # the user's to fix (as rgpt.cli says them)
            return send(conn, {"failed": str(e)})
        send(conn, {"ready": {"path": str(path), "block_size": model.config.block_size}})
    except (EOFError, ConnectionError):  # the web process stopped while this one was starting (Ctrl-C)
        return
    keys = ("max_active", "prefill_chunk", "hand_over")
    Decoder(model, tok, conn, **{k: settings[k] for k in keys}).run()


if __name__ == "__main__":
    with torch.no_grad():
        main(int(sys.argv[1]))
