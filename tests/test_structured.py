"""Structured output (`serve/structured.py`): JSON mode and JSON schemas by llguidance token masks.

The model is the bundled SmolLM2-135M-Instruct sampled at temperature 1 with no truncation, hot
enough that unconstrained answers are not JSON (checked); constrained, every answer must parse and
validate with `jsonschema`. The thinking-block handling runs on the real Qwen3 tokenizer (state
machine only, no model).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

import zen_eco
from zen_eco.engine.sampling import SamplingParams
from zen_eco.engine.scheduler import Request, Scheduler
from zen_eco.errors import ZenError
from zen_eco.serve.app import serve_in_thread
from zen_eco.serve.state import ServerConfig, ServerState
from zen_eco.serve.structured import JsonConstraint, constraint_for, schema_for

HOT = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # sample from the whole distribution
# JSON mode leaves the contents free: drawn from the whole distribution a string can run on for
# hundreds of tokens, so JSON-mode requests keep temperature 1 but draw from the 20 likeliest tokens.
WARM = dict(temperature=1.0, top_k=20, top_p=1.0, min_p=0.0)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ENUMS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
        "in_stock": {"type": "boolean"},
    },
    "required": ["color", "size", "in_stock"],
    "additionalProperties": False,
}
ARRAYS = {
    "type": "object",
    "properties": {
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "minItems": 2, "maxItems": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["scores", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "location": {
            "type": "object",
            "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                           "lon": {"type": "integer", "minimum": -180, "maximum": 180}},
            "required": ["lat", "lon"],
            "additionalProperties": False,
        },
        "landmarks": {"type": "array", "maxItems": 1, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10}, "year": {"type": "integer", "maximum": 2100}},
            "required": ["name"],
            "additionalProperties": False,
        }},
    },
    "required": ["city", "location", "landmarks"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "enums": ENUMS, "arrays": ARRAYS, "nested": NESTED}
ASK = [{"role": "user", "content": "Describe a person, a product and a city in JSON."}]


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def scheduler(zm):
    s = Scheduler(zm.model, zm.tokenizer, zm.context, max_batch=10).start()
    yield s
    s.stop()


def run_all(scheduler, requests: list[Request]) -> list[tuple[str, str, list[int]]]:
    """Submit all (they share decode steps), then collect each one's (text, finish_reason, token ids)."""
    handles = [scheduler.submit(r) for r in requests]
    out = []
    for h in handles:
        chunks = list(h)
        out.append(("".join(c.text for c in chunks), chunks[-1].finish_reason, [c.token for c in chunks]))
    return out


def test_schemas_hold_at_temperature_one_in_a_batch(zm, scheduler):
    """Every schema (required fields, enums, arrays, nesting) and JSON mode, decoded together in one
    batch with two unconstrained controls: the constrained answers parse and validate, and the hot
    sampling is hot enough that the unconstrained ones are not JSON. The enum schema's factory makes
    two requests (as `n` = 2 would): each must get a fresh matcher."""
    ids = zm.chat_prompt(ASK)[0]
    formats = [json_schema_format(k, v) for k, v in SCHEMAS.items()]
    makers = [constraint_for(zm.tokenizer, f) for f in formats]
    formats.append(formats[1])
    makers.append(makers[1])
    requests = [Request(ids, SamplingParams(**HOT, seed=i), 200, constraint=make) for i, make in enumerate(makers)]
    # JSON mode leaves the object's contents free: asked for a small one, at least one of three must
    # finish within 80 tokens, and every one must be valid JSON as far as it got
    json_mode = constraint_for(zm.tokenizer, {"type": "json_object"})
    ok_ids = zm.chat_prompt([{"role": "user", "content": 'Reply with a JSON object that has one key, "ok", set to true.'}])[0]
    requests += [Request(ok_ids, SamplingParams(**WARM, seed=i), 80, constraint=json_mode) for i in range(3)]
    requests += [Request(ids, SamplingParams(**HOT, seed=100 + i), 30) for i in range(2)]
    results = run_all(scheduler, requests)
    for (text, finish, _), fmt in zip(results, formats):
        assert finish == "stop", (fmt, text)  # the grammar completed and then only EOS was allowed
        jsonschema.validate(json.loads(text), fmt["json_schema"]["schema"])
    finished = 0
    for text, finish, out_ids in results[len(formats):len(formats) + 3]:
        check = json_mode()
        for t in out_ids:
            check.accept(t)
        assert check.error is None, text
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished >= 1
    for text, _, _ in results[-2:]:
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.parametrize("fmt, message", [
    (json_schema_format("x", {"type": "objectx"}), "Invalid type"),
    (json_schema_format("x", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}), "nope"),
    (json_schema_format("x", {"type": "object", "required": "a"}), "required"),
    (json_schema_format("x", {"type": "string", "pattern": "(("}), "regex"),
    (json_schema_format("x", {"type": "string", "not": {"maxLength": 2}}), "not"),
    (json_schema_format("x", {"enum": []}), "nsatisfiable"),
    ({"type": "json_schema"}, "needs a json_schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "string"}}, "must be an object"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name must be a string"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict must be a boolean"),
    ({"type": "xml"}, "valid types: text, json_object, json_schema"),
    ("yaml", 'must be "json" or a JSON schema'),
    (["json"], "must be an object"),
])
def test_bad_formats_are_rejected_with_a_clear_message(zm, fmt, message):
    with pytest.raises(ZenError, match="schema|format|type") as info:
        constraint_for(zm.tokenizer, fmt)
    assert message in str(info.value)


def test_format_spellings():
    assert schema_for(None) is None and schema_for("") is None and schema_for({"type": "text"}) is None
    assert schema_for("json") == {"type": "object"} == schema_for({"type": "json_object"})
    assert schema_for({"type": "json_schema", "json_schema": {"name": "n"}}) == {}  # no schema: any JSON
    ollama = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert schema_for(ollama) is ollama  # Ollama passes the schema itself
    assert schema_for({"properties": {}}) == {"properties": {}}


def test_mask_allows_only_eos_once_complete(zm):
    tok = zm.tokenizer
    c = constraint_for(tok, {"type": "json_object"})()
    logits = torch.zeros(zm.config.vocab_size)
    first = torch.isfinite(c.mask(logits)).nonzero().flatten().tolist()
    assert first and all(tok.decode([t]).startswith("{") for t in first)
    for t in tok.encode('{"a": [1, 2]}', add_special_tokens=False):
        c.accept(t)
    assert c.done and c.error is None
    assert torch.isfinite(c.mask(logits)).nonzero().flatten().tolist() == sorted(tok.eos_token_ids)


# ------------------------------------------------------------------ thinking models (Qwen3 tokenizer)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from zen_eco.init import init_checkpoint

    return init_checkpoint("zen-eco-tiny", tmp_path_factory.mktemp("structured") / "tiny", dtype="float32")


@pytest.fixture(scope="module")
def qwen_tok(tiny_dir):
    from zen_eco.checkpoint import open_checkpoint

    return open_checkpoint(tiny_dir).tokenizer()


def _allowed(c: JsonConstraint, vocab: int) -> set[int]:
    return set(torch.isfinite(c.mask(torch.zeros(vocab))).nonzero().flatten().tolist())


def test_thinking_block_is_left_free_then_json(qwen_tok):
    tok, vocab = qwen_tok, 151936
    think, close = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    c = constraint_for(tok, {"type": "json_object"}, thinking=True)()
    first = _allowed(c, vocab)
    assert think in first and any(tok.decode([t]).startswith("{") for t in first) and close not in first
    for t in [think] + tok.encode("Let me think about [this]", add_special_tokens=False):
        c.accept(t)
    assert _allowed(c, vocab) == set(range(vocab)) - set(tok.eos_token_ids)  # inside <think>: all but the end
    for t in [close] + tok.encode("\n\n", add_special_tokens=False):
        c.accept(t)  # the whitespace after </think> passes
    assert not any(tok.decode([t]).strip().startswith("[") for t in _allowed(c, vocab))  # JSON object only
    for t in tok.encode('{"ok": true}', add_special_tokens=False):
        c.accept(t)
    assert c.done and c.error is None and _allowed(c, vocab) == set(tok.eos_token_ids)


def test_thinking_off_and_prompt_opened_blocks(qwen_tok):
    tok, vocab = qwen_tok, 151936
    think = tok.token_to_id("<think>")
    off = constraint_for(tok, {"type": "json_object"})()  # thinking=False: JSON from the first token
    assert think not in _allowed(off, vocab)
    prompt = tok.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    opened = constraint_for(tok, {"type": "json_object"}, prompt_ids=prompt)()  # the prompt opened <think>
    assert tok.token_to_id("</think>") in _allowed(opened, vocab) and think in _allowed(opened, vocab)


# ------------------------------------------------------------------ through the server (openai client)


@pytest.fixture(scope="module")
def client(zm):
    with serve_in_thread(ServerState(zm, ServerConfig("smollm2", port=0))) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_json_schema_and_json_mode(client):
    r = client.chat.completions.create(model="smollm2", messages=ASK, temperature=1.0, top_p=1.0, seed=3,
                                       max_tokens=200, response_format=json_schema_format("person", PERSON))
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    stream = client.chat.completions.create(model="smollm2", messages=ASK, temperature=1.0, top_p=1.0, seed=4,
                                            max_tokens=200, stream=True,
                                            response_format=json_schema_format("enums", ENUMS))
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), ENUMS)


def test_ollama_format_on_the_gguf(client):
    import httpx

    base = str(client.base_url).removesuffix("/v1/")
    r = httpx.post(base + "/api/chat", timeout=120, json={
        "model": "smollm2", "messages": ASK, "format": ENUMS, "stream": False,
        "options": {**HOT, "seed": 11, "num_predict": 120}}).json()
    assert r["done_reason"] == "stop", r
    jsonschema.validate(json.loads(r["message"]["content"]), ENUMS)
    details = httpx.get(base + "/api/tags").json()["models"][0]["details"]
    assert details == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                       "parameter_size": "135M", "quantization_level": "Q4_1"}


def test_openai_client_bad_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=10,
                                       response_format=json_schema_format("bad", {"type": "objectx"}))
    ok = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=5)  # still serving
    assert ok.choices[0].message.content


def test_openai_client_thinking_then_json(tiny_dir):
    """A thinking model (random tiny Qwen3 whose template opens <think>): the reasoning stays free and
    comes back as reasoning_content; the content is the JSON, valid."""
    from zen_eco.tokenizer.qwen import QWEN3_CHAT_TEMPLATE

    tail = "{%- if enable_thinking is defined and enable_thinking is false -%}"
    (tiny_dir / "chat_template.jinja").write_text(QWEN3_CHAT_TEMPLATE.replace(
        tail, "{%- if enable_thinking is not defined or enable_thinking -%}{{- '<think>' ~ NL -}}{%- endif -%}" + tail))
    zm = zen_eco.load(str(tiny_dir), dtype="float32", device="cpu")
    with serve_in_thread(ServerState(zm, ServerConfig("tiny", port=0))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=2, max_tokens=150,
                                           response_format=json_schema_format("enums", ENUMS),
                                           extra_body={"thinking_budget": 3})
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and message.reasoning_content
    jsonschema.validate(json.loads(message.content), ENUMS)
