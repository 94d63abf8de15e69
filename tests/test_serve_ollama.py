"""Ollama's API of `zen-eco serve`, driven with plain httpx (as Ollama clients do) against a real
uvicorn server on loopback.

The model is the random tiny Qwen3 (`zen-eco-tiny`, the real Qwen3 tokenizer) with a chat template
that opens `<think>` in the prompt when thinking is on (as Qwen3-Thinking-2507 and DeepSeek-R1 do),
so even random weights start inside the thinking block; `thinking_budget` then forces the block
closed. Its text is noise: the tests check structure, counts and timings, not words.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from conftest import opens_thinking_tiny

from zen_eco.engine.thinking import BUDGET_CLOSE_TEXT
from zen_eco.errors import ZenError
from zen_eco.serve.app import serve_in_thread
from zen_eco.serve.ollama_api import GenerateRequest, _thinking_switch
from zen_eco.serve.state import ServerConfig, ServerState
from zen_eco.serve.structured import constraint_for

HI = [{"role": "user", "content": "Hi"}]
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return opens_thinking_tiny(tmp_path_factory.mktemp("ollama") / "tiny")


@pytest.fixture(scope="module")
def url(tiny):
    with serve_in_thread(ServerState(tiny, ServerConfig("tiny", port=0))) as base:
        yield base


def ndjson(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def check_final(final: dict, model: str = "tiny") -> None:
    assert final["done"] is True and final["model"] == model
    assert final["done_reason"] in ("stop", "length")
    assert final["created_at"].endswith("Z")
    for key in DURATIONS + ("prompt_eval_count", "eval_count"):
        assert isinstance(final[key], int) and final[key] >= 0, key
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"] > 0


# ------------------------------------------------------------------ /api/chat


def test_chat_streams_thinking_then_content(http, tiny):
    body = {"model": "tiny", "messages": HI, "think": True, "thinking_budget": 4,
            "options": {"num_predict": 40, "seed": 1, "temperature": 0.7}}
    lines = ndjson(http.post("/api/chat", json=body))  # stream is on by default
    *parts, final = lines
    assert parts and all(p["done"] is False and p["message"]["role"] == "assistant" for p in parts)
    thinking = "".join(p["message"].get("thinking", "") for p in parts)
    content = "".join(p["message"]["content"] for p in parts)
    # four free thinking tokens, then the budget's close-out, then the answer
    assert thinking.endswith(BUDGET_CLOSE_TEXT.strip().removesuffix("</think>").strip())
    assert "</think>" not in thinking + content and "<think>" not in content
    check_final(final)
    assert final["message"] == {"role": "assistant", "content": ""}
    ids, _ = tiny.chat_prompt(HI, enable_thinking=True)
    assert final["prompt_eval_count"] == len(ids)
    if final["done_reason"] == "length":
        assert final["eval_count"] == 40
    # not streamed: one object with the whole message, the same for the same seed
    whole = http.post("/api/chat", json={**body, "stream": False}).json()
    check_final(whole)
    assert whole["message"] == {"role": "assistant", "content": content, "thinking": thinking}


def test_chat_think_false_and_default(http):
    off = http.post("/api/chat", json={"model": "tiny", "messages": HI, "think": False, "stream": False,
                                       "options": {"num_predict": 8}}).json()
    check_final(off)
    assert "thinking" not in off["message"] and off["message"]["content"]
    assert off["eval_count"] == 8 or off["done_reason"] == "stop"
    default = http.post("/api/chat", json={"model": "tiny", "messages": HI, "stream": False,
                                           "options": {"num_predict": 6}}).json()
    assert default["message"]["thinking"]  # a thinking model thinks unless told not to


def test_chat_history_with_system_and_assistant_turns(http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "thinking": "greet back"},
                {"role": "user", "content": "And now? /no_think"}]
    r = http.post("/api/chat", json={"model": "anything:latest", "messages": messages, "stream": False,
                                     "options": {"num_predict": 5, "stop": ["\n"]}}).json()
    check_final(r, model="anything:latest")  # any name works; the answer echoes it
    assert "thinking" not in r["message"]  # the /no_think soft switch


def test_client_disconnect_frees_the_slot(http, url):
    with http.stream("POST", "/api/chat", json={"model": "tiny", "messages": HI, "options": {"num_predict": 3000}}) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health").json()
        if health["active"] == 0 and health["queue_depth"] == 0:
            break
        time.sleep(0.1)
    assert health["active"] == 0
    assert "zen_eco_requests_cancelled_total 1.0" in httpx.get(url + "/metrics").text


# ------------------------------------------------------------------ /api/generate


def test_generate_context_and_seed(http, tiny):
    body = {"model": "tiny", "prompt": "Why is the sky blue?", "think": False, "stream": False,
            "options": {"num_predict": 6, "seed": 42, "temperature": 1.0}}
    a = http.post("/api/generate", json=body).json()
    check_final(a)
    assert a["response"] and "thinking" not in a
    assert len(a["context"]) == a["prompt_eval_count"] + a["eval_count"]
    assert http.post("/api/generate", json=body).json()["response"] == a["response"]  # the seed repeats it
    # sending the context back continues the conversation: the old tokens come first
    b = http.post("/api/generate", json={**body, "prompt": "Say more.", "context": a["context"]}).json()
    assert b["context"][: len(a["context"])] == a["context"]
    assert b["prompt_eval_count"] > a["prompt_eval_count"]


def test_generate_streams_and_raw(http, tiny):
    lines = ndjson(http.post("/api/generate", json={"model": "tiny", "prompt": "Hello", "raw": True,
                                                    "options": {"num_predict": 5}}))
    *parts, final = lines
    check_final(final)
    assert all("response" in p and not p["done"] for p in parts)
    assert final["prompt_eval_count"] == len(tiny.tokenizer.encode("Hello"))  # no template around it
    assert final["context"][: final["prompt_eval_count"]] == tiny.tokenizer.encode("Hello")


def test_num_predict_beyond_the_context_stops_at_its_end(http, tiny):
    ids, _ = tiny.chat_prompt([{"role": "user", "content": "word " * 4070}], enable_thinking=False)
    room = tiny.context - len(ids)
    assert 0 < room < 40
    r = http.post("/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "word " * 4070}],
                                     "think": False, "stream": False, "options": {"num_predict": 10**6}}).json()
    assert r["eval_count"] <= room and r["prompt_eval_count"] == len(ids)


def test_nothing_to_do_answers_load_and_num_predict_zero(http):
    for route, body in (("/api/generate", {"model": "tiny"}), ("/api/chat", {"model": "tiny", "messages": []})):
        r = http.post(route, json={**body, "stream": False}).json()
        assert r["done"] is True and r["done_reason"] == "load"
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "x", "stream": False,
                                         "options": {"num_predict": 0}}).json()
    assert r["done"] is True and r["eval_count"] == 0 and r["response"] == ""


# ------------------------------------------------------------------ format (structured output)


SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "kind": {"enum": ["a", "b"]}},
         "required": ["ok", "n", "kind"], "additionalProperties": False}


def test_format_schema_validates_even_on_random_weights(http):
    for think in (False, True):  # thinking on: the block is free, then the JSON (budget closes it)
        r = http.post("/api/chat", json={"model": "tiny", "messages": HI, "format": SMALL, "stream": False,
                                         "think": think, "thinking_budget": 3,
                                         "options": {"num_predict": 200, "temperature": 1.0, "seed": 5}}).json()
        assert r["done_reason"] == "stop", r
        jsonschema.validate(json.loads(r["message"]["content"]), SMALL)
        assert bool(r["message"].get("thinking")) is think


def test_format_json_keeps_output_json(http, tiny):
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "List three colors.", "format": "json",
                                         "think": False, "stream": False,
                                         "options": {"num_predict": 24, "temperature": 1.0, "seed": 3}}).json()
    out = r["context"][r["prompt_eval_count"]:]
    check = constraint_for(tiny.tokenizer, "json")()  # every token the server sent fits JSON-object grammar
    for t in out:
        check.accept(t)
    assert check.error is None and r["response"].startswith("{")
    if r["done_reason"] == "stop":
        assert isinstance(json.loads(r["response"]), dict)


# ------------------------------------------------------------------ model routes


def test_tags_show_ps_version(http, tiny):
    tags = http.get("/api/tags").json()["models"]
    assert [m["name"] for m in tags] == ["tiny"]
    d = tags[0]["details"]
    assert d["format"] == "safetensors" and d["family"] == "qwen3" and d["quantization_level"] == "F32"
    assert tags[0]["size"] > 0 and len(tags[0]["digest"]) == 64
    show = http.post("/api/show", json={"model": "tiny"}).json()
    assert "thinking" in show["capabilities"] and "<think>" in show["template"]
    assert show["model_info"]["qwen3.context_length"] == tiny.context
    assert http.post("/api/show", json={"name": "tiny"}).status_code == 200  # the older spelling
    ps = http.get("/api/ps").json()["models"]
    assert ps[0]["name"] == "tiny" and ps[0]["context_length"] == tiny.context
    assert http.get("/api/version").json()["version"]


# ------------------------------------------------------------------ bad input: Ollama's error shape


@pytest.mark.parametrize("route, body, status, needle", [
    ("/api/chat", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("/api/chat", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/api/chat", {"messages": HI}, 400, "model"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"top_p": 3}}, 400, "top_p"),
    ("/api/chat", {"model": "tiny", "messages": HI, "stream": "yes"}, 400, "stream"),
    ("/api/chat", {"model": "tiny", "messages": HI, "format": {"type": "objectx"}}, 400, "schema"),
    ("/api/chat", {"model": "tiny", "messages": HI, "format": "yaml"}, 400, "format"),
    ("/api/chat", {"model": "tiny", "messages": HI, "think": "maybe"}, 400, "think"),
    ("/api/chat", {"model": "tiny", "messages": HI, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "images"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 5000}]}, 400,
     "leaves no room to generate in the context of 4096 tokens"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": [-1]}, 400, "vocabulary"),
    ("/api/show", {}, 400, "model is required"),
    ("/api/pull", {"model": "llama3"}, 404, "does not serve /api/pull"),
])
def test_bad_requests_get_ollama_errors(http, route, body, status, needle):
    r = http.post(route, content=body) if isinstance(body, bytes) else http.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and needle in error
    ok = http.post("/api/chat", json={"model": "tiny", "messages": HI, "stream": False, "think": False,
                                      "options": {"num_predict": 2}})
    assert ok.status_code == 200 and ok.json()["done"]  # and the server goes on serving


def test_think_on_a_model_without_thinking_is_refused():
    state = SimpleNamespace(zm=SimpleNamespace(supports_thinking=False))
    body = GenerateRequest(model="smol", prompt="x", think=True)
    with pytest.raises(ZenError, match='"smol" does not support thinking'):
        _thinking_switch(state, body)
    assert _thinking_switch(state, GenerateRequest(model="smol", prompt="x", think=False)) == (False, None)
    thinking = SimpleNamespace(zm=SimpleNamespace(supports_thinking=True))
    assert _thinking_switch(thinking, GenerateRequest(model="m", think="low")) == (True, 1024)
    assert _thinking_switch(thinking, GenerateRequest(model="m", think="high", thinking_budget=7)) == (True, 7)
