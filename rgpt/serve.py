"""python -m rgpt.serve [checkpoint=PATH] [port=8000] [api_key=KEY] [key=value ...]

Serves a trained model over HTTP (every key: conf/serve.yaml and conf/decode.yaml): OpenAI's
POST /v1/chat/completions (streamed or not), GET /v1/models, GET /health, and a chat page at /.
One model is loaded; requests queue and are decoded in turn by one worker thread (rgpt.engine).
The address it listens on is printed to stderr once it accepts connections; Ctrl-C stops it.
"""

import socket
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import uvicorn

from rgpt.api import Service, create_app
from rgpt.chat import check_context_tokens, context_window, decode_settings, open_model, quote_text_overrides
from rgpt.cli import ConfigError, hydra_main, setup_runtime
from rgpt.engine import Engine
from rgpt.generate import DecodeConfig

TEXT_KEYS = ("checkpoint", "out_dir", "host", "api_key", "model_name")  # quoted for Hydra (see rgpt.chat)
INT_RANGES = {"port": (0, 65535), "max_active": (1,), "max_queue": (0,), "max_tokens_limit": (1,)}
INT_RANGES["max_request_bytes"] = (1024,)
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
        return cls(
            checkpoint=text(d.get("checkpoint")),
            out_dir=str(d.get("out_dir", cls.out_dir)),
            host=str(d.get("host", cls.host)),
            api_key=text(d.get("api_key")),
            model_name=text(d.get("model_name")),
            context_tokens=check_context_tokens(d.get("context_tokens")),
            decode=decode,
            **ints,
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


@hydra_main("serve")
def _main(cfg) -> None:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    device = setup_runtime(raw.pop("device"), raw.pop("threads"), raw.pop("allocator"))
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
