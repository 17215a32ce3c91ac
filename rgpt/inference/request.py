"""An OpenAI chat-completions request, read and checked: its fields and their ranges, what rgpt cannot do
(refused by name, never ignored), and its messages turned into a prompt within the window. Every problem
is an ApiError: OpenAI's `{"error": {"message", "type", "param", "code"}}` with its status."""

import json
import math
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect

from rgpt.inference.conversation import Conversation
from rgpt.inference.generate import MIN_TEMPERATURE, DecodeConfig

IGNORED_ROLES = ("system", "developer")  # the model was never trained with a system turn
PASSED = ("top_p", "top_k", "seed", "repetition_penalty", "min_tokens")  # request fields DecodeConfig takes
RENAMED = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}  # request name -> DecodeConfig's
MAX_STOPS, MAX_STOP_CHARS = 4, 64  # OpenAI's 4 stop strings; 64 characters each bound the check per token
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


def request_decode(req: ChatRequest, s) -> DecodeConfig:
    """The server's decoding defaults (s: rgpt.inference.api.Service) with the request's fields applied,
    checked by DecodeConfig."""
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
