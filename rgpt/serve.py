"""python -m rgpt.serve [checkpoint=PATH] [port=8000] [api_key=KEY] [key=value ...]

Serves a trained model over HTTP (every key: ServeConfig below; `--cfg job` prints them): OpenAI's
POST /v1/chat/completions (streamed or not), GET /v1/models, GET /health, and a chat page at /.
One model is loaded; requests queue and are decoded in turn by one worker thread (rgpt.inference.engine).
The address it listens on is printed to stderr once it accepts connections; Ctrl-C stops it.
"""

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn

from rgpt.cli import hydra_main, quote_text_overrides, settings
from rgpt.inference.api import Service, create_app
from rgpt.inference.conversation import ReplySettings, context_window
from rgpt.inference.engine import Engine
from rgpt.inference.generate import DecodeConfig
from rgpt.inference.load import open_model
from rgpt.runtime.device import RuntimeSettings
from rgpt.settings import FLAT, ConfigError, check

TEXT_KEYS = ("checkpoint", "out_dir", "host", "api_key", "model_name")  # quoted for Hydra (see rgpt.cli)


@dataclass
class ServeConfig:
    # a checkpoint, run or checkpoints/ directory; None: best of the newest SFT run under out_dir (else
    # pretraining, with a notice)
    checkpoint: str | None = None
    out_dir: str = "outputs"  # where training put its runs (the same default as training's out_dir)
    host: str = "127.0.0.1"  # loopback: only this machine can connect; 0.0.0.0 opens the server to the network (set api_key then)
    port: int = 8000  # 0: any free port (the address is printed at start)
    api_key: str | None = (
        None  # every /v1 request must send "Authorization: Bearer <key>"; None: no key (fine on loopback)
    )
    model_name: str | None = (
        None  # the model's id in /v1/models and requests; None: rgpt-<stage>-<run>-<checkpoint>
    )
    max_active: int = (
        32  # replies decoded together, a token each in turn: all start early; more wait in the queue
    )
    max_queue: int = 64  # requests waiting for a slot; one more is answered 503 with Retry-After
    max_tokens_limit: int = (
        1024  # the most max_tokens a request may ask for (the window slides, so long replies work)
    )
    max_request_bytes: int = (
        262144  # a larger request body is refused with 413 (256 KiB: far more text than the window)
    )
    # the defaults a request's fields override (method=, temperature=, ..., context_tokens=)
    reply: ReplySettings = field(default_factory=ReplySettings, metadata=FLAT)
    runtime: RuntimeSettings = field(
        default_factory=RuntimeSettings, metadata=FLAT
    )  # device, threads, allocator

    @property
    def decode(self) -> DecodeConfig:
        return self.reply.decode

    @property
    def context_tokens(self) -> int | None:
        return self.reply.context_tokens

    def validate(self) -> "ServeConfig":
        for key, (low, high) in INT_RANGES.items():
            v = getattr(self, key)
            check(
                low <= v <= (high or v),
                key,
                v,
                f"must be an integer {f'in [{low}, {high}]' if high else f'>= {low}'}",
            )
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
        return self


INT_RANGES = {
    "port": (0, 65535),
    "max_active": (1, None),
    "max_queue": (0, None),
    "max_tokens_limit": (1, None),
}
INT_RANGES["max_request_bytes"] = (1024, None)


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
    )
    config = uvicorn.Config(
        create_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=3
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


@hydra_main("serve", ServeConfig)
def _main(cfg) -> None:
    c = settings(ServeConfig, cfg)
    device = c.runtime.apply()
    try:
        serve(c, device)
    except KeyboardInterrupt:  # Ctrl-C is the way to stop a server: exit 0
        print("stopped", file=sys.stderr)


def main() -> None:
    sys.argv[1:] = quote_text_overrides(sys.argv[1:], TEXT_KEYS)
    with torch.no_grad():
        _main()


if __name__ == "__main__":
    main()
