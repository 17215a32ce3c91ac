"""python -m rgpt.serve on the tiny trained checkpoint: the real server in a subprocess on loopback, called
with the official openai client and with raw HTTP (httpx); its replies checked against python -m rgpt.chat.

Two servers per module: `open_server` with the default settings, and `strict_server` with an API key, one
decoding slot, a queue of one and a 4 KiB body limit, for the error, queue and disconnect cases."""

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from rgpt.cli import overrides
from rgpt.inference.conversation import ReplyText
from rgpt.inference.generate import DecodeConfig, generate
from rgpt.inference.server import ServeConfig, listen, model_id, serve
from rgpt.settings import ConfigError, load
from tests.fixtures_ckpt import ANSWERS, run_cli, trained
from tests.fixtures_serve import Server

Q_MOUNTAIN, Q_HELLO, Q_SEASONS = "山脉是如何形成的？", "你好", "一年有几个季节？"
KEY = "sk-rgpt-test"
LONG = 100_000  # tokens: a reply that cannot finish during a test (min_tokens forbids an early end)


@pytest.fixture(scope="module")
def open_server(tiny_run, tmp_path_factory):
    _, ckpt = tiny_run
    cwd = tmp_path_factory.mktemp("serve")
    server = Server(f"checkpoint={ckpt}", cwd=cwd)
    yield server
    code, stderr = server.stop()
    assert code == 0 and "Traceback" not in stderr, stderr
    assert list(cwd.iterdir()) == [], "the server must write no files"


@pytest.fixture(scope="module")
def strict_server(tiny_run, tmp_path_factory):
    _, ckpt = tiny_run
    limits = ("max_active=1", "max_queue=1", f"max_tokens_limit={LONG}", "max_request_bytes=4096")
    server = Server(f"checkpoint={ckpt}", f"api_key={KEY}", *limits, cwd=tmp_path_factory.mktemp("strict"))
    yield server
    code, stderr = server.stop()
    assert code == 0 and "Traceback" not in stderr, stderr


def client(server, **kw) -> openai.OpenAI:
    key = kw.pop("api_key", "unused")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60, **kw)


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def chat_replies(ckpt, requests, *args, cwd) -> list[str]:
    """What python -m rgpt.chat answers to each (question, settings) on its own: one piped run, each
    question a line after a /set of its settings (a new seed gives a fresh generator, as a request does)."""
    stdin = "".join(f"/set {settings}\n{q}\n" for q, settings in requests)
    proc = run_cli("chat", f"checkpoint={ckpt}", *args, cwd=cwd, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")[: len(requests)]


def greedy_ids(turns, **decode) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a greedy reply, in-process on the same weights."""
    model, tok, _ = trained()
    prompt = tok.encode_prompt(turns)
    return prompt, generate(model, prompt, DecodeConfig(**decode))


# ---- the command line and settings ---------------------------------------------------------------------
def test_bad_settings_are_one_line_and_status_1(tiny_run, tmp_path):
    _, ckpt = tiny_run
    proc = run_cli("serve", f"checkpoint={ckpt}", "method=beam", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert (
        proc.stderr == "error: method=beam cannot stream replies; serve with method=greedy or method=sample\n"
    )


def test_settings_are_checked(tiny_run):
    _, ckpt = tiny_run
    for given, message in [
        ({"port": 70000}, "port=70000: must be an integer in [0, 65535]"),
        ({"max_queue": -1}, "max_queue=-1: must be an integer >= 0"),
        ({"max_active": True}, "max_active=True is not an integer"),
        ({"max_new_tokens": 2000}, "max_new_tokens=2000 exceeds max_tokens_limit=1024"),
        ({"api_key": " "}, "api_key is empty"),
        ({"top_p": 0}, "top_p=0.0 must be in (0, 1]"),
        ({"colour": "blue"}, "unknown key colour"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(ServeConfig, given)
    c = load(ServeConfig, {"api_key": 123, "port": 0, "temperature": 0.5, "context_tokens": 32})
    assert c.api_key == "123" and c.port == 0 and c.decode.temperature == 0.5 and c.context_tokens == 32
    with pytest.raises(ConfigError, match="cannot listen on no.such.host.invalid:0"):
        listen("no.such.host.invalid", 0)
    with pytest.raises(ConfigError, match="context_tokens=65 exceeds the model's window of 64"):
        serve(load(ServeConfig, {"checkpoint": str(ckpt), "context_tokens": 65}), torch.device("cpu"))
    assert model_id(ckpt) == "rgpt-sft-default-best-00000300", "the id names stage, run and checkpoint"


def test_the_composed_config_is_the_dataclass_defaults():
    """rgpt/conf/serve.yaml sets no key: what Hydra composes is ServeConfig's defaults, read back as they are."""
    assert load(ServeConfig, overrides._composed("serve", [])) == ServeConfig()


def test_a_port_in_use_is_one_line(open_server, tiny_run, tmp_path):
    _, ckpt = tiny_run
    port = open_server.url.rpartition(":")[2]
    proc = run_cli("serve", f"checkpoint={ckpt}", f"port={port}", cwd=tmp_path)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the official openai client ------------------------------------------------------------------------
def test_replies_equal_the_chat_cli_with_usage_counted(open_server, tiny_run, tmp_path):
    _, ckpt = tiny_run
    proc = run_cli("chat", f"checkpoint={ckpt}", f"prompt={Q_MOUNTAIN}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = proc.stdout.rstrip("\n")
    assert expected == ANSWERS[Q_MOUNTAIN]
    api = client(open_server)
    r = api.chat.completions.create(model=open_server.model, messages=ask(Q_MOUNTAIN), temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == open_server.model and r.id.startswith("chatcmpl-")
    assert r.choices[0].finish_reason == "stop" and abs(r.created - time.time()) < 60
    prompt, ids = greedy_ids([("user", Q_MOUNTAIN)])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ids)), r.usage
    assert r.usage.total_tokens == len(prompt) + len(ids)
    # the server's default method (greedy) gives the same reply when the request says nothing
    r = api.chat.completions.create(model=open_server.model, messages=ask(Q_MOUNTAIN))
    assert r.choices[0].message.content == expected


def test_a_stream_has_every_field_a_role_first_and_the_reply(open_server):
    api = client(open_server)
    chunks = list(
        api.chat.completions.create(
            model=open_server.model,
            messages=ask(Q_HELLO),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, *middle, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert "".join(c.choices[0].delta.content for c in middle) == ANSWERS[Q_HELLO]
    assert len(middle) > 1, "the reply must arrive in pieces"
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert last.choices[0].finish_reason == "stop" and not last.choices[0].delta.content
    assert {(c.id, c.object, c.created, c.model) for c in chunks} == {
        (first.id, "chat.completion.chunk", first.created, open_server.model)
    }, "every chunk carries the same id, object, created and model"
    prompt, ids = greedy_ids([("user", Q_HELLO)])
    assert usage.choices == [] and usage.usage.completion_tokens == len(ids)
    assert usage.usage.prompt_tokens == len(prompt)


def test_raw_stream_ends_with_done(open_server):
    body = {"model": open_server.model, "messages": ask(Q_SEASONS), "stream": True}
    with httpx.stream("POST", f"{open_server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == ANSWERS[Q_SEASONS]


def test_multi_turn_history_and_system_messages(open_server):
    messages = [
        {
            "role": "system",
            "content": "你是一个助手。",
        },  # accepted and left out: the model has no system turn
        {"role": "user", "content": Q_HELLO},
        {"role": "assistant", "content": ANSWERS[Q_HELLO]},
        {"role": "user", "content": [{"type": "text", "text": Q_SEASONS}]},
    ]
    r = client(open_server).chat.completions.create(model=open_server.model, messages=messages)
    assert r.choices[0].message.content == ANSWERS[Q_SEASONS], "the model was trained on this dialogue"
    model, tok, _ = trained()
    turns = [("user", Q_HELLO), ("assistant", ANSWERS[Q_HELLO]), ("user", Q_SEASONS)]
    assert r.usage.prompt_tokens == len(tok.encode_prompt(turns)), "the system message is not in the prompt"


def test_max_tokens_stop_and_seeded_sampling(open_server):
    api, model = client(open_server), open_server.model
    r = api.chat.completions.create(model=model, messages=ask(Q_MOUNTAIN), max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert ANSWERS[Q_MOUNTAIN].startswith(r.choices[0].message.content)
    r = api.chat.completions.create(model=model, messages=ask(Q_MOUNTAIN), stop=["碰撞", "不在"])
    assert r.choices[0].message.content == ANSWERS[Q_MOUNTAIN].split("碰撞")[0]
    assert r.choices[0].finish_reason == "stop"
    stream = api.chat.completions.create(model=model, messages=ask(Q_MOUNTAIN), stop="碰撞", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ANSWERS[Q_MOUNTAIN].split("碰撞")[0]
    sampled = [
        api.chat.completions.create(
            model=model, messages=ask(Q_MOUNTAIN), temperature=2.0, seed=7, max_tokens=12
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1], "the same seed gives the same sampled reply"
    assert [m.id for m in api.models.list()] == [model]


def test_reply_text_holds_back_what_may_start_a_stop_string():
    _, tok, _ = trained()
    ids = tok.encode("山脉主要由板块碰撞挤压形成。")
    text = ReplyText(tok, stop=("板块碰", "形成了"))
    pieces = [text.add(i) for i in ids]
    assert text.stopped and "".join(pieces) == "山脉主要由", pieces
    text = ReplyText(tok, stop=("形成了",))
    pieces = [text.add(i) for i in ids]
    assert not text.stopped and "".join(pieces) + text.rest() == "山脉主要由板块碰撞挤压形成。"
    assert pieces[-2] == "", "'形成' may start the stop string: held back until the reply ends"


# ---- raw HTTP: every error in OpenAI's format --------------------------------------------------------
def post(server, body, key=KEY, timeout=30.0) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    content = (
        body if isinstance(body, bytes) or not isinstance(body, dict | list) else json.dumps(body).encode()
    )
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert "Traceback" not in r.text and r.headers["content-type"] == "application/json", r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_bad_requests_get_openai_errors(strict_server):
    s = strict_server
    good = {"model": s.model, "messages": ask(Q_HELLO)}
    cases = [
        (b'{"model": "x", "messages": [', 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ('{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}'.encode("latin-1"), 400, "UTF-8"),
        ({"messages": ask(Q_HELLO)}, 400, "model: Field required"),
        ({**good, "messages": []}, 400, "messages"),
        (
            {**good, "messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            400,
            "last message",
        ),
        ({**good, "messages": [{"role": "tool", "content": "x"}]}, 400, "role='tool'"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text parts"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "top_p": 1.5}, 400, "top_p=1.5 must be in (0, 1]"),
        ({**good, "max_tokens": 0}, 400, "max_tokens=0 must be >= 1"),
        ({**good, "max_tokens": LONG + 1}, 400, f"limit of {LONG}"),
        ({**good, "n": 2}, 400, "n: "),
        ({**good, "presence_penalty": 0.5}, 400, "use repetition_penalty"),
        ({**good, "seed": 2**64}, 400, "seed=18446744073709551616 must fit in 64 bits"),
        ({**good, "min_tokens": -1}, 400, "min_tokens=-1 must be >= 0"),
        ({**good, "model": "gpt-4o"}, 404, "does not exist"),
    ]
    for body, status, needle in cases:
        error = error_of(post(s, body), status)
        assert needle in error["message"], (body, error)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    r = post(s, {**good, "frobnicate": True, "logit_bias": {}, "user": "u1"})  # unknown fields are ignored
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWERS[Q_HELLO]
    assert error_of(httpx.get(f"{s.url}/v2/nothing"), 404)["message"] == "no such endpoint: GET /v2/nothing"
    assert error_of(httpx.get(f"{s.url}/v1/chat/completions"), 405)


def test_oversized_bodies_are_refused(strict_server):
    big = {"model": strict_server.model, "messages": ask("山" * 5000)}
    assert "exceeds the limit" in error_of(post(strict_server, big), 413)["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield json.dumps(big).encode()

    assert "exceeds the limit" in error_of(post(strict_server, chunked()), 413)["message"]


def test_the_api_key_is_required_when_set(strict_server):
    s = strict_server
    body = {"model": s.model, "messages": ask(Q_HELLO)}
    for key in (None, "wrong"):
        assert error_of(post(s, body, key=key), 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(s, api_key="wrong").models.list()
    assert [m.id for m in client(s, api_key=KEY).models.list()] == [s.model]
    assert client(s, api_key=KEY).models.retrieve(s.model).id == s.model
    with pytest.raises(openai.NotFoundError):
        client(s, api_key=KEY).models.retrieve("gpt-4o")
    assert post(s, body).status_code == 200
    assert httpx.get(f"{s.url}/health").json()["status"] == "ok", "health needs no key"


# ---- load: a full queue, disconnects, many clients at once ----------------------------------------------
def wait_for(server, timeout=10.0, **counts) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        health = httpx.get(f"{server.url}/health").json()
        if all(health[k] == v for k, v in counts.items()):
            return health
        time.sleep(0.05)
    raise AssertionError(f"health never reached {counts}: {health}")


def endless_request(server, stream: bool) -> dict:
    """A request whose reply cannot end during a test: min_tokens forbids the end of turn before LONG."""
    body = {"model": server.model, "messages": ask(Q_HELLO), "max_tokens": LONG, "min_tokens": LONG}
    return body | {"stream": stream}


@pytest.mark.slow
def test_full_queue_is_503_and_a_disconnect_frees_the_slot(strict_server):
    s = strict_server
    endless, headers = endless_request(s, stream=True), {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(base_url=s.url, headers=headers, timeout=30) as a,
        httpx.Client(base_url=s.url, headers=headers, timeout=30) as b,
    ):
        with a.stream("POST", "/v1/chat/completions", json=endless) as first:
            lines = first.iter_lines()
            assert [next(lines) for _ in range(4)][2].startswith("data: "), "the first reply streams"
            with b.stream("POST", "/v1/chat/completions", json=endless) as second:
                assert second.status_code == 200
                wait_for(s, active=1, queued=1)
                r = post(s, {"model": s.model, "messages": ask(Q_HELLO)})
                assert error_of(r, 503)["code"] == "server_busy" and r.headers["retry-after"] == "1"
            wait_for(s, active=1, queued=0)  # the waiting client left: out of the queue
        wait_for(s, active=0, queued=0, timeout=5)  # the streaming client left: its decoding stops
    r = post(s, {"model": s.model, "messages": ask(Q_HELLO)})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ANSWERS[Q_HELLO]


@pytest.mark.slow
def test_a_non_streaming_client_that_leaves_frees_its_slot(strict_server):
    s = strict_server
    endless = endless_request(s, stream=False)
    with pytest.raises(httpx.ReadTimeout):
        post(s, endless, timeout=1.0)  # gives up after a second, closing the connection
    wait_for(s, active=0, queued=0, timeout=5)


@pytest.fixture(params=["fp32", "bf16", "fp32-invariant"])
def any_precision_server(request, open_server, tiny_run, tmp_path_factory):
    """(server, its settings): the module's fp32 server, one with bfloat16 products (precision=bf16), or
    one whose fp32 products are batch-invariant (batch_invariant=true)."""
    if request.param == "fp32":
        yield open_server, "precision=fp32"
        return
    keys = "precision=bf16" if request.param == "bf16" else "batch_invariant=true"
    server = Server(f"checkpoint={tiny_run[1]}", keys, cwd=tmp_path_factory.mktemp(request.param))
    yield server, keys
    code, stderr = server.stop()
    assert code == 0 and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_concurrent_streams_never_cross(any_precision_server, tiny_run, tmp_path):
    """32 streams at once, distinct questions, decoded together: each reply equals the chat CLI's reply to
    it alone (with the same settings). The taught questions are answered greedily; the others are sampled
    with a seed each, so that their replies differ (greedy, the tiny model answers most unknown questions
    alike) and a crossed token shows."""
    open_server, keys = any_precision_server
    _, ckpt = tiny_run
    _, tok, _ = trained()
    chars = [t for t in tok.tokens if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    requests = [(q, "method=greedy") for q in ANSWERS]
    requests += [
        (chars[i % len(chars)] + chars[(7 * i + 3) % len(chars)], f"method=sample temperature=2 seed={i}")
        for i in range(32 - len(requests))
    ]
    expected = chat_replies(ckpt, requests, "max_new_tokens=30", keys, cwd=tmp_path)
    assert expected[: len(ANSWERS)] == list(ANSWERS.values())
    assert len(set(expected)) >= 20, f"too few distinct replies to tell crossed streams apart: {expected}"

    async def one(api, question, settings):
        fields = dict(kv.split("=") for kv in settings.split())
        sampled = {"temperature": 2.0, "seed": int(fields["seed"])} if fields["method"] == "sample" else {}
        stream = await api.chat.completions.create(
            model=open_server.model, messages=ask(question), max_tokens=30, stream=True, **sampled
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_at_once():
        api = openai.AsyncOpenAI(
            base_url=f"{open_server.url}/v1", api_key="unused", max_retries=0, timeout=60
        )
        return await asyncio.gather(*(one(api, q, settings) for q, settings in requests))

    got = asyncio.run(all_at_once())
    crossed = [(r, e, g) for r, e, g in zip(requests, expected, got) if e != g]
    assert not crossed, (
        f"{len(crossed)} of {len(requests)} replies differ (request, expected, got): {crossed}"
    )
    assert wait_for(open_server, active=0, queued=0)["served"] >= len(requests)


@pytest.mark.slow
def test_ctrl_c_stops_a_server_started_with_sigint_ignored(tiny_run, tmp_path):
    """A background job of a script starts with SIGINT ignored, so Python's own Ctrl-C handler is never
    installed; the server sets its own and still ends at once."""
    s = Server(f"checkpoint={tiny_run[1]}", cwd=tmp_path, ignore_sigint=True)
    decoder = s.decoder()
    start = time.monotonic()
    code, stderr = s.stop(timeout=10)
    assert code == 0 and time.monotonic() - start < 5 and "Traceback" not in stderr, (code, stderr)
    assert not Path(f"/proc/{decoder}").exists(), "the decoding process outlived the server"


@pytest.mark.slow
def test_stopping_the_server_ends_open_streams_at_once(strict_server):
    """Ctrl-C with a stream open: the stream gets an error event and [DONE] and the server exits 0 at once,
    instead of waiting for the reply or being cut off after the graceful-shutdown timeout. (Runs last.)"""
    s = strict_server
    endless, headers = endless_request(s, stream=True), {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=endless, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        wait_for(s, active=1)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        events = [line for line in lines if line]
    assert time.monotonic() - start < 2.5, "the stream should end as soon as the server is told to stop"
    assert events[-1] == "data: [DONE]" and "the server is shutting down" in events[-2], events[-3:]
    s.proc.wait(timeout=5)  # before stop(), whose second Ctrl-C would force the exit
    code, stderr = s.stop()
    assert code == 0 and "Traceback" not in stderr and "ERROR" not in stderr, stderr
