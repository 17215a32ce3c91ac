"""The HTTP server around the engine: its settings, the socket, uvicorn with a read deadline per request,
and the checks that keep a server from being exposed without a key (python -m rgpt.serve starts it)."""

import functools
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rgpt.data.vocab import load_tokenizer
from rgpt.inference.api import Service, create_app
from rgpt.inference.conversation import ReplySettings, context_window
from rgpt.inference.engine import Engine
from rgpt.inference.generate import DecodeConfig
from rgpt.inference.load import ModelChoice
from rgpt.runtime.checkpoint import VOCAB
from rgpt.runtime.device import RuntimeSettings
from rgpt.settings import FLAT, ConfigError, check

# an origin as a browser sends it: scheme://host[:port], or null (a file, a sandbox); *: any
ORIGIN = re.compile(r"(https?://[^/\s]+|null|\*)", re.IGNORECASE)


@dataclass
class ServeConfig:
    """python -m rgpt.serve's settings; the decoding keys are the defaults a request's fields override."""

    model: ModelChoice = field(default_factory=ModelChoice, metadata=FLAT)  # checkpoint=, out_dir=
    # loopback: only this machine can connect; another host (0.0.0.0: the network) refuses to start without a key
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the address is printed at start)
    # every /v1 request must send "Authorization: Bearer <key>"; None: none (fine on loopback). Prefer
    # RGPT_API_KEY=<key> in the environment: ps shows command lines
    api_key: str | None = None
    # more names the Host header may give (a proxy's, this machine's DNS name) beyond localhost, loopback
    # addresses and `host` (with 0.0.0.0: any address); ["*"]: any. Against DNS rebinding
    allowed_hosts: list = field(default_factory=list)
    # web pages of other origins allowed to call the API, e.g. [http://localhost:3000]; []: only the page this
    # server serves. Others get 403
    cors_origins: list = field(default_factory=list)
    # the model's id in /v1/models and in requests; None: rgpt-<stage>-<run>-<checkpoint>, the same on every restart
    model_name: str | None = None
    # replies decoded together, one forward a step (continuous batching); more wait in the queue. Each holds
    # a slot of KV caches: n_layer x 2 x block_size x n_embd x 4 bytes (model=base: 4 MiB)
    max_active: int = 32
    # prompt tokens prefilled per step, between the decode steps of the active replies: a long prompt
    # is taken in chunks, so it delays the others' next token by one chunk's time at most
    prefill_chunk: int = 64
    # seconds: a stream's new text goes to the web process at most this often while more is being decoded (a
    # first token and an end at once): each message wakes the web process, which then takes the CPU from the
    # decoder for a moment (50 updates a second still read as a live stream). 0: every step
    stream_interval: float = 0.02
    max_queue: int = 64  # requests waiting for a slot; one more is answered 503 with Retry-After
    # the most max_tokens a request may ask for (the window slides, so long replies work but take long)
    max_tokens_limit: int = 1024
    # a larger body is refused with 413 (256 KiB: far more text than the window)
    max_request_bytes: int = 262144
    # open connections (and requests) at once; more are answered 503 (uvicorn's limit_concurrency): bounds what
    # a flood of clients takes
    max_connections: int = 256
    # seconds a request's head and body may take to arrive; a slower client is disconnected, so a trickle of
    # bytes cannot hold a connection
    request_timeout: float = 10.0
    # method=, ..., context_tokens=
    reply: ReplySettings = field(default_factory=ReplySettings, metadata=FLAT)
    # device, threads, allocator
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings, metadata=FLAT)

    @property
    def decode(self) -> DecodeConfig:
        return self.reply.decode

    @property
    def context_tokens(self) -> int | None:
        return self.reply.context_tokens

    def validate(self) -> "ServeConfig":
        for key, (low, high) in INT_RANGES.items():
            v = getattr(self, key)
            bound = f"in [{low}, {high}]" if high else f">= {low}"
            check(low <= v <= (high or v), key, v, f"must be an integer {bound}")
        self.reply.validate()
        self.runtime.validate()
        if self.decode.method == "beam":
            raise ConfigError("method=beam cannot stream replies; serve with method=greedy or method=sample")
        if self.decode.max_new_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"max_new_tokens={self.decode.max_new_tokens} exceeds max_tokens_limit={self.max_tokens_limit}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty: give a key, or null for none")
        t = self.request_timeout
        check(0 < t <= 3600, "request_timeout", t, "must be a number of seconds in (0, 3600]")
        t = self.stream_interval
        check(0 <= t <= 1, "stream_interval", t, "must be a number of seconds in [0, 1]")
        self.cors_origins = [str(o).strip().lower() for o in self.cors_origins]
        for origin in self.cors_origins:
            if not ORIGIN.fullmatch(origin):
                raise ConfigError(f"cors_origins: {origin!r} is not an origin like http://localhost:3000")
        self.allowed_hosts = [str(h).strip().lower() for h in self.allowed_hosts]
        for host in self.allowed_hosts:
            if not host or re.search(r"[/\s]", host):
                raise ConfigError(f"allowed_hosts: {host!r} is not a host name like rgpt.example.org")
        return self


INT_RANGES = {
    "port": (0, 65535),
    "max_active": (1, None),
    "prefill_chunk": (1, None),
    "max_queue": (0, None),
    "max_tokens_limit": (1, None),
}
INT_RANGES |= {"max_request_bytes": (1024, None), "max_connections": (1, None)}


def api_key_from(given, environ=os.environ):
    """The API key: RGPT_API_KEY from the environment (which ps does not show) or api_key=; not both."""
    env = environ.get("RGPT_API_KEY")
    if env is not None and not env.strip():
        raise ConfigError("RGPT_API_KEY is empty: give a key, or unset it for none")
    if env is not None and given is not None and str(given) != env:
        raise ConfigError("api_key and RGPT_API_KEY are both set, and differ: set only one")
    return env if env is not None else given


def loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (an unknown name: True, and listen()
    reports it)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return True
    return all(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses)


def check_exposure(c: ServeConfig) -> None:
    if c.api_key is None and not loopback(c.host):
        raise ConfigError(
            f"host={c.host} lets other machines connect, and no API key is set: start with "
            "RGPT_API_KEY=<key> in the environment (or api_key=<key>), or serve on host=127.0.0.1"
        )


def model_id(path: Path) -> str:
    """A stable id from the checkpoint's place: outputs/sft/default/checkpoints/best-00002208 ->
    rgpt-sft-default-best-00002208 (the last three parts of the path, checkpoints/ left out)."""
    parts = [p for p in path.resolve().parts if p != "checkpoints"][-3:]
    return "rgpt-" + "-".join(parts)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (port 0: any free one), or ConfigError."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say
        # they are TCP, and the connections accepted here inherit it. With Nagle on, a response written in two
        # parts (head, then body) waited for the client's delayed ACK: 40 ms on every request, /health too
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # connections wait here until the server accepts them: clients never see a refusal
    return sock


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on reading each request: its head and body must arrive
    within `request_timeout` seconds of the connection opening (or of the previous reply ending), else the
    connection is closed, after a 408 if part of a request came. uvicorn alone would wait forever, so a
    client sending a byte now and then (slowloris) could hold connections until limit_concurrency is
    reached and every other client is refused. It leans on uvicorn's H11Protocol (its conn, loop and
    transport); test_serve_hardening's slow-client test tells if a new uvicorn breaks it."""

    def __init__(self, *args, request_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timeout, self.deadline, self.started = request_timeout, None, False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.watch()

    def data_received(self, data: bytes) -> None:
        self.started = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self.watch()

    def on_response_complete(self) -> None:
        self.started = False
        super().on_response_complete()
        self.watch()

    def connection_lost(self, exc) -> None:
        self.watch(cancel=True)
        super().connection_lost(exc)

    def watch(self, cancel: bool = False) -> None:
        """The deadline runs while a request is being read, and only then."""
        reading = self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not cancel
        if reading and self.deadline is None:
            self.deadline = self.loop.call_later(self.request_timeout, self.too_slow)
        elif not reading and self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def too_slow(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if self.started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no reply has begun
            message = f"the request did not arrive within request_timeout={self.request_timeout:g} s"
            error = {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "request_timeout",
            }
            body = json.dumps({"error": error}).encode()
            head = "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            self.transport.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        self.transport.close()  # a request still being read learns it as a disconnect


def _interrupt(signum, frame) -> None:
    """SIGINT (Ctrl-C) and SIGTERM end the server: set here, not left to Python's default, which a
    process started with SIGINT ignored (a background job of a script) never gets."""
    raise KeyboardInterrupt


def serve(c: ServeConfig, device) -> None:
    check_exposure(c)
    runtime = replace(c.runtime, device=str(device))
    decoding = {"prefill_chunk": c.prefill_chunk, "hand_over": c.stream_interval}
    engine = Engine(c.model, runtime, c.max_active, c.max_queue, decoding)
    try:
        _serve(c, engine)
    finally:  # _serve ends the streams before the web server stops; this stops the decoder if _serve failed
        engine.shutdown("the server is shutting down")  # earlier (a no-op the second time)


def _serve(c: ServeConfig, engine: Engine) -> None:
    model = engine.start()  # the decoding process loads the model (rgpt.inference.decoder)
    path = Path(model["path"])
    tok = load_tokenizer(path / VOCAB)  # the web side tokenizes the prompts
    tok.encode("你好")  # jieba loads its dictionary on first use (~1 s): before the first request, not in it
    sock = listen(c.host, c.port)
    service = Service(
        engine=engine,
        tok=tok,
        model_id=c.model_name or model_id(path),
        created=int((path / "state.json").stat().st_mtime),
        decode=c.decode,
        context_tokens=context_window(model["block_size"], c.context_tokens),
        api_key=c.api_key,
        max_tokens_limit=c.max_tokens_limit,
        max_request_bytes=c.max_request_bytes,
        host=c.host,
        allowed_hosts=tuple(c.allowed_hosts),
        cors_origins=tuple(c.cors_origins),
    )
    config = uvicorn.Config(
        create_app(service),
        http=functools.partial(Protocol, request_timeout=c.request_timeout),
        limit_concurrency=c.max_connections,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    # the web server in a thread of its own, and this, the main thread, reads the decoding process
    web_server = uvicorn.Server(config)
    web = threading.Thread(target=web_server.run, kwargs={"sockets": [sock]}, name="rgpt-web", daemon=True)
    web.start()
    try:
        signal.signal(signal.SIGINT, _interrupt)  # before the line that says the server is up: a Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)  # sent as soon as it is read must find the handler
        print(
            f"rgpt serve: {service.model_id} ({path}) at {url}/ (API: {url}/v1)", file=sys.stderr, flush=True
        )
        engine.run()  # returns only if the decoder died: the web side goes on, answering 503, until Ctrl-C
        while web.is_alive():
            web.join(0.5)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: open streams end at once, with an error event
        pass
    finally:
        engine.shutdown("the server is shutting down")
        web_server.should_exit = True
        web.join(10)
