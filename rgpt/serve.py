"""python -m rgpt.serve [checkpoint=PATH] [port=8000] [host=127.0.0.1] [key=value ...]

Serves a trained model over HTTP (every key: conf/serve.yaml and conf/decode.yaml): OpenAI's
POST /v1/chat/completions (streamed or not), GET /v1/models, GET /health, and a chat page at /.
One model is loaded; requests queue and are decoded in turn by one worker thread (rgpt.engine).
The address it listens on is printed to stderr once it accepts connections; Ctrl-C stops it.
An API key is best given as RGPT_API_KEY=KEY in the environment (api_key=KEY works too, but every
user of the machine sees a command line in ps); a host other than loopback needs one.
"""

import functools
import ipaddress
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rgpt.api import Service, create_app
from rgpt.chat import check_context_tokens, context_window, decode_settings, open_model, quote_text_overrides
from rgpt.cli import ConfigError, hydra_main, setup_runtime
from rgpt.engine import Engine
from rgpt.generate import DecodeConfig

TEXT_KEYS = ("checkpoint", "out_dir", "host", "api_key", "model_name")  # quoted for Hydra (see rgpt.chat)
INT_RANGES = {"port": (0, 65535), "max_active": (1,), "max_queue": (0,), "max_tokens_limit": (1,)}
INT_RANGES |= {"max_request_bytes": (1024,), "max_connections": (1,)}
# an origin as a browser sends it: scheme://host[:port], or null (a file, a sandbox); *: any
ORIGIN = re.compile(r"(https?://[^/\s]+|null|\*)", re.IGNORECASE)
DECODE_KEYS = {f.name for f in fields(DecodeConfig)} | {"context_tokens"}  # conf/decode.yaml


@dataclass
class ServeConfig:
    checkpoint: str | None = None
    out_dir: str = "outputs"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_active: int = 32
    max_queue: int = 64
    max_tokens_limit: int = 1024
    max_request_bytes: int = 262144
    max_connections: int = 256
    request_timeout: float = 10.0
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    context_tokens: int | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "ServeConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)} - {"decode"}
        unknown = sorted(set(d) - known - DECODE_KEYS)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]} (known: {', '.join(sorted(known | DECODE_KEYS))})")
        decode = decode_settings(d)
        if decode.method == "beam":
            raise ConfigError("method=beam cannot stream replies; serve with method=greedy or method=sample")
        ints = {key: check_int(key, d.get(key, getattr(cls, key)), *INT_RANGES[key]) for key in INT_RANGES}
        if decode.max_new_tokens > ints["max_tokens_limit"]:
            raise ConfigError(
                f"max_new_tokens={decode.max_new_tokens} exceeds max_tokens_limit={ints['max_tokens_limit']}"
            )
        if d.get("api_key") is not None and not str(d["api_key"]).strip():
            raise ConfigError("api_key is empty: give a key, or null for none")
        text = lambda v: None if v is None else str(v)  # noqa: E731  (api_key=123 arrives as an int)
        timeout = d.get("request_timeout", cls.request_timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
            raise ConfigError(f"request_timeout={timeout!r} must be a number of seconds in (0, 3600]")
        origins = text_list(d, "cors_origins")
        for origin in origins:
            if not ORIGIN.fullmatch(origin):
                raise ConfigError(f"cors_origins: {origin!r} is not an origin like http://localhost:3000")
        hosts = text_list(d, "allowed_hosts")
        for host in hosts:
            if not host or re.search(r"[/\s]", host):
                raise ConfigError(f"allowed_hosts: {host!r} is not a host name like rgpt.example.org")
        return cls(
            checkpoint=text(d.get("checkpoint")),
            out_dir=str(d.get("out_dir", cls.out_dir)),
            host=str(d.get("host", cls.host)),
            api_key=text(d.get("api_key")),
            model_name=text(d.get("model_name")),
            request_timeout=float(timeout),
            cors_origins=tuple(o.lower() for o in origins),
            allowed_hosts=tuple(h.lower() for h in hosts),
            context_tokens=check_context_tokens(d.get("context_tokens")),
            decode=decode,
            **ints,
        )


def text_list(d: dict, key: str) -> list[str]:
    value = d.get(key) or []
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[a,b]")
    return [str(v).strip() for v in value]


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


def check_int(key: str, v, low: int, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        raise ConfigError(
            f"{key}={v!r} must be an integer " + (f"in [{low}, {high}]" if high else f">= {low}")
        )
    return v


def model_id(path: Path) -> str:
    """A stable id from the checkpoint's place: outputs/sft/default/checkpoints/best-00002208 ->
    rgpt-sft-default-best-00002208 (the last three parts of the path, checkpoints/ left out)."""
    parts = [p for p in path.resolve().parts if p != "checkpoints"][-3:]
    return "rgpt-" + "-".join(parts)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (port 0: any free one), or ConfigError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
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


class Server(uvicorn.Server):
    """uvicorn's server, which also ends every reply when told to stop (Ctrl-C, SIGTERM): open streams
    then finish at once instead of holding the shutdown until they are cut off."""

    def __init__(self, config, engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.stop()
        super().handle_exit(sig, frame)


def serve(c: ServeConfig, device) -> None:
    check_exposure(c)
    model, tok, path = open_model(c.checkpoint, c.out_dir, device)
    tok.encode("你好")  # jieba loads its dictionary on first use (~1 s): before the first request, not in it
    sock = listen(c.host, c.port)
    engine = Engine(model, tok, c.max_active, c.max_queue)
    service = Service(
        engine=engine,
        tok=tok,
        model_id=c.model_name or model_id(path),
        created=int((path / "state.json").stat().st_mtime),
        decode=c.decode,
        context_tokens=context_window(model, c.context_tokens),
        api_key=c.api_key,
        max_tokens_limit=c.max_tokens_limit,
        max_request_bytes=c.max_request_bytes,
        host=c.host,
        allowed_hosts=c.allowed_hosts,
        cors_origins=c.cors_origins,
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
    engine.start()
    print(f"rgpt serve: {service.model_id} ({path}) at {url}/ (API: {url}/v1)", file=sys.stderr, flush=True)
    try:
        Server(config, engine).run(sockets=[sock])
    finally:
        engine.stop()
        engine.join()


@hydra_main("serve")
def _main(cfg) -> None:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    device = setup_runtime(raw.pop("device"), raw.pop("threads"), raw.pop("allocator"))
    raw["api_key"] = api_key_from(raw.get("api_key"))
    try:
        serve(ServeConfig.from_dict(raw), device)
    except KeyboardInterrupt:  # Ctrl-C is the way to stop a server: exit 0
        print("stopped", file=sys.stderr)


def main() -> None:
    sys.argv[1:] = quote_text_overrides(sys.argv[1:], keys=TEXT_KEYS)
    with torch.no_grad():
        _main()


if __name__ == "__main__":
    main()
