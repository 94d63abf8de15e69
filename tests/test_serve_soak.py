"""Soak (slow): `zen-eco serve` as a real process, 500 requests from 16 concurrent `openai` clients
(chat, streamed chat, completions), zero errors, and the server's resident memory growing less
than 5% from after a warm-up to the end. Then Ctrl-C ends it cleanly and quickly.

    python -m pytest -q -m slow tests/test_serve_soak.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

REQUESTS, CLIENTS, WARMUP = 500, 16, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_gguf_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "zen_eco.cli", "serve", "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--model-name", "smollm2", "--max-tokens", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield proc, base
    if proc.poll() is None:
        proc.kill()


def _one(client: openai.OpenAI, i: int) -> str:
    kind = i % 3
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": f"Tell me about {i}"}]
    if kind == 0:
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0.7, seed=i)
        assert r.choices[0].finish_reason in ("stop", "length")
        return r.choices[0].message.content
    if kind == 1:
        text, finish = "", None
        for chunk in client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, stream=True,
                                                    stream_options={"include_usage": True}):
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        assert finish in ("stop", "length")
        return text
    r = client.completions.create(model="smollm2", prompt=f"Item {i}:", max_tokens=12, temperature=0.7)
    return r.choices[0].text


@pytest.mark.slow
def test_soak_500_requests_16_clients(server):
    proc, base = server
    clients = [openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120) for _ in range(CLIENTS)]
    rss = psutil.Process(proc.pid)

    def run(indices):
        with ThreadPoolExecutor(CLIENTS) as pool:
            return list(pool.map(lambda i: _one(clients[i % CLIENTS], i), indices))

    run(range(WARMUP))
    before = rss.memory_info().rss
    t0 = time.perf_counter()
    results = run(range(WARMUP, REQUESTS))  # any error raises here
    took = time.perf_counter() - t0
    after = rss.memory_info().rss
    assert len(results) == REQUESTS - WARMUP
    assert after < before * 1.05, f"RSS grew from {before / 2**20:.0f} MiB to {after / 2**20:.0f} MiB"
    metrics = httpx.get(base + "/metrics").text
    assert 'status="5' not in metrics and 'status="4' not in metrics
    print(f"{REQUESTS - WARMUP} requests in {took:.1f} s; RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")

    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    assert proc.wait(15) == 0
    assert time.perf_counter() - t0 < 10
