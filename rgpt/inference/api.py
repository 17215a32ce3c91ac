"""The HTTP side of rgpt.serve: OpenAI's chat-completions API, the model list, health and the chat page.

Requests are read and checked here (size, UTF-8, JSON, fields, key, model), turned into a prompt with
chat's template and window management, and handed to the Engine; its events become one JSON reply or a
stream of server-sent `chat.completion.chunk`s ending with `data: [DONE]`. Every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}` with its status; none shows a traceback.
"""

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from rgpt.inference.conversation import Conversation, prompt_budget
from rgpt.inference.engine import Busy, Engine, Reply
from rgpt.inference.generate import DecodeConfig

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
RETRY_AFTER_S = 1  # a full queue drains in about a reply's time: a second on CPU for a base-model answer
IGNORED_ROLES = ("system", "developer")  # the model was never trained with a system turn
PASSED = ("top_p", "top_k", "seed", "repetition_penalty", "min_tokens")  # request fields DecodeConfig takes
RENAMED = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}  # request name -> DecodeConfig's


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


# ---- errors ------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status, message, *, kind="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# ---- the request -------------------------------------------------------------------------------------
class Part(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: str
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's fields that rgpt uses (others are ignored), plus top_k, repetition_penalty and min_tokens."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float | None = (
        None  # 0: greedy; > 0: sampling at that temperature; absent: the server's method
    )
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int | None = None  # no end of turn before this many tokens (vLLM's name)
    n: Literal[1] = 1


async def read_request(request: Request, limit: int) -> ChatRequest:
    """The body, at most `limit` bytes, as UTF-8 JSON checked against ChatRequest; ApiError if not."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        data = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None


def request_decode(req: ChatRequest, s: Service) -> DecodeConfig:
    """The server's decoding defaults with the request's fields applied, checked by DecodeConfig."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            why = "is not supported; use repetition_penalty (> 1 discourages repeats)"
            raise ApiError(400, f"{name} {why}", param=name)
    max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's limit of {s.max_tokens_limit}")
    given = {"max_tokens": max_tokens, **{k: getattr(req, k) for k in PASSED}}
    changes = {RENAMED.get(k, k): v for k, v in given.items() if v is not None}
    if req.temperature is not None:
        changes |= {"temperature": req.temperature, "method": "sample" if req.temperature > 0 else "greedy"}
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


def prompt_ids(req: ChatRequest, tok, budget: int) -> list[int]:
    """The messages as chat's template: system messages left out, a run of one role's messages joined,
    and the oldest exchanges dropped to fit the budget, as in chat. The last message must be the user's."""
    turns: list[list] = []  # [role, text]
    for i, m in enumerate(req.messages):
        if m.role in IGNORED_ROLES:
            continue
        if m.role not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}.role={m.role!r}: expected system, user or assistant")
        if turns and turns[-1][0] == m.role:
            turns[-1][1] += "\n" + text_of(m, i)
        else:
            turns.append([m.role, text_of(m, i)])
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "messages: the last message must be the user's", param="messages")
    conversation, question = Conversation(budget), []
    for role, text in turns:
        if role == "user":
            question = tok.encode(text)
        else:  # the assistant's answer to the question before it (none if the history opens with it)
            conversation.add(question, tok.encode(text))
            question = []
    return conversation.prompt(question)[0]


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


async def complete(reply: Reply, request: Request, s: Service, head: dict) -> JSONResponse:
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
            return JSONResponse(body)


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


# ---- the app -----------------------------------------------------------------------------------------
def create_app(s: Service) -> FastAPI:
    app = FastAPI(title="rgpt", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

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
        return {"status": "ok", "model": s.model_id, **s.engine.counts()}

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorise(request)
        req = await read_request(request, s.max_request_bytes)
        if req.model != s.model_id:
            raise unknown_model(req.model)
        decode = request_decode(req, s)
        budget = prompt_budget(s.context_tokens, decode.max_new_tokens)
        # tokenizing up to max_request_bytes of text takes a while: off the event loop, so streams flow on
        prompt = await asyncio.to_thread(prompt_ids, req, s.tok, budget)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        reply = Reply(prompt, decode, stop, asyncio.get_running_loop())
        try:
            s.engine.submit(reply)
        except Busy as e:
            raise ApiError(
                503,
                f"the server is busy ({e}); retry in {RETRY_AFTER_S} s",
                kind="server_error",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "", "created": int(time.time())}
        head["model"] = s.model_id  # the same four fields open every reply and every chunk of a stream
        if not req.stream:
            watcher = asyncio.create_task(watch_disconnect(request, reply, s.engine))
            try:
                return await complete(reply, request, s, head)
            finally:
                watcher.cancel()
                s.engine.cancel(reply)  # a no-op for a finished reply
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            chunks(reply, s, head, include_usage), media_type="text/event-stream", headers=headers
        )

    return app
