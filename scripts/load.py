"""python scripts/load.py (--checkpoint PATH | --tiny) [--clients 1,8,16,32] [--max-tokens 64]
                         [--seconds 5] [--threads 2] [--precision fp32] [--repo PATH] [--bare]
                         [--ceiling] [--label NAME]

A load test of python -m rgpt.serve with the official `openai` client: starts the server on loopback,
then for each number of clients opens that many streaming requests at once (distinct questions: the first
user turns of the built-in SFT corpus, each sampled with its own seed, min_tokens = max_tokens so every
reply is as long), again in rounds until --seconds (5) have passed, and reports, as a Markdown table row
per count, over all its rounds:

  tokens/s of all clients together (their tokens over the wall time from the first request to the last
  end), the median client's tokens/s, time to first token p50/p95, and inter-token latency p50/p95 (the
  gaps between a stream's successive chunks, over all streams), and the CPU time the server's web process,
  its decoding process and the load client (this process) spent meanwhile, in % of one core: all three
  share the machine's cores (a server older than the decoding process has all its work in "web").

At the largest count it then asks every question again alone, one after another, and checks that each
concurrent reply, in every round, equals its lone reply (none crossed, none changed by its company); a
difference fails.
--bare also times the model's own KV-cache decode in this process (rgpt.inference.generate.stream, as
scripts/bench.py does): the server's one-client tokens/s over it is the serving overhead.
--ceiling then measures what the decoding itself allows at each count: a Batcher decoding the same
replies in this process (no HTTP, no JSON, the same threads), once alone on the machine and once beside a
process that spins for the share of a core the web process and the clients took at that count in the
server run (on a small machine they take it from the decoding's threads).
--repo serves another checkout of rgpt (e.g. a worktree of an older commit: the "before" of a change);
its server is given only the keys every version knows.
--tiny serves the tests' tiny model (2 layers, 32 wide, trained in seconds) instead of a checkpoint.
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

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' server helper and tiny model
from rgpt.data import CORPUS_DIR  # noqa: E402
from tests.fixtures_serve import Server, children  # noqa: E402


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


async def ask(api, model: str, question: str, seed: int, args) -> dict:
    """One streamed request: its text, the arrival time of each chunk of text, its start, its tokens."""
    n = args.max_tokens
    start, times, pieces, tokens = time.perf_counter(), [], [], None
    stream = await api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=n,
        temperature=args.temperature,
        seed=seed,
        extra_body={"min_tokens": n},
    )
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                times.append(time.perf_counter())
                pieces.append(choice.delta.content)
    return {
        "text": "".join(pieces),
        "start": start,
        "times": times,
        "end": time.perf_counter(),
        "tokens": tokens,
    }


def pct(xs, p: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the server's web process and of its decoding process (its child; 0 if it has none)."""
    return cpu_seconds(pid), sum(cpu_seconds(c) for c in children(pid))


async def at_once(api, model: str, qs: list[str], args) -> dict:
    """The clients' requests at once, again and again (the same seeds) until --seconds have passed: a
    round of 16 replies takes under a second, too short for one figure on a shared machine."""
    start, cpu = time.perf_counter(), (server_cpu(args.server_pid), time.process_time())
    rounds = []
    while not rounds or time.perf_counter() - start < args.seconds:
        rounds.append(await asyncio.gather(*(ask(api, model, q, i, args) for i, q in enumerate(qs))))
    wall = time.perf_counter() - start
    (web, decoder), client_cpu = server_cpu(args.server_pid), time.process_time() - cpu[1]
    web, decoder = web - cpu[0][0], decoder - cpu[0][1]
    got = [r for replies in rounds for r in replies]
    ttft = [r["times"][0] - r["start"] for r in got if r["times"]]
    gaps = [b - a for r in got for a, b in zip(r["times"], r["times"][1:])]
    return {
        "rounds": rounds,
        "row": {
            "clients": len(qs),
            "rounds": len(rounds),
            "tokens/s, all": sum(r["tokens"] or 0 for r in got) / wall,
            "tokens/s, median client": statistics.median(
                (r["tokens"] or 0) / (r["end"] - r["start"]) for r in got
            ),
            "TTFT p50 ms": 1000 * pct(ttft, 50),
            "TTFT p95 ms": 1000 * pct(ttft, 95),
            "ITL p50 ms": 1000 * pct(gaps, 50) if gaps else float("nan"),
            "ITL p95 ms": 1000 * pct(gaps, 95) if gaps else float("nan"),
            "web CPU %": 100 * web / wall,
            "decoder CPU %": 100 * decoder / wall,
            "client CPU %": 100 * client_cpu / wall,
            "complete": sum(r["tokens"] == args.max_tokens for r in got) // len(rounds),
        },
    }


async def measure(url: str, model: str, args) -> tuple[list[dict], int]:
    """A table row for each client count, and how many replies changed in company (at the largest)."""
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    counts = sorted(args.clients)
    await ask(api, model, "你好", 0, args)  # warm-up: the first request's one-off costs are not a figure
    rows, together = [], None
    for n in counts:
        got = await at_once(api, model, questions(n), args)
        rows.append(got["row"])
        together = got["rounds"]
        print(f"  {n} clients: {got['row']['tokens/s, all']:.0f} tokens/s", file=sys.stderr, flush=True)
    alone = [await ask(api, model, q, i, args) for i, q in enumerate(questions(counts[-1]))]
    crossed = sum(any(t[i]["text"] != a["text"] for t in together) for i, a in enumerate(alone))
    if len({a["text"] for a in alone}) < len(alone) // 2:
        raise SystemExit("too few distinct replies to tell crossed streams apart")
    await api.close()
    return rows, crossed


def open_as_the_decoder(checkpoint, args):
    """(model, tokenizer) opened in this process as the server's decoding process opens them: its threads,
    its allocator (keep unless the server keys say otherwise: glibc's default maps and zeroes every fresh
    block of 128 KiB or more again, e.g. 16 rows' float64 CDF: 1 ms instead of 0.1), its precision and
    batch_invariant."""
    from rgpt.inference.load import open_model
    from rgpt.runtime.device import RuntimeSettings

    keys = dict(k.split("=", 1) for k in args.serve if "=" in k)
    RuntimeSettings(device="cpu", threads=args.threads, allocator=keys.get("allocator", "keep")).apply()
    invariant = keys.get("batch_invariant") == "true"
    model, tok, _ = open_model(checkpoint, None, "cpu", args.precision, invariant)
    return model, tok


def bare_decode(checkpoint, args) -> float:
    """Tokens/s of the model's own KV-cache decode (one reply, greedy, as scripts/bench.py times it)."""
    import torch

    from rgpt.inference.generate import DecodeConfig, generate

    with torch.no_grad():
        model, tok = open_as_the_decoder(checkpoint, args)  # timed as the server decodes
        prompt = tok.encode_prompt([("user", questions(1)[0])])
        n = args.max_tokens
        cfg = DecodeConfig(max_new_tokens=n, min_new_tokens=n)
        generate(model, prompt, cfg)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            generate(model, prompt, cfg)
            times.append(time.perf_counter() - start)
    return n / statistics.median(times)


SPIN = """
import sys, time
share, period = float(sys.argv[1]), 0.01
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < share * period:
        pass
    time.sleep((1 - share) * period)
"""


def in_process(checkpoint, args, rows: list[dict]) -> list[dict]:
    """The ceiling at each count: a Batcher decoding the same replies in this process (no HTTP, no JSON,
    the same threads), alone on the machine and beside a process that spins for the share of a core the
    web process and the clients took at that count (they share the cores with the decoding in the server)."""
    import subprocess

    import torch

    from rgpt.inference.batch import Batcher, Row
    from rgpt.inference.generate import DecodeConfig

    model, tok = open_as_the_decoder(checkpoint, args)
    n_tok = args.max_tokens

    def rate(n: int) -> float:  # tokens/s of rounds of n replies, for --seconds
        prompts = [tok.encode_prompt([("user", q)]) for q in questions(n)]
        start, tokens = time.perf_counter(), 0
        while not tokens or time.perf_counter() - start < args.seconds:
            batcher = Batcher(model, n)
            for i, prompt in enumerate(prompts):
                cfg = DecodeConfig(
                    method="sample",
                    temperature=args.temperature,
                    seed=i,
                    max_new_tokens=n_tok,
                    min_new_tokens=n_tok,
                )
                batcher.add(Row(prompt, cfg))
            while len(batcher):
                tokens += sum(e.token is not None for e in batcher.step())
        return tokens / (time.perf_counter() - start)

    out = []
    with torch.no_grad():
        rate(1)  # warm-up
        for r in rows:
            n, share = r["clients"], min(0.95, (r["web CPU %"] + r["client CPU %"]) / 100)
            idle = rate(n)
            spin = subprocess.Popen([sys.executable, "-c", SPIN, str(share)])
            try:
                busy = rate(n)
            finally:
                spin.kill()
                spin.wait()
            out.append(
                {
                    "clients": n,
                    "server tokens/s": r["tokens/s, all"],
                    "in-process, idle": idle,
                    "spinning %": 100 * share,
                    "in-process, beside the spin": busy,
                    "server ÷ that %": 100 * r["tokens/s, all"] / busy,
                }
            )
    return out


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append(
            "| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[3])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint, run or checkpoints/ directory")
    which.add_argument("--tiny", action="store_true", help="the tests' tiny model")
    parser.add_argument("--clients", default="1,8,16,32", help="client counts, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (min_tokens too)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="each count's rounds last this long at least"
    )
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's torch threads")
    parser.add_argument("--precision", default="fp32", help="the server's precision= (fp32, bf16)")
    parser.add_argument("--repo", help="serve this checkout of rgpt instead (its server gets no precision=)")
    parser.add_argument("--bare", action="store_true", help="also time the bare KV-cache decode")
    parser.add_argument(
        "--ceiling", action="store_true", help="also the in-process decode, idle and beside a spin"
    )
    parser.add_argument("--label", default="", help="a name for this run in the output")
    parser.add_argument("serve", nargs="*", help="more key=value settings for the server (not with --repo)")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if args.tiny:
            from tests.fixtures_ckpt import save_tiny

            checkpoint = save_tiny(Path(tmp))
        keys = [f"checkpoint={Path(checkpoint).resolve()}", f"max_active={max(args.clients)}"]
        keys += [] if args.repo else [f"precision={args.precision}", *args.serve]
        env = {"PYTHONPATH": str(Path(args.repo).resolve())} if args.repo else None
        server = Server(*keys, threads=args.threads, cwd=tmp, env=env)
        args.server_pid = server.proc.pid
        try:
            rows, crossed = asyncio.run(measure(server.url, server.model, args))
        finally:
            code, stderr = server.stop()
        bare = bare_decode(checkpoint, args) if args.bare else None
        ceiling = in_process(checkpoint, args, rows) if args.ceiling else None
    print(
        f"\n{args.label or 'server'}: {server.model} ({checkpoint}), {args.max_tokens} tokens a reply, "
        f"threads={args.threads}, precision={'(default)' if args.repo else args.precision}"
    )
    print(table(rows))
    one = rows[0]["tokens/s, all"] if rows[0]["clients"] == 1 else None
    for r in rows:
        if one and r["clients"] > 1:
            print(f"  {r['clients']} clients: {r['tokens/s, all'] / one:.2f}x one client's tokens/s")
    if bare:
        print(
            f"  bare KV-cache decode: {bare:.0f} tokens/s"
            + (f"; one client through the server: {one / bare:.0%} of it" if one else "")
        )
    print(f"  replies that changed in company of {max(args.clients)}: {crossed}")
    if ceiling:
        print(
            "\nThe ceiling: this checkout's Batcher in-process, alone and beside a spin at the share of a core"
        )
        print("the web process and the clients took at each count\n" + table(ceiling))
        one = ceiling[0] if ceiling[0]["clients"] == 1 else None
        for c in ceiling[1:] if one else ():
            idle, busy = c["in-process, idle"], c["in-process, beside the spin"]
            print(
                f"  {c['clients']} rows ÷ 1 row in-process: {idle / one['in-process, idle']:.2f}x idle, "
                f"{busy / one['in-process, beside the spin']:.2f}x beside the spins"
            )
    if crossed or any(r["complete"] != r["clients"] for r in rows) or code != 0:
        print(f"FAILED (server exit {code}):\n{stderr}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
