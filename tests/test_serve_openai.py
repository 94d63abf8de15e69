"""The OpenAI API of `zen-eco serve`, driven by the official `openai` client against a real uvicorn
server on loopback.

Reference: the Python API (`ZenModel.chat` / `.generate`, greedy), which test_engine checks; the
server must give the same text, token for token, through the scheduler. Thinking plumbing runs on
a random tiny Qwen3 with the real Qwen3 tokenizer: its text is noise, so tests steer it with
`logit_bias` (a +100 bias on `<think>` makes it open a thinking block at once) and check the split,
the budget's close-out and the counts, not the words.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

import zen_eco
from zen_eco.engine.thinking import BUDGET_CLOSE_TEXT
from zen_eco.serve.app import serve_in_thread
from zen_eco.serve.requests import OPENAI_SAMPLING_DEFAULTS, sampling_params, thinking_budget_for
from zen_eco.serve.state import ServerConfig, ServerState

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def url(zm):
    with serve_in_thread(ServerState(zm, ServerConfig("smollm2", port=0))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def greedy_hi(zm):
    return zm.chat(HI, max_tokens=12, temperature=0)


def test_chat_equals_the_python_api(client, zm, greedy_hi):
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_hi.content
    assert choice.finish_reason == greedy_hi.finish_reason
    assert getattr(choice.message, "reasoning_content", None) is None  # SmolLM2 has no thinking tokens
    assert r.model == "smollm2" and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    prompt_ids, _ = zm.chat_prompt(HI)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(greedy_hi.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_text_parts_system_and_assistant_turns(client, zm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=6, temperature=0)
    plain = [dict(m) for m in messages[:3]] + [{"role": "user", "content": "Name a colour."}]
    assert r.choices[0].message.content == zm.chat(plain, max_tokens=6, temperature=0).content


def test_streaming_chat_with_usage(client, greedy_hi):
    stream = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy_hi.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [greedy_hi.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(greedy_hi.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_plain_and_streamed(client, zm):
    expected = zm.generate("Once upon a time", max_tokens=8, temperature=0)
    r = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.choices[0].text == expected.text and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(zm.tokenizer.encode("Once upon a time"))
    assert r.usage.completion_tokens == 8
    parts = list(client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == expected.text
    assert parts[-1].choices[0].finish_reason == "length"
    echoed = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + expected.text
    ids = zm.tokenizer.encode("Once upon a time")
    assert client.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0).choices[0].text == expected.text


def test_n_choices(client):
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 12  # summed over the choices
    again = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    stream = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=6, temperature=1.0, seed=7, n=2,
                                            stream=True)
    text = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
    assert [text[0], text[1]] == [c.message.content for c in r.choices]
    prompts = client.completions.create(model="m", prompt=["Once upon a time", "1, 2, 3,"], n=2, max_tokens=4,
                                        temperature=0)
    texts = [c.text for c in sorted(prompts.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]  # greedy: equal per prompt


def test_seed_gives_identical_outputs(client):
    def sample(seed):
        return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell me a story"}],
                                              max_tokens=8, temperature=1.0, seed=seed).choices[0].message.content
    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2))


def test_stop_sequences(client, greedy_hi):
    text = greedy_hi.content  # "Hello! How can I assist you today?"
    stop = text.split()[2]
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=12, temperature=0, stop="!")
    assert r.choices[0].message.content == text[: text.index("!")]


def test_logprobs(client, zm, greedy_hi):
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = [t for t in greedy_hi.token_ids if t not in zm.tokenizer.eos_token_ids]
    assert len(content) == len(ids)
    assert "".join(t.token for t in content) == greedy_hi.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode() == t.token
    c = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(alts) == 2 for alts in lp.top_logprobs) and lp.text_offset[0] == 0


def test_unknown_fields_are_ignored(client, greedy_hi):
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=12, temperature=0, user="me",
                                       extra_body={"frobnicate": {"x": 1}, "store": True, "tools": []})
    assert r.choices[0].message.content == greedy_hi.content


def test_models_health_metrics(client, url):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "smollm2"
    text = httpx.get(url + "/metrics").text
    for name in ("zen_eco_requests_total", "zen_eco_generation_tokens_total", "zen_eco_queue_depth",
                 "zen_eco_active_sequences", "zen_eco_kv_slots_busy", "zen_eco_time_to_first_token_seconds_bucket",
                 "zen_eco_inter_token_latency_seconds_bucket"):
        assert name in text
    assert 'zen_eco_requests_total{route="/v1/chat/completions",status="200"}' in text


def test_api_key_and_cors(zm):
    config = ServerConfig("smollm2", port=0, api_key="s3cret", cors_origins=["http://app.example"])
    with serve_in_thread(ServerState(zm, config)) as base:
        ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="m", messages=HI, max_tokens=2).choices[0].finish_reason
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.body["code"] == "invalid_api_key"
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/health").status_code == 200  # health and metrics stay open
        pre = httpx.options(base + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"


def test_sampling_defaults():
    assert sampling_params(None, {}).temperature == OPENAI_SAMPLING_DEFAULTS["temperature"] == 1.0
    assert sampling_params(None, {"temperature": 0.2, "top_p": None}).temperature == 0.2
    thinking, plain = sampling_params(True, {}), sampling_params(False, {"top_k": 5})
    assert (thinking.temperature, thinking.top_p, thinking.top_k) == (0.6, 0.95, 20)
    assert (plain.temperature, plain.top_p, plain.top_k) == (0.7, 0.8, 5)
    assert thinking_budget_for("low", None) == 1024 and thinking_budget_for("high", 7) == 7
    assert thinking_budget_for("none", None) == 0 and thinking_budget_for(None, None) is None


def test_serve_cli_help():
    from typer.testing import CliRunner

    from zen_eco.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    for flag in ("--host", "--port", "--api-key", "--cors-origin", "--max-batch", "--max-queue", "--max-tokens",
                 "--ctx-size", "--dtype", "--quant", "--threads", "--kv-cache"):
        assert flag in out


def test_quantized_kv_cache_serves_batched_streams_like_the_python_api(smollm2_gguf_path):
    """Four concurrent requests decode in one batch, each on its own int8 cache (the batched step
    attends each row through its cache's own kernel): each answer equals ZenModel's with that cache."""
    zm8 = zen_eco.load(dtype="float32", device="cpu", kv_cache="int8")
    prompts = [[{"role": "user", "content": c}] for c in ("Hi", "Name a colour.", "What is 2+2?", "Say yes.")]
    want = [zm8.chat(p, max_tokens=10, temperature=0).content for p in prompts]

    async def ask_all(base):
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        rs = await asyncio.gather(*[client.chat.completions.create(model="m", messages=p, max_tokens=10, temperature=0)
                                    for p in prompts])
        return [r.choices[0].message.content for r in rs]

    with serve_in_thread(ServerState(zm8, ServerConfig("smollm2", port=0, max_batch=4))) as base:
        assert asyncio.run(ask_all(base)) == want
        assert httpx.get(base + "/health").status_code == 200


# ------------------------------------------------------------------ thinking (tiny random Qwen3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from zen_eco.init import init_checkpoint

    path = init_checkpoint("zen-eco-tiny", tmp_path_factory.mktemp("serve") / "tiny", dtype="float32")
    zm = zen_eco.load(str(path), dtype="float32", device="cpu")
    with serve_in_thread(ServerState(zm, ServerConfig("tiny", port=0))) as base:
        yield zm, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)


def _think_bias(zm) -> dict[str, int]:
    return {str(zm.tokenizer.token_to_id("<think>")): 100}


def test_thinking_off_gives_no_reasoning(tiny):
    zm, client = tiny
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"},
                  {"thinking_budget": 0}):
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0, extra_body=extra)
        message = r.choices[0].message
        assert getattr(message, "reasoning_content", None) is None and getattr(message, "reasoning", None) is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
        assert r.usage.prompt_tokens == len(zm.chat_prompt(HI, enable_thinking=False)[0])  # the empty think block


def test_thinking_budget_closes_the_block(tiny):
    zm, client = tiny
    close = zm.tokenizer.encode(BUDGET_CLOSE_TEXT, add_special_tokens=False)
    think_ids = 1 + 3 + close.index(zm.tokenizer.token_to_id("</think>")) + 1  # <think>, 3 budgeted, close-out
    body = dict(model="tiny", messages=HI, max_completion_tokens=40, temperature=0, logit_bias=_think_bias(zm),
                extra_body={"thinking_budget": 3})
    r = client.chat.completions.create(**body)
    message = r.choices[0].message
    assert message.reasoning_content == message.reasoning
    assert message.reasoning_content == "<think>" * 3 + BUDGET_CLOSE_TEXT.split("</think>")[0].rstrip()
    assert message.content.startswith("<think>")  # the bias goes on after the block: answer text
    assert r.usage.completion_tokens == 40  # max_completion_tokens counts reasoning and answer
    assert r.usage.completion_tokens_details.reasoning_tokens == think_ids
    # streamed: the same split, delta by delta, and the same usage
    reasoning, content, usage = "", "", None
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
        usage = chunk.usage or usage
    assert (reasoning, content) == (message.reasoning_content, message.content)
    assert usage.completion_tokens_details.reasoning_tokens == think_ids


def test_max_completion_tokens_cuts_inside_thinking(tiny):
    zm, client = tiny
    r = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=10, temperature=0,
                                       logit_bias=_think_bias(zm), reasoning_effort="low")
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == r.usage.completion_tokens_details.reasoning_tokens == 10
    assert r.choices[0].message.reasoning_content == "<think>" * 9


def test_thinking_with_async_client_and_soft_switch(tiny):
    zm, client = tiny

    async def main():
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="x", max_retries=0)
        ask = [{"role": "user", "content": "Hi /no_think"}]
        r = await aclient.chat.completions.create(model="tiny", messages=ask, max_tokens=4, temperature=0)
        await aclient.close()
        return r

    r = asyncio.run(main())
    assert r.usage.prompt_tokens == len(zm.chat_prompt([{"role": "user", "content": "Hi /no_think"}])[0])
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
