"""The engine on the bundled SmolLM2-135M-Instruct (fp32, so logits compare tightly)."""

from __future__ import annotations

import pytest
import torch

import zen_eco
from zen_eco.api import ZenModel
from zen_eco.errors import ContextLengthError, ZenError

STORY = "Once upon a time"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def fresh(zm: ZenModel, context: int | None = None) -> ZenModel:
    """The same weights with an empty KV cache (no prefix left over from another test)."""
    return ZenModel(zm.model, zm.tokenizer, zm.path, context)


@pytest.fixture(scope="module")
def story(zm):
    """Greedy continuation of STORY: (result, text piece of every token)."""
    r = fresh(zm).generate(STORY, max_tokens=40, temperature=0)
    pieces = [zm.tokenizer.decode(r.token_ids[: i + 1]) for i in range(len(r.token_ids))]
    pieces = [b[len(a):] for a, b in zip([""] + pieces, pieces)]
    assert "".join(pieces) == r.text
    return r, pieces


# --------------------------------------------------------------------------- streaming / finish


def test_stream_and_non_stream_give_the_same_result_for_a_seed(zm):
    kw = dict(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    whole = fresh(zm).generate(STORY, **kw)
    chunks = list(fresh(zm).generate(STORY, stream=True, **kw))
    assert [c.token for c in chunks] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert [c.generation_tokens for c in chunks] == list(range(1, len(chunks) + 1))
    # and another seed samples something else
    other = fresh(zm).generate(STORY, **(kw | {"seed": 4321}))
    assert other.token_ids != whole.token_ids


def test_greedy_chat_stops_at_end_of_turn_with_stop(zm):
    r = fresh(zm).chat(CAPITAL, max_tokens=40, temperature=0)
    assert r.finish_reason == "stop"
    assert r.token_ids[-1] in zm.tokenizer.eos_token_ids
    assert r.generation_tokens == len(r.token_ids) < 40
    assert "Paris" in r.text
    assert "<|im_end|>" not in r.text and "<|" not in r.text


def test_greedy_stops_at_max_tokens_with_length(zm, story):
    r = fresh(zm).generate(STORY, max_tokens=7, temperature=0)
    assert r.finish_reason == "length"
    assert r.generation_tokens == len(r.token_ids) == 7
    assert r.token_ids == story[0].token_ids[:7]  # greedy: a prefix of the longer run


def test_greedy_tokens_and_logprobs_match_the_full_forward(zm):
    ids = zm.tokenizer.encode(STORY)
    chunks = list(fresh(zm).generate(ids, max_tokens=10, temperature=0, stream=True))
    out = [c.token for c in chunks]
    logits = zm.logits(ids + out[:-1])[len(ids) - 1 :]
    assert out == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([c.logprob for c in chunks]), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bad", [0, -3])
def test_max_tokens_below_one_is_refused(zm, bad):
    with pytest.raises(ZenError, match="max_tokens"):
        fresh(zm).generate(STORY, max_tokens=bad, temperature=0)


def test_empty_prompt_is_refused(zm):
    with pytest.raises(ZenError, match="empty"):
        fresh(zm).generate([], max_tokens=4)


# --------------------------------------------------------------------------- stop strings


def _run_with_stop(zm, stop):
    chunks = list(fresh(zm).generate(STORY, max_tokens=40, temperature=0, stop=stop, stream=True))
    return chunks, "".join(c.text for c in chunks)


def test_stop_string_whole_token(zm, story):
    r, pieces = story
    word = pieces[4]  # a whole token of the greedy output, e.g. " Nova"
    assert len(word.strip()) >= 3
    idx = r.text.find(word)
    chunks, text = _run_with_stop(zm, word)
    assert text == r.text[:idx]
    assert word not in text
    assert chunks[-1].finish_reason == "stop"
    assert len(chunks) < len(r.token_ids)


def test_stop_string_split_across_tokens_emits_nothing_of_it(zm, story):
    r, pieces = story
    # a stop string made of the end of one token and the start of the next, e.g. "va Ha"
    for k in range(3, len(pieces) - 1):
        a, b = pieces[k], pieces[k + 1]
        stop = a[-2:] + b[:2]
        start = len("".join(pieces[: k + 1])) - 2
        if len(a) >= 3 and len(b) >= 3 and r.text.find(stop) == start:
            break
    else:
        pytest.fail(f"no usable token boundary in {pieces}")
    chunks, text = _run_with_stop(zm, [stop])
    assert text == r.text[:start]  # the first half of the stop string (in token k) was held back
    assert stop not in text
    assert chunks[-1].finish_reason == "stop"
    assert len(chunks) == k + 2  # stopped at the token that completed the stop string
    assert all(c.text == "" or not c.text.endswith(a[-2:]) for c in chunks[-2:])


def test_earliest_of_several_stop_strings_wins(zm, story):
    r, pieces = story
    early, late = pieces[3], pieces[8]
    assert r.text.find(early) < r.text.find(late)
    _, text = _run_with_stop(zm, [late, "never-there-xyz", early])
    assert text == r.text[: r.text.find(early)]


def test_stop_string_that_never_occurs_changes_nothing(zm, story):
    r, _ = story
    chunks, text = _run_with_stop(zm, ["zzqx-not-in-output", ""])
    assert text == r.text
    assert chunks[-1].finish_reason == "length"


# --------------------------------------------------------------------------- context


def test_context_length_error_names_the_token_counts(zm):
    small = fresh(zm, context=64)
    ids = zm.tokenizer.encode(STORY)
    n = len(ids)
    with pytest.raises(ContextLengthError) as info:
        small.generate(ids, max_tokens=65 - n)
    msg = str(info.value)
    assert str(n) in msg and str(65 - n) in msg and "65" in msg and "64" in msg
    # exactly filling the context is fine
    r = small.generate(ids, max_tokens=64 - n, temperature=0)
    assert r.finish_reason == "length" and r.generation_tokens == 64 - n


def test_load_with_context_limits_generation(smollm2_gguf_path):
    small = zen_eco.load(smollm2_gguf_path, dtype="float32", context=64)
    assert small.context == 64
    with pytest.raises(ContextLengthError, match="64"):
        small.chat(CAPITAL, max_tokens=40)


# --------------------------------------------------------------------------- prefix reuse


def test_second_chat_turn_reuses_the_prefix_and_matches_a_fresh_model(zm):
    model = fresh(zm)
    first = list(model.chat(CAPITAL, max_tokens=30, temperature=0, stream=True))
    assert all(c.reused_prompt_tokens == 0 for c in first)
    history = CAPITAL + [
        {"role": "assistant", "content": "".join(c.text for c in first)},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = list(model.chat(history, max_tokens=30, temperature=0, stream=True))
    first_prompt = len(zm.tokenizer.encode_chat(CAPITAL))
    assert all(c.reused_prompt_tokens >= first_prompt for c in second)
    assert second[0].reused_prompt_tokens < second[0].prompt_tokens
    baseline = fresh(zm).chat(history, max_tokens=30, temperature=0)
    assert [c.token for c in second] == baseline.token_ids
    assert "Rome" in baseline.text


def test_interleaved_streams_on_one_model_do_not_corrupt_each_other(zm, story):
    model = fresh(zm)
    stream = model.generate(STORY, max_tokens=12, temperature=0, stream=True)
    head = [next(stream) for _ in range(4)]
    other = model.generate("The weather today is", max_tokens=12, temperature=0)  # uses the same cache
    tail = list(stream)
    assert [c.token for c in head + tail] == story[0].token_ids[:12]
    assert other.token_ids == fresh(zm).generate("The weather today is", max_tokens=12, temperature=0).token_ids


# --------------------------------------------------------------------------- logits


def test_logits_equal_full_forward_and_cached_decoding(zm):
    ids = zm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2)
    got = zm.logits(ids)
    assert got.shape == (len(ids), zm.config.vocab_size) and got.dtype == torch.float32
    with torch.inference_mode():
        full = zm.model(torch.tensor([ids]))[0]
        cache = zm.model.new_cache(max_tokens=len(ids))
        steps = torch.stack([zm.model(torch.tensor([[t]]), cache)[0, -1] for t in ids])
    # fp32: the same math in a different order (one pass vs one token at a time) -> rounding only
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps, full, atol=2e-3, rtol=1e-3)
    assert torch.equal(steps.argmax(-1), full.argmax(-1))


def test_logits_across_the_prefill_chunk_boundary(zm):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40000, (600,), generator=gen).tolist()  # > 512: two chunks
    got = zm.logits(ids)
    with torch.inference_mode():
        full = zm.model(torch.tensor([ids]))[0]
    torch.testing.assert_close(got, full, atol=1e-3, rtol=1e-3)


def test_logits_rejects_bad_ids(zm):
    with pytest.raises(ZenError):
        zm.logits([])
    with pytest.raises(ZenError, match="token ids"):
        zm.logits([1, zm.config.vocab_size])


# --------------------------------------------------------------------------- UTF-8


def test_streamed_emoji_never_contains_replacement_char(zm):
    msgs = [{"role": "user", "content": "Reply with only emoji about the sea, like 🌊🐳🐚."}]
    chunks = list(fresh(zm).chat(msgs, max_tokens=24, temperature=0, stream=True))
    text = "".join(c.text for c in chunks)
    assert any(ord(ch) > 0x1F000 for ch in text), text
    assert all("\ufffd" not in c.text for c in chunks)


def test_emoji_cut_by_the_token_limit_is_not_emitted_as_replacement_char(zm):
    prompt = "Emoji list: 🌊 🐳 🐚 🐙 🦀 🐠 "
    full = fresh(zm).generate(prompt, max_tokens=30, temperature=0)
    cuts = [n for n in range(1, 31) if zm.tokenizer.decode(full.token_ids[:n]).endswith("\ufffd")]
    assert cuts, "the greedy output has no multi-token character"
    n = cuts[0]
    chunks = list(fresh(zm).generate(prompt, max_tokens=n, temperature=0, stream=True))
    text = "".join(c.text for c in chunks)
    assert "\ufffd" not in text
    assert text == zm.tokenizer.decode(full.token_ids[:n]).rstrip("\ufffd")
    assert chunks[-1].finish_reason == "length"


def test_padded_vocabulary_rows_are_never_chosen():
    """A model whose table has more rows than its tokenizer has tokens (Qwen3: 151,936 for 151,669):
    ids without a token are masked, even where the weights favour them (here the padded rows are
    20x copies of the first 12, so they would win greedy decoding)."""
    import torch

    from zen_eco.engine.generate import Sequence
    from zen_eco.engine.sampling import SamplingParams
    from zen_eco.init import random_model

    model = random_model("llama-tiny")
    with torch.no_grad():
        model.lm_head.weight[500:] = 20 * model.lm_head.weight[:12]
    greedy = SamplingParams(temperature=0)

    def run(token_count):
        seq = Sequence(model, [1, 2, 3], greedy, max_new_tokens=8, token_count=token_count, top_logprobs=3)
        out = [seq.step()[0] for _ in range(8)]
        return out, seq.last_top_logprobs

    unmasked, _ = run(None)
    assert max(unmasked) >= 500  # the padded rows do win without the mask
    masked, top = run(500)
    assert max(masked) < 500 and all(i < 500 for i, _ in top)


def test_freeze_heap_puts_the_loaded_model_out_of_the_collectors_reach(zm):
    """What the CLI and the server do after loading: every object then alive (the tokenizer's tables, the
    modules) goes to the permanent generation, so full collections stop walking them; generation still
    works and its own garbage is still collected."""
    import gc

    from zen_eco.api import freeze_heap

    freeze_heap()
    try:
        assert gc.get_freeze_count() > 50_000  # SmolLM2's vocabulary alone is 49K strings
        before = fresh(zm).generate(STORY, max_tokens=4, temperature=0)
        cycle = []
        cycle.append(cycle)  # garbage made after the freeze is still found
        del cycle
        assert gc.collect() >= 1
        assert fresh(zm).generate(STORY, max_tokens=4, temperature=0).token_ids == before.token_ids
    finally:
        gc.unfreeze()
