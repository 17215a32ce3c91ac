"""The HTTP side of rgpt.serve: OpenAI's chat-completions API, the model list, health and the chat page.

Requests are checked (Host and Origin: rgpt/inference/guard.py; Content-Type, size, UTF-8, JSON, fields,
ranges: rgpt/inference/request.py; the key and the model here), turned into a prompt with chat's template
and window management, and handed to the Engine; its
events become one JSON reply or a stream of server-sent `chat.completion.chunk`s ending with
`data: [DONE]`. Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with its status;
none shows a traceback. What a request asks for and rgpt cannot do is refused (400), never ignored.
"""

import asyncio
import hmac
import json
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from rgpt.inference.conversation import prompt_budget
from rgpt.inference.engine import Busy, Engine, Reply, Unavailable
from rgpt.inference.generate import DecodeConfig
from rgpt.inference.guard import Guard
from rgpt.inference.request import (
    ApiError,
    ChatRequest,
    error_response,
    invalid,
    prompt_ids,
    read_request,
    request_decode,
)

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
RETRY_AFTER_S = 1  # a full queue drains in about a reply's time: a second on CPU for a base-model answer


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


# ---- errors ---------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"rgpt serve: {message}", file=sys.stderr, flush=True)


def unavailable(e: Exception) -> ApiError:
    """The engine's Busy or Unavailable as a 503 (busy: with Retry-After)."""
    if isinstance(e, Busy):
        why, retry = f"the server is busy ({e}); retry in {RETRY_AFTER_S} s", str(RETRY_AFTER_S)
        return ApiError(503, why, kind="server_error", code="server_busy", headers={"Retry-After": retry})
    return ApiError(503, f"the server cannot answer: {e}", kind="server_error", code="server_unavailable")


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
            # what has arrived since the last write goes out in one write (each event still its own chunk)
            events = [await reply.events.get()]
            while not reply.events.empty() and events[-1][0] == "text":
                events.append(reply.events.get_nowait())
            out = "".join(chunk({"content": e[1]}) for e in events if e[0] == "text")
            event = events[-1]
            if event[0] == "text":
                yield out
                continue
            if event[0] == "error":  # the status line has gone: the error travels as an event
                out += sse(
                    {"error": {"message": event[2], "type": "server_error", "param": None, "code": None}}
                )
            else:
                _, reason, n = event
                out += chunk({}, reason)
                if include_usage:
                    body = {**head, "object": "chat.completion.chunk", "choices": []}
                    out += sse(body | {"usage": usage(len(reply.prompt), n)})
            yield out + "data: [DONE]\n\n"
            break
    finally:  # also when the client disconnects: Starlette cancels this generator, the reply is dropped
        s.engine.cancel(reply)


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
