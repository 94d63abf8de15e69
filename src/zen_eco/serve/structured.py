"""Structured output: constrain sampling so the answer is JSON that matches a schema.

`constraint_for(tokenizer, response_format)` turns a request's format into a factory of
`engine.generate.Constraint`s (one fresh matcher per request, built when the scheduler starts it):

- OpenAI `response_format`: `{"type": "text"}` (no constraint: returns None),
  `{"type": "json_object"}` (any JSON object) or
  `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
- Ollama `format`: `"json"` (any JSON object), `""` (none) or a JSON schema object.

The grammar work is llguidance's (the library llama.cpp and vLLM use): the schema is compiled to a
grammar once per request and checked there, so a bad schema fails the request with a `ZenError`
before it is queued. At every sampled step the matcher writes a bitmask of the tokens that keep
the output a valid prefix; disallowed logits become -inf. Once the JSON is complete only the
end-of-turn tokens are allowed. `strict` is accepted and has no effect: the schema is always
enforced. Whitespace between JSON tokens is one space or one newline plus indentation, so a model
sampled hot cannot stall in an endless run of blanks.

Thinking models (`<think>`/`</think>` in the vocabulary): with `thinking=True` the answer may begin
with a `<think>` block, inside which nothing is constrained but the end of the turn (the JSON must
still come); the grammar applies from `</think>` on (the whitespace after the tag is let through). A prompt that itself leaves `<think>`
open (pass `prompt_ids`) starts inside the block. With `thinking=False` (the default) the grammar
applies from the first token, so a model cannot open a thinking block at all.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any, Callable, Sequence

import torch

from ..engine.generate import Constraint
from ..engine.thinking import prompt_opens_thinking, thinking_tokens
from ..errors import ZenError

# Applied over every schema's own "x-guidance" options. Between JSON tokens: nothing, one space, or
# one newline and up to 20 spaces/tabs of indentation (llama.cpp's JSON-schema grammars allow the
# same). Enough for compact and pretty-printed JSON; a weak or hot model cannot pad it endlessly.
JSON_OPTIONS = {"whitespace_pattern": r"(?: |\n[ \t]{0,20})?"}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
MAX_LEADING_WHITESPACE = 8  # whitespace-only tokens allowed between </think> and the JSON

_OPENAI_TYPES = ("text", "json_object", "json_schema")
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}

_llg_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_llg_lock = threading.Lock()


# ---------------------------------------------------------------------------- format -> schema


def schema_for(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a request's format asks for, or None for unconstrained text.

    Accepts OpenAI's `response_format` objects and Ollama's `format` ("json", "" or a schema)."""
    if response_format is None or response_format == "":
        return None
    if isinstance(response_format, str):
        if response_format == "json":
            return dict(ANY_OBJECT)
        raise ZenError(f"format must be \"json\" or a JSON schema object, got {response_format!r:.80}")
    if not isinstance(response_format, dict):
        raise ZenError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ZenError("response_format type json_schema needs a json_schema object: "
                           '{"name": ..., "schema": {...}, "strict": true}')
        name, strict = spec.get("name"), spec.get("strict")
        if name is not None and not isinstance(name, str):
            raise ZenError(f"response_format.json_schema.name must be a string, got {name!r:.80}")
        if strict is not None and not isinstance(strict, bool):
            raise ZenError(f"response_format.json_schema.strict must be a boolean, got {strict!r:.80}")
        schema = spec.get("schema", {})  # OpenAI: no schema means any JSON value
        if not isinstance(schema, dict):
            raise ZenError(f"response_format.json_schema.schema must be an object, got {type(schema).__name__}")
        return schema
    kinds = kind if isinstance(kind, list) else [kind]
    if kind is None or all(isinstance(k, str) and k in _JSON_TYPES for k in kinds):
        return response_format  # an Ollama `format`: the schema itself
    raise ZenError(f"unknown response_format type {kind!r:.80}; valid types: {', '.join(_OPENAI_TYPES)}")


# ---------------------------------------------------------------------------- llguidance glue


def llg_tokenizer(tokenizer: Any):
    """llguidance's view of our tokenizer (built from its `tokenizers.Tokenizer`; ~1-3 s, cached)."""
    import llguidance

    with _llg_lock:
        llt = _llg_tokenizers.get(tokenizer)
        if llt is None:
            llt = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                         eos_token=list(tokenizer.eos_token_ids) or None)
            _llg_tokenizers[tokenizer] = llt
        return llt


def compile_schema(tokenizer: Any, schema: dict[str, Any]) -> str:
    """The llguidance grammar for `schema`; raises ZenError naming what is wrong with it."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except Exception as e:  # whatever the compiler rejects is the request's fault
        raise ZenError(f"invalid JSON schema: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llg_tokenizer(tokenizer))
    if is_error:
        raise ZenError(f"invalid or unsupported JSON schema: {messages[0] if messages else 'rejected'}")
    return grammar


def constraint_for(tokenizer: Any, response_format: Any, *, thinking: bool | None = False,
                   prompt_ids: Sequence[int] | None = None) -> Callable[[], Constraint] | None:
    """A factory of fresh constraints for this format (None when the format asks for plain text).

    Checks the format and compiles the schema now (ZenError when it is bad); each call of the
    factory makes a new matcher. `thinking`: the turn may open with a `<think>` block that is left
    unconstrained (True only for a thinking model with thinking on); `prompt_ids`: lets a prompt that
    leaves `<think>` open start inside the block."""
    schema = schema_for(response_format)
    if schema is None:
        return None
    grammar = compile_schema(tokenizer, schema)
    llt = llg_tokenizer(tokenizer)
    tokens = thinking_tokens(tokenizer)
    start_in_thinking = (tokens is not None and prompt_ids is not None
                         and prompt_opens_thinking(prompt_ids, tokens, tokenizer.eos_token_ids))
    allow_think = bool(thinking) and tokens is not None
    ws_bits = _whitespace_bits(tokenizer) if tokens is not None else None

    think = tokens if allow_think or start_in_thinking else None

    def make() -> JsonConstraint:
        return JsonConstraint(llt, grammar, tokenizer.eos_token_ids, think, start_in_thinking, ws_bits)

    return make


_ws_cache: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def _whitespace_bits(tokenizer: Any) -> torch.Tensor:
    """Bitmask (int32 words) of the tokens made only of whitespace (what follows `</think>`)."""
    import llguidance

    with _llg_lock:
        bits = _ws_cache.get(tokenizer)
    if bits is None:
        llt = llg_tokenizer(tokenizer)
        matcher = llguidance.LLMatcher(llt, llguidance.LLMatcher.grammar_from_regex(r"[ \t\r\n]+"), log_level=0)
        bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32).clone()
        with _llg_lock:
            _ws_cache[tokenizer] = bits
    return bits


# byte value -> its 8 bits, lowest first: expands llguidance's bitmask with one gather, not 32 shifts
_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()


def _expand(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 bitmask words -> (n,) bool, bit i of word j = token 32 j + i (llguidance's layout)."""
    bits = _BYTE_BITS[words.view(torch.uint8).long()].view(-1)  # little-endian bytes, like the words
    if bits.numel() >= n:
        return bits[:n]
    return torch.cat([bits, bits.new_zeros(n - bits.numel())])  # logits beyond the tokenizer: never


class JsonConstraint:
    """One request's grammar state, in the `Constraint` protocol (`mask` then `accept`, per token).

    States: "start" (a `<think>` may open; else the JSON begins), "thinking" (anything but the end
    of the turn, until `</think>`), "after" (whitespace-only tokens pass, then the JSON begins), "json"."""

    def __init__(self, llt: Any, grammar: str, eos_ids: Sequence[int], think: Any = None,
                 start_in_thinking: bool = False, ws_bits: torch.Tensor | None = None) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(llt, grammar, log_level=0)
        if self.matcher.is_error():  # compile_schema checked it; only resource limits can get here
            raise ZenError(f"invalid JSON schema: {self.matcher.get_error()}")
        self.vocab = llt.vocab_size
        self.eos_ids = list(eos_ids)
        self._eos = torch.tensor(self.eos_ids, dtype=torch.long)
        self.think = think
        self.state = "thinking" if start_in_thinking else ("start" if think is not None else "json")
        self.ws_bits = ws_bits
        self.leading_ws = 0
        self._words = torch.zeros((self.vocab + 31) // 32, dtype=torch.int32)
        self.error: str | None = None  # set if the output left the grammar (a forced token, say)

    @property
    def done(self) -> bool:
        """The JSON is complete: only an end-of-turn token may follow."""
        return self.state == "json" and self.matcher.is_stopped()

    def _grammar_words(self) -> torch.Tensor:
        if self.matcher.is_error():
            self._words.zero_()
        else:
            self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        if self.done or self.matcher.is_error():  # nothing but the end of the turn
            self._words.zero_()
            for i in self.eos_ids:
                self._words[i // 32] |= _bit(i % 32)
        return self._words

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.state == "thinking":  # free, except that the turn may not end before the JSON
            return logits.index_fill(-1, self._eos.to(logits.device), float("-inf"))
        words = self._grammar_words()
        if self.state == "start":
            words = words.clone()
            words[self.think.open_id // 32] |= _bit(self.think.open_id % 32)
        elif self.state == "after" and self.ws_bits is not None and self.leading_ws < MAX_LEADING_WHITESPACE:
            words = words | self.ws_bits[: words.numel()]
        allowed = _expand(words, logits.shape[-1])
        if not bool(allowed.any()):
            return logits  # cannot happen with a valid grammar; never leave the sampler nothing to draw
        return logits.masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))

    def accept(self, token: int) -> None:
        if self.state == "start":
            if token == self.think.open_id:
                self.state = "thinking"
                return
            self.state = "json"
        elif self.state == "thinking":
            if token == self.think.close_id:
                self.state = "after"
            return
        elif self.state == "after":
            if self.ws_bits is not None and _has_bit(self.ws_bits, token) and not self._grammar_allows(token):
                self.leading_ws += 1
                return
            self.state = "json"
        if token in self.eos_ids and (self.matcher.is_accepting() or self.matcher.is_error()):
            return  # the end of the turn, not part of the JSON
        if not self.matcher.consume_token(token) and self.error is None:
            self.error = self.matcher.get_error() or f"token {token} does not fit the grammar"

    def _grammar_allows(self, token: int) -> bool:
        return self.matcher.validate_tokens([token]) == 1


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a signed value (bit 31 is the sign bit)."""
    return (1 << i) - (1 << 32) * (i == 31)


def _has_bit(words: torch.Tensor, token: int) -> bool:
    return token // 32 < words.numel() and bool((int(words[token // 32]) >> (token % 32)) & 1)
