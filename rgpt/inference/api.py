"""The HTTP side of rgpt.serve: OpenAI's chat-completions API, the model list, health and the chat page.

Requests are read and checked here (Host, Origin, key, Content-Type, size, UTF-8, JSON, fields, ranges,
model), turned into a prompt with chat's template and window management, and handed to the Engine; its
events become one JSON reply or a stream of server-sent `chat.completion.chunk`s ending with
`data: [DONE]`. Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with its status;
none shows a traceback. What a request asks for and rgpt cannot do is refused (400), never ignored.
"""

import asyncio
import hmac
import ipaddress
import json
import math
import secrets
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from rgpt.inference.conversation import Conversation, prompt_budget
from rgpt.inference.engine import Busy, Engine, Reply, Unavailable
from rgpt.inference.generate import DecodeConfig

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
RETRY_AFTER_S = 1  # a full queue drains in about a reply's time: a second on CPU for a base-model answer
IGNORED_ROLES = ("system", "developer")  # the model was never trained with a system turn
PASSED = ("top_p", "top_k", "seed", "repetition_penalty", "min_tokens")  # request fields DecodeConfig takes
RENAMED = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}  # request name -> DecodeConfig's
MAX_STOPS, MAX_STOP_CHARS = 4, 64  # OpenAI's 4 stop strings; 64 characters each bound the check per token
MIN_TEMPERATURE = 1e-4  # below it a request decodes greedily: sampling's limit, and logits / T stay finite
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # Host names a loopback server always answers to
# OpenAI's request fields that rgpt cannot honour: refused with 400 unless absent or set to a no-op value
UNSUPPORTED = {
    "tools": (lambda v: not v, "tool calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, 'only {"type": "text"} is supported'),
    "logit_bias": (lambda v: not v, "biasing logits is not supported"),
    "logprobs": (lambda v: v in (None, False), "log-probabilities are not returned by this server"),
    "top_logprobs": (lambda v: v in (None, 0), "log-probabilities are not returned by this server"),
    "n": (lambda v: v in (None, 1), "this server returns one choice per request (n must be 1)"),
    "modalities": (lambda v: v in (None, ["text"]), "only text replies are supported"),
    "audio": (lambda v: v is None, "only text replies are supported"),
}


@dataclass
class Service:
    """What the routes need: the engine, the tokenizer and the serving settings."""

    engine: Engine
    tok: object
    model_id: str
    created: int  # when the checkpoint was written: /v1/models' `created`, the same on every restart
    decode: DecodeConfig  # the defaults a request's fields override
    context_tokens: int  # prompt + reply
    api_key: str | None
    max_tokens_limit: int
    max_request_bytes: int
    host: str = "127.0.0.1"  # where it listens: with LOOPBACK_NAMES and allowed_hosts, the Hosts it answers
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()  # other web pages' origins allowed to call the API


# ---- errors ------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status, message, *, kind="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def log(message: str) -> None:
    print(f"rgpt serve: {message}", file=sys.stderr, flush=True)


def unavailable(e: Exception) -> ApiError:
    """The engine's Busy or Unavailable as a 503 (busy: with Retry-After)."""
    if isinstance(e, Busy):
        why, retry = f"the server is busy ({e}); retry in {RETRY_AFTER_S} s", str(RETRY_AFTER_S)
        return ApiError(503, why, kind="server_error", code="server_busy", headers={"Retry-After": retry})
    return ApiError(503, f"the server cannot answer: {e}", kind="server_error", code="server_unavailable")


# ---- the request -------------------------------------------------------------------------------------
# The enums tell the schema (/openapi.json) what is accepted; text_of and prompt_ids check it, each
# refusing with its own message.
class Part(BaseModel):
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str | None = None


class Message(BaseModel):
    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant"]})
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's fields that rgpt uses, plus top_k, repetition_penalty and min_tokens; UNSUPPORTED ones are
    refused, unknown ones ignored. Ranges DecodeConfig does not own are checked here (numbers are finite:
    read_request refuses NaN and Infinity)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy; > 0: sampling; absent: the server's
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # 1/100..100: logits stay finite
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    min_tokens: int | None = None  # no end of turn before this many tokens (vLLM's name)

    @field_validator("stop", mode="before")
    @classmethod
    def few_short_stops(cls, stop):
        if stop is None:
            return stop
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            longest = max(map(len, stops), default=0)
            raise ValueError(
                f"at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters "
                f"(got {len(stops)}, the longest {longest})"
            )
        return stop


def finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # 1e400: Python reads it as inf
        raise ValueError(f"the number {text} is out of range")
    return x


def not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")  # Python's json reads NaN and Infinity; JSON has none


async def read_request(request: Request, limit: int) -> ChatRequest:
    """The body, at most `limit` bytes, as UTF-8 JSON checked against ChatRequest; ApiError if not."""
    kind = request.headers.get("content-type", "")
    if kind.partition(";")[0].strip().lower() != "application/json":  # a cross-site <form> cannot send it
        raise ApiError(415, f"Content-Type must be application/json, not {kind or 'absent'}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    except ClientDisconnect:  # also when the server closed a connection too slow to send its body
        raise ApiError(499, "client closed the request") from None
    try:
        data = json.loads(bytes(body).decode("utf-8"), parse_float=finite, parse_constant=not_json)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        raise invalid(e.errors()) from None
    for name, (harmless, why) in UNSUPPORTED.items():
        if not harmless(data.get(name)):
            raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_parameter")
    return req


def invalid(errors: list) -> ApiError:
    """pydantic's or FastAPI's first validation error as a 400 that names the field."""
    first = errors[0]
    loc = first["loc"]
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # FastAPI's: where the field was
        loc = loc[1:]
    param = ".".join(str(p) for p in loc)
    return ApiError(400, f"{param}: {first['msg'].removeprefix('Value error, ')}", param=param)


def request_decode(req: ChatRequest, s: Service) -> DecodeConfig:
    """The server's decoding defaults with the request's fields applied, checked by DecodeConfig."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            why = "is not supported; use repetition_penalty (> 1 discourages repeats)"
            raise ApiError(400, f"{name} {why}", param=name)
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        why = f"max_tokens={max_tokens} exceeds this server's limit of {s.max_tokens_limit}"
        raise ApiError(400, why, param="max_tokens")
    given = {"max_tokens": max_tokens, **{k: getattr(req, k) for k in PASSED}}
    changes = {RENAMED.get(k, k): v for k, v in given.items() if v is not None}
    if req.temperature is not None:
        sample = req.temperature >= MIN_TEMPERATURE
        changes |= {"temperature": req.temperature, "method": "sample" if sample else "greedy"}
    try:
        return replace(s.decode, **changes).check()
    except ValueError as e:  # "max_new_tokens=0 must be >= 1": named as the request names it
        ours = str(e).partition("=")[0]
        theirs = {v: k for k, v in RENAMED.items()}.get(ours, ours)
        raise ApiError(400, theirs + str(e)[len(ours) :], param=theirs) from None


def text_of(message: Message, i: int) -> str:
    if isinstance(message.content, str) or message.content is None:
        return message.content or ""
    if any(p.type != "text" or p.text is None for p in message.content):
        raise ApiError(400, f"messages.{i}.content: only text parts are supported", param=f"messages.{i}")
    return "\n".join(p.text for p in message.content)


def prompt_ids(req: ChatRequest, tok, budget: int) -> tuple[list[int], int]:
    """(prompt ids, exchanges dropped): the messages as chat's template, system messages left out, a run
    of one role's messages joined, each turn tokenized once, and the oldest exchanges dropped to fit the
    budget, as in chat. The last message must be the user's, and must fit (else context_length_exceeded)."""
    turns: list[tuple[str, list[str]]] = []  # (role, its texts)
    for i, m in enumerate(req.messages):
        if m.role in IGNORED_ROLES:
            continue
        if m.role not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}.role={m.role!r}: expected system, user or assistant")
        if turns and turns[-1][0] == m.role:
            turns[-1][1].append(text_of(m, i))
        else:
            turns.append((m.role, [text_of(m, i)]))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "messages: the last message must be the user's", param="messages")
    conversation, question = Conversation(budget), []
    for role, texts in turns:
        ids = tok.encode("\n".join(texts))
        if role == "user":
            question = ids
        else:  # the assistant's answer to the question before it (none if the history opens with it)
            conversation.add(question, ids)
            question = []
    given = len(conversation.exchanges)
    prompt, kept, _ = conversation.prompt(question)
    if len(kept) < len(question):  # chat would cut the question from its start; an API says so instead
        need = len(prompt) - len(kept) + len(question)
        raise ApiError(
            400,
            f"the last message needs {need} prompt tokens, more than the {budget} a prompt may hold "
            "(this model's window less room for the reply); shorten it or lower max_tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return prompt, given - len(conversation.exchanges)


# ---- the responses -----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


async def watch_disconnect(request: Request, reply: Reply, engine: Engine) -> None:
    """Cancel the reply if its client disconnects before it is complete (a streamed reply learns it from
    Starlette instead, which cancels the stream)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    engine.cancel(reply)
    reply.events.put_nowait(("gone",))


async def complete(reply: Reply, request: Request, s: Service, head: dict, headers: dict) -> JSONResponse:
    pieces = []
    while True:
        event = await reply.events.get()
        if event[0] == "text":
            pieces.append(event[1])
        elif event[0] == "error":
            raise ApiError(event[1], event[2], kind="server_error")
        elif event[0] == "gone":  # nobody is left to read this
            raise ApiError(499, "client closed the request")
        else:
            _, reason, n = event
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            body = {
                **head,
                "object": "chat.completion",
                "choices": [choice],
                "usage": usage(len(reply.prompt), n),
            }
            return JSONResponse(body, headers=headers)


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def chunks(reply: Reply, s: Service, head: dict, include_usage: bool):
    """The reply as server-sent events: the role, the text as it comes, the finish reason, [DONE]."""

    def chunk(delta: dict, reason=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    try:
        yield chunk({"role": "assistant"})
        while True:
            event = await reply.events.get()
            if event[0] == "text":
                yield chunk({"content": event[1]})
            elif event[0] == "error":  # the status line has gone: the error travels as an event
                yield sse(
                    {"error": {"message": event[2], "type": "server_error", "param": None, "code": None}}
                )
                break
            else:
                _, reason, n = event
                yield chunk({}, reason)
                if include_usage:
                    yield sse(
                        {
                            **head,
                            "object": "chat.completion.chunk",
                            "choices": [],
                            "usage": usage(len(reply.prompt), n),
                        }
                    )
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: Starlette cancels this generator, the reply is dropped
        s.engine.cancel(reply)


# ---- who may call -----------------------------------------------------------------------------------
def host_name(value: str) -> str | None:
    """A Host header's name: '[::1]:8000' -> '::1', 'LocalHost:80' -> 'localhost'; None if malformed."""
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        port = port.removeprefix(":") if bracket else "x"
    else:
        name, _, port = value.partition(":")
    return name.lower().rstrip(".") if name and (port == "" or port.isdigit()) else None


class Guard:
    """ASGI middleware, outermost: refuses what a web page from another site could send this server. A
    Host that is not one of its names gets 400 (DNS rebinding: a page whose own name has been re-pointed
    at 127.0.0.1); an Origin that is neither its own nor in cors_origins gets 403 (cross-site requests and
    their CORS preflights). A name is an address's, localhost, `host` or in allowed_hosts; an address
    cannot be re-pointed, so any address literal is fine where the server listens on all of them."""

    def __init__(self, app, host: str, allowed_hosts=(), cors_origins=()):
        self.app, self.origins = app, {o.lower() for o in cors_origins}
        self.names = {*LOOPBACK_NAMES, host.strip("[]").lower(), *(h.lower() for h in allowed_hosts)}
        self.any_address = host in ("0.0.0.0", "::", "")

    async def __call__(self, scope, receive, send):
        error = self.check(Headers(scope=scope), scope["scheme"]) if scope["type"] == "http" else None
        if error is not None:
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, headers: Headers, scheme: str) -> ApiError | None:
        host = headers.get("host")
        if host is not None and not self.known(host_name(host)):
            why = f"the Host header {host!r} is not a name of this server: add it to allowed_hosts"
            return ApiError(400, why, code="invalid_host")
        origin, own = headers.get("origin"), f"{scheme}://{host}".lower()
        if origin is None or "*" in self.origins or origin.lower() in (own, *self.origins):
            return None
        why = f"the web page at {origin} may not call this server: add its origin to cors_origins to allow it"
        return ApiError(403, why, code="cross_origin_refused")

    def known(self, name: str | None) -> bool:
        if name is None:
            return False
        if name in self.names or "*" in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self.any_address


# ---- the app -----------------------------------------------------------------------------------------
def create_app(s: Service) -> FastAPI:
    app = FastAPI(title="rgpt", version="1", docs_url=None, redoc_url=None)
    page = PAGE.read_text(encoding="utf-8")
    if s.cors_origins:  # inside Guard: it answers the preflights of the origins Guard lets through
        expose = ["Retry-After", "X-RGPT-Dropped-Turns"]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(s.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            allow_private_network=True,  # a listed site may call a server on this machine
            expose_headers=expose,
        )
    app.add_middleware(Guard, host=s.host, allowed_hosts=s.allowed_hosts, cors_origins=s.cors_origins)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):  # FastAPI's own 422: a 400, as OpenAI
        return error_response(invalid(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        else:
            message = str(e.detail)
        return error_response(ApiError(e.status_code, message, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):  # logged by uvicorn; the client sees one line
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    def authorise(request: Request) -> None:
        if s.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), s.api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the header Authorization: Bearer <key>",
                code="invalid_api_key",
            )

    def model_card() -> dict:
        return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "rgpt"}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": s.model_id, **s.engine.counts()}
        problem = s.engine.problem()
        if problem is None:
            return body
        return JSONResponse(body | {"status": "error", "error": problem}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorise(request)
        if model_id != s.model_id:
            raise unknown_model(model_id)
        return model_card()

    def unknown_model(name: str) -> ApiError:
        message = f"the model {name!r} does not exist; this server serves {s.model_id!r}"
        return ApiError(404, message, param="model", code="model_not_found")

    # the body is read by read_request (size, UTF-8, JSON); the schema says what it holds
    body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
    }

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": body})
    async def chat_completions(request: Request):
        authorise(request)
        req = await read_request(request, s.max_request_bytes)
        if req.model != s.model_id:
            raise unknown_model(req.model)
        decode = request_decode(req, s)
        budget = prompt_budget(s.context_tokens, decode.max_new_tokens)
        try:
            s.engine.check_room()  # before the tokenizing, which is the costly part of a refused request
            # tokenizing up to max_request_bytes of text takes a while: off the event loop, so streams flow on
            prompt, dropped = await asyncio.to_thread(prompt_ids, req, s.tok, budget)
            stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
            reply = s.engine.submit(Reply(prompt, decode, stop, asyncio.get_running_loop()))
        except (Busy, Unavailable) as e:
            raise unavailable(e) from None
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "", "created": int(time.time())}
        head["model"] = s.model_id  # the same four fields open every reply and every chunk of a stream
        headers = {"X-RGPT-Dropped-Turns": str(dropped)} if dropped else {}
        if dropped:
            log(f"{head['id']}: the {dropped} oldest exchanges were dropped to fit the window")
        if not req.stream:
            watcher = asyncio.create_task(watch_disconnect(request, reply, s.engine))
            try:
                return await complete(reply, request, s, head, headers)
            finally:
                watcher.cancel()
                s.engine.cancel(reply)  # a no-op for a finished reply
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            chunks(reply, s, head, include_usage), media_type="text/event-stream", headers=headers
        )

    def openapi() -> dict:  # FastAPI's schema, plus the request body's (the route reads it itself)
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            request = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas |= request.pop("$defs", {}) | {"ChatRequest": request}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
