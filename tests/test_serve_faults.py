"""`zen-eco serve` under abuse: every bad request gets a 4xx in OpenAI's error shape, a client that
leaves mid-stream frees its slot, many streams at once all finish, shutdown mid-generation is
quick, and after each fault the server still gives the same greedy answer as before.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import openai
import pytest

from zen_eco.serve.app import serve_in_thread
from zen_eco.serve.requests import MAX_N
from zen_eco.serve.state import ServerConfig, ServerState

HI = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"
NO_EOS = {"2": -100}  # SmolLM2's <|im_end|>: banned, so a generation runs to max_tokens


@pytest.fixture(scope="module")
def url(zm):
    with serve_in_thread(ServerState(zm, ServerConfig("smollm2", port=0))) as base:
        yield base


@pytest.fixture(scope="module")
def reference(zm):
    return zm.chat(HI, max_tokens=8, temperature=0).content


@pytest.fixture(autouse=True)
def still_serving(request, http, reference):
    """After every fault, the server answers the reference question exactly as before."""
    yield
    r = http.post(CHAT, json={"messages": HI, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == reference
    assert http.get("/health").json()["status"] == "ok"


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _metric(http: httpx.Client, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.M)
    return float(m.group(1))


def test_malformed_json(http):
    for body in (b'{"messages": [', b"not json", b"", b"{'messages': []}", b'{"messages": [{"role": "user", "content": "x"}]} trailing'):
        error = _error(http.post(CHAT, content=body, headers={"content-type": "application/json"}))
        assert error["type"] == "invalid_request_error"
    for body in (b"[]", b"null", b'"text"', b"42"):  # JSON, but not an object
        _error(http.post(CHAT, content=body, headers={"content-type": "application/json"}))
    _error(http.post(CHAT, content=b"[" * 100_000 + b"]" * 100_000))  # nested past the parser's recursion


def test_wrong_types(http):
    cases = {"max_tokens": "10", "temperature": "hot", "n": 1.5, "stop": 3, "stream": "yes", "seed": 1.5,
             "messages": "Hi", "logprobs": 1, "top_p": True, "response_format": "json"}
    for field, value in cases.items():
        body = {"messages": HI, "max_tokens": 2} | {field: value}
        assert _error(http.post(CHAT, json=body))["param"].startswith(field), field
    for messages in ([{"role": "wizard", "content": "x"}], [{"content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ["Hi"]):
        assert _error(http.post(CHAT, json={"messages": messages}))["param"].startswith("messages")
    _error(http.post(CHAT, json={"messages": HI, "temperature": 2.5}))
    _error(http.post(CHAT, json={"messages": HI, "logit_bias": {"not-a-token": 1}}))
    _error(http.post(CHAT, json={"messages": HI, "logit_bias": {"99999999": 1}}))
    _error(http.post("/v1/completions", json={"prompt": [1, 2, 10**9], "max_tokens": 2}))
    _error(http.post("/v1/completions", json={"prompt": [1, "two"]}))
    _error(http.post(CHAT, json={"messages": HI, "chat_template_kwargs": {"enable_thinking": "no"}}))


def test_max_tokens_negative_zero_or_absurd(http):
    for value in (-1, 0):
        assert _error(http.post(CHAT, json={"messages": HI, "max_tokens": value}))["param"] == "max_tokens"
    _error(http.post(CHAT, json={"messages": HI, "max_completion_tokens": -5}))
    for value in (10**12, 10**30):
        error = _error(http.post(CHAT, json={"messages": HI, "max_tokens": value}))
        assert error["code"] == "context_length_exceeded" and "8192" in error["message"]


def test_n_huge(http):
    for n in (MAX_N + 1, 10**9):
        error = _error(http.post(CHAT, json={"messages": HI, "n": n, "max_tokens": 1}))
        assert error["param"] == "n" and str(MAX_N) in error["message"]
    _error(http.post(CHAT, json={"messages": HI, "n": 0}))


def test_prompt_over_the_context(http, zm):
    text = "hello " * 9000
    prompt_tokens = len(zm.chat_prompt([{"role": "user", "content": text}])[0])
    assert prompt_tokens > 8192
    error = _error(http.post(CHAT, json={"messages": [{"role": "user", "content": text}], "max_tokens": 4}))
    assert error["code"] == "context_length_exceeded"
    assert str(prompt_tokens) in error["message"] and "8192" in error["message"]
    error = _error(http.post(CHAT, json={"messages": [{"role": "user", "content": text}]}))  # no max_tokens
    assert str(prompt_tokens) in error["message"] and "8192" in error["message"]
    _error(http.post("/v1/completions", json={"prompt": text, "max_tokens": 4}))


def test_empty_messages_and_prompts(http):
    assert _error(http.post(CHAT, json={"messages": []}))["param"] == "messages"
    _error(http.post(CHAT, json={}))
    _error(http.post("/v1/completions", json={"prompt": []}))
    _error(http.post("/v1/completions", json={"prompt": [[]]}))


def test_invalid_utf8(http):
    error = _error(http.post(CHAT, content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                             headers={"content-type": "application/json"}))
    assert "UTF-8" in error["message"]
    # lone surrogates are valid JSON escapes but not text
    r = http.post(CHAT, content=b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
                  headers={"content-type": "application/json"})
    assert "not valid Unicode" in _error(r)["message"]


def test_huge_body_is_413(http):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024) + b'"}]}'
    error = _error(http.post(CHAT, content=big, headers={"content-type": "application/json"}), 413)
    assert "limit" in error["message"]

    def chunked():  # no Content-Length: counted while reading
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    _error(http.post(CHAT, content=chunked(), headers={"content-type": "application/json"}), 413)


def test_client_disconnect_frees_the_slot(http, url):
    cancelled = _metric(http, "zen_eco_requests_cancelled_total")
    body = {"messages": HI, "max_tokens": 4000, "stream": True, "logit_bias": NO_EOS, "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as other:
        with other.stream("POST", CHAT, json=body) as r:
            lines = r.iter_lines()
            got = [line for _, line in zip(range(10), lines) if line]
            assert len(got) >= 4
            assert _metric(http, "zen_eco_kv_slots_busy") == 1
    # the connection is closed: the generation stops and its slot goes back to the pool
    deadline = time.time() + 10
    while time.time() < deadline and (_metric(http, "zen_eco_kv_slots_busy") or _metric(http, "zen_eco_active_sequences")):
        time.sleep(0.05)
    assert _metric(http, "zen_eco_kv_slots_busy") == 0 and _metric(http, "zen_eco_active_sequences") == 0
    assert _metric(http, "zen_eco_requests_cancelled_total") == cancelled + 1
    generated = _metric(http, "zen_eco_generation_tokens_total")
    time.sleep(0.3)
    assert _metric(http, "zen_eco_generation_tokens_total") == generated  # nothing runs on
    # a client waiting for a whole (non-streamed) answer that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + CHAT, json=body | {"stream": False}, timeout=1.5)
    deadline = time.time() + 10
    while time.time() < deadline and _metric(http, "zen_eco_kv_slots_busy"):
        time.sleep(0.05)
    assert _metric(http, "zen_eco_kv_slots_busy") == 0
    assert _metric(http, "zen_eco_requests_cancelled_total") == cancelled + 2


def test_64_concurrent_streams(url, zm):
    # One question for all (prefill is then one token each, from the reused prefix): this is about
    # 64 open streams at once, and each must get the answer it would get alone.
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model="smollm2", messages=HI, max_tokens=3, temperature=0, stream=True)
        text, finish = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(main())
    alone = zm.chat(HI, max_tokens=3, temperature=0)
    assert results == [(alone.content, alone.finish_reason)] * 64


def test_queue_full_is_429_and_stopped_is_503(zm):
    config = ServerConfig("small", port=0, max_batch=1, max_queue=1)
    state = ServerState(zm, config)
    # The running stream must outlast the checks below even on a loaded machine: closing it (leaving
    # the `with`) cancels it, so a long max_tokens costs nothing.
    body = {"messages": HI, "max_tokens": 2000, "stream": True, "logit_bias": NO_EOS}
    with serve_in_thread(state) as base, httpx.Client(base_url=base, timeout=60) as http:
        with http.stream("POST", CHAT, json=body) as running:
            next(running.iter_lines())
            queued = threading.Thread(target=lambda: http.post(CHAT, json=body | {"stream": False, "max_tokens": 2}))
            queued.start()
            deadline = time.time() + 30
            # the stream's first line can come before its own request leaves the queue: wait until it
            # decodes and the second request is the one waiting
            while (state.scheduler.active, state.scheduler.queue_depth) != (1, 1) and time.time() < deadline:
                time.sleep(0.02)
            assert (state.scheduler.active, state.scheduler.queue_depth) == (1, 1)
            error = _error(http.post(CHAT, json=body | {"stream": False}), 429)
            assert error["code"] == "queue_full"
        queued.join(30)
        state.stop()  # the model is no longer served, the HTTP side still is
        error = _error(http.post(CHAT, json={"messages": HI, "max_tokens": 2}), 503)
        assert error["code"] == "server_shutting_down"
        assert http.get("/health").status_code == 503


def test_shutdown_during_generation_is_clean_and_fast(zm):
    from zen_eco.serve.app import make_server

    state = ServerState(zm, ServerConfig("doomed", port=0))
    server = make_server(state, log_level="critical")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    events: list[list[str]] = [[], [], []]

    def stream(out: list[str]):
        body = {"messages": HI, "max_tokens": 2000, "stream": True, "logit_bias": NO_EOS}
        with httpx.stream("POST", base + CHAT, json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    out.append(line)

    clients = [threading.Thread(target=stream, args=(out,)) for out in events]
    for c in clients:
        c.start()
    while min(len(e) for e in events) < 5:
        time.sleep(0.02)
    t0 = time.perf_counter()
    server.should_exit = True
    thread.join(10)
    took = time.perf_counter() - t0
    for c in clients:
        c.join(10)
    assert not thread.is_alive() and took < 3, took
    assert not state.scheduler.running and state.scheduler.active == 0
    for e in events:  # each stream was told why it ended, then closed properly
        assert e[-1] == "data: [DONE]" and "server_shutting_down" in e[-2]
