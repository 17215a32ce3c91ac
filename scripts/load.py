"""python scripts/load.py (--checkpoint PATH | --tiny) [--clients 32] [--max-tokens 64] [--threads 2]
                         [--probe-batching]

A load test of python -m rgpt.serve: starts the server on loopback, opens --clients streaming requests at
once with distinct questions (the first user turns of the built-in SFT corpus), then asks each question
again alone, one after another, and checks that every concurrent reply equals its lone reply (none
crossed). Each request samples with its own seed (its index), so the replies differ from each other and
still repeat exactly; min_tokens = max_tokens makes every reply the same length, so the figures compare.
Prints time to first token (p50/p95), tokens/s over all clients together and per client (its tokens over
its whole request), and the same for lone requests.
--tiny serves the tests' tiny model (2 layers, 32 wide, trained in seconds) instead of a checkpoint.
--probe-batching also times decode steps of one row against many rows at once: what batching the
active replies could gain at most.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' server helper and tiny model
from rgpt.data import CORPUS_DIR  # noqa: E402
from tests.fixtures_serve import Server  # noqa: E402


def questions(n: int) -> list[str]:
    """The first n distinct first questions of the built-in SFT dialogues."""
    seen = []
    for path in sorted((CORPUS_DIR / "sft").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            q = json.loads(line)["conversations"][0]["content"]
            if q not in seen:
                seen.append(q)
            if len(seen) == n:
                return seen
    raise SystemExit(f"only {len(seen)} questions in the corpus")


async def ask(client, model: str, question: str, seed: int, args) -> dict:
    """One streamed request: its text, seconds to the first text, seconds in all, tokens generated."""
    n = args.max_tokens
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True}
    body |= {"stream_options": {"include_usage": True}, "max_tokens": n, "min_tokens": n}
    body |= {"temperature": args.temperature, "seed": seed}
    start, first, pieces, tokens = time.perf_counter(), None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"text": "".join(pieces), "ttft": first - start, "total": end - start, "tokens": tokens}


def p95(xs):
    return statistics.quantiles(xs, n=20, method="inclusive")[18]


async def measure(url: str, model: str, args) -> dict:
    qs = questions(args.clients)
    limits = httpx.Limits(max_connections=args.clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        together = await asyncio.gather(*(ask(client, model, q, i, args) for i, q in enumerate(qs)))
        wall = time.perf_counter() - start
        alone = [await ask(client, model, q, i, args) for i, q in enumerate(qs)]
    crossed = sum(t["text"] != a["text"] for t, a in zip(together, alone))
    return {
        "clients": len(qs),
        "completed": sum(r["tokens"] == args.max_tokens for r in together),
        "crossed": crossed,
        "distinct replies": len({r["text"] for r in alone}),
        "ttft p50 s": statistics.median(r["ttft"] for r in together),
        "ttft p95 s": p95([r["ttft"] for r in together]),
        "tokens/s, all clients": sum(r["tokens"] for r in together) / wall,
        "tokens/s per client (median)": statistics.median(r["tokens"] / r["total"] for r in together),
        "wall s": wall,
        "lone: ttft p50 s": statistics.median(r["ttft"] for r in alone),
        "lone: tokens/s": statistics.median(r["tokens"] / r["total"] for r in alone),
    }


def batching_probe(checkpoint, threads: int, rows: int, steps: int = 48) -> dict:
    """What batching the active replies could gain at most: ms per token of one decode step of one row
    (how the server decodes, a reply at a time) against one step of `rows` rows together (the same
    position in every row; real batching would also need a position and a mask per row)."""
    import torch

    from rgpt.inference.generate import Window
    from rgpt.inference.load import open_model

    torch.set_num_threads(threads)
    with torch.no_grad():
        model, _, _ = open_model(checkpoint, None, torch.device("cpu"))
        V, T = model.config.vocab_size, model.config.block_size
        ms = {}
        for batch in (1, rows):
            window = Window(model, batch)
            window.extend(torch.randint(6, V, (batch, T // 4)))  # a prompt a quarter of the window long
            start = time.perf_counter()
            for _ in range(steps):
                window.extend(torch.randint(6, V, (batch, 1)))
            ms[batch] = (time.perf_counter() - start) / steps / batch * 1000
    return {"ms/token, a reply at a time": ms[1], f"ms/token, {rows} rows batched": ms[rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[2])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint, run or checkpoints/ directory")
    which.add_argument("--tiny", action="store_true", help="the tests' tiny model")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (min_tokens too)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's torch threads")
    parser.add_argument("--probe-batching", action="store_true", help="also time batched decode steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if args.tiny:
            from tests.fixtures_ckpt import save_tiny

            checkpoint = save_tiny(Path(tmp))
        server = Server(
            f"checkpoint={checkpoint}", f"max_active={args.clients}", threads=args.threads, cwd=tmp
        )
        try:
            result = asyncio.run(measure(server.url, server.model, args))
        finally:
            code, stderr = server.stop()
        if args.probe_batching:
            result |= batching_probe(checkpoint, args.threads, args.clients)
    print(f"model {server.model} ({checkpoint}), {args.max_tokens} tokens a reply")
    for key, value in result.items():
        print(f"  {key:30} {value:.3f}" if isinstance(value, float) else f"  {key:30} {value}")
    if result["crossed"] or result["completed"] != result["clients"] or code != 0:
        print(f"FAILED (server exit {code}):\n{stderr}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
