"""Serving under load: zen-eco's server against llama-cpp-python's, same GGUF, prompts and threads.

    python benchmarks/serve.py [MODEL] [-t THREADS] [-n 64] [-c 1,4,16] [--servers zen-eco,llama.cpp]
                               [--decode-tokens 96] [--json OUT]

MODEL is a GGUF file or `default` (the bundled SmolLM2-135M-Instruct Q4_1). Each server runs in its
own process, one after the other in the same invocation, with the same number of threads:

- zen-eco: `zen-eco serve MODEL --threads T --max-batch 16` (continuous batching);
- llama.cpp: `python -m llama_cpp.server --model MODEL --n_threads T --interrupt_requests False`
  (needs `pip install 'llama-cpp-python[server]'`; it answers one request at a time, queueing the
  rest; without `--interrupt_requests False` a new request would cut off the running one).

For each concurrency C (default 1, 4 and 16) the client keeps C streaming chat requests in flight
until max(8, 2 C) have finished, each from a fixed list of prompts, greedy, at most `-n` tokens,
and reports time to first token (TTFT) and inter-token latency (ITL: gaps between streamed
chunks) at p50/p99, requests/s and generated tokens/s over the level's wall time.

Then the decode scaling: 1 and then 8 streams started together, each forced to generate exactly
`--decode-tokens` tokens (end-of-turn tokens banned by `logit_bias`); aggregate decode throughput is
the tokens streamed while all of them were decoding (from the last stream's first token to the
first stream's last token) divided by that window. The target for zen-eco is >= 3x at 8 streams.

The client runs on the same machine (asyncio + httpx, one process) and takes some CPU from both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.", "List three uses of a paperclip.",
    "How do I boil an egg?", "What is 17 times 23?", "Give me a name for a black cat.",
    "Why is the sky blue?", "Summarize the plot of Romeo and Juliet.", "What does a CPU do?",
    "Translate 'good morning' into Spanish.", "Suggest a weekend activity for a rainy day.",
    "What is the boiling point of water in Fahrenheit?", "Describe a rainbow to a child.",
    "What is a prime number?", "Write a short toast for a friend's birthday.",
]


@dataclass
class Result:
    start: float
    first: float | None = None
    arrivals: list[float] = field(default_factory=list)  # one per chunk that carried text
    tokens: int = 0
    error: str | None = None

    @property
    def end(self) -> float:
        return self.arrivals[-1] if self.arrivals else self.start


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, extra: dict | None = None) -> Result:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    r = Result(time.perf_counter())
    usage = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        now = time.perf_counter()
                        r.first = r.first or now
                        r.arrivals.append(now)
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    r.tokens = usage["completion_tokens"] if usage else len(r.arrivals)
    return r


async def load_level(base: str, concurrency: int, total: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        queue = list(range(total))
        results: list[Result] = []

        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                results.append(await one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.error is None and r.first is not None]
    ttft = [r.first - r.start for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.arrivals, r.arrivals[1:])]
    return {"concurrency": concurrency, "requests": total, "errors": len(results) - len(ok),
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99),
            "req_s": len(ok) / wall, "tok_s": sum(r.tokens for r in ok) / wall, "wall_s": wall,
            "first_error": next((r.error for r in results if r.error), None)}


async def decode_scaling(base: str, streams: int, tokens: int, ban: dict[str, int]) -> dict:
    """Aggregate decode tok/s while `streams` forced-length streams all decode at once."""
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as c:
        results = await asyncio.gather(*(one_request(c, PROMPTS[i % len(PROMPTS)], tokens, {"logit_bias": ban})
                                         for i in range(streams)))
    bad = [r.error for r in results if r.error or r.first is None]
    if bad:
        return {"streams": streams, "error": bad[0]}
    lo = max(r.first for r in results)
    hi = min(r.end for r in results)
    if hi <= lo:  # a serial server: the streams never overlap, so take each one's own decode rate
        per = [(len(r.arrivals) - 1) / (r.end - r.first) for r in results if r.end > r.first]
        return {"streams": streams, "decode_tok_s": sum(per) / len(per), "overlap": False}
    n = sum(1 for r in results for t in r.arrivals if lo < t <= hi)
    return {"streams": streams, "decode_tok_s": n / (hi - lo), "overlap": True,
            "tokens": [r.tokens for r in results]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, path: str, threads: int, port: int, ctx: int) -> subprocess.Popen:
    if name == "zen-eco":
        cmd = [sys.executable, "-c", "from zen_eco.cli import main; main()", "serve", path, "--port", str(port),
               "--threads", str(threads), "--max-batch", "16", "--model-name", "bench", "--ctx-size", str(ctx)]
    elif name == "llama.cpp":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
               "--interrupt_requests", "False", "--model_alias", "bench", "--verbose", "False"]
    else:
        raise SystemExit(f"unknown server {name!r}; use zen-eco or llama.cpp")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the server did not come up")


def engine_label(name: str) -> str:
    if name == "llama.cpp":
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__}"
    return "zen-eco"


def run_server(name: str, path: str, args, ban: dict[str, int]) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(name, path, args.threads, port, args.ctx)
    try:
        wait_ready(proc, base)
        asyncio.run(load_level(base, 2, 2, 8))  # warm-up
        levels = []
        for c in args.concurrency:
            levels.append(asyncio.run(load_level(base, c, max(8, 2 * c), args.max_tokens)))
            print(f"  {name} c={c}: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in levels[-1].items()})}",
                  file=sys.stderr)
        scaling = [asyncio.run(decode_scaling(base, s, args.decode_tokens, ban)) for s in (1, 8)]
        print(f"  {name} decode scaling: {scaling}", file=sys.stderr)
        return {"server": engine_label(name), "levels": levels, "scaling": scaling}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def table(runs: list[dict]) -> str:
    lines = ["| server | concurrency | requests | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | req/s | tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for lv in run["levels"]:
            err = f" ({lv['errors']} errors)" if lv["errors"] else ""
            lines.append(f"| {run['server']} | {lv['concurrency']} | {lv['requests']}{err} | {lv['ttft_p50_ms']:.0f} | "
                         f"{lv['ttft_p99_ms']:.0f} | {lv['itl_p50_ms']:.1f} | {lv['itl_p99_ms']:.1f} | "
                         f"{lv['req_s']:.2f} | {lv['tok_s']:.1f} |")
    lines += ["", "| server | decode tok/s, 1 stream | decode tok/s, 8 streams | ratio |", "|---|---:|---:|---:|"]
    for run in runs:
        one, eight = run["scaling"]
        if "error" in one or "error" in eight:
            lines.append(f"| {run['server']} | {one.get('error', '')} | {eight.get('error', '')} | |")
            continue
        note = "" if eight["overlap"] else " (serial: no overlap)"
        lines.append(f"| {run['server']} | {one['decode_tok_s']:.1f} | {eight['decode_tok_s']:.1f}{note} | "
                     f"**{eight['decode_tok_s'] / one['decode_tok_s']:.2f}x** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens per request in the load levels")
    ap.add_argument("-c", "--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--decode-tokens", type=int, default=96, help="tokens per stream in the decode scaling run")
    ap.add_argument("--ctx", type=int, default=2048, help="context size both servers are started with")
    ap.add_argument("--servers", default="zen-eco,llama.cpp")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    from zen_eco.checkpoint import resolve_model
    from zen_eco.checkpoint.load import open_checkpoint

    path = str(resolve_model(args.model))
    ckpt = open_checkpoint(path)
    ban = {str(i): -100 for i in ckpt.tokenizer().eos_token_ids}  # the same ids in both servers (same file)
    ckpt.close()
    runs = []
    for name in args.servers.split(","):
        if name == "llama.cpp":
            try:
                import llama_cpp.server.app  # noqa: F401
            except ImportError as e:
                print(f"skipping llama.cpp: {e} (pip install 'llama-cpp-python[server]')", file=sys.stderr)
                continue
        print(f"{name}: {path}", file=sys.stderr)
        runs.append(run_server(name, path, args, ban))
    print(table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path, "threads": args.threads, "max_tokens": args.max_tokens, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
