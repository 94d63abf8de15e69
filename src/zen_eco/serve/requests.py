"""From an HTTP request's fields to a scheduler `Request`: what the OpenAI and Ollama routes share.

    ids, mode = render_chat(zm, messages, enable_thinking, thinking_budget, template_kwargs)
    params = sampling_params(mode, {"temperature": 0.2}, defaults=OPENAI_SAMPLING_DEFAULTS)
    request = make_request(state, ids, params, max_tokens=64, stop=["\\n\\n"], enable_thinking=mode,
                           thinking_budget=budget, constraint=constraint_factory(zm, response_format))
    chunks = state.stream(request)          # or state.submit_many([...]) for n > 1

Errors are `ZenError`s raised at once (before any response starts): a route lets them propagate and
app.py answers with `error_status(exc)` in the route's error shape (OpenAI for /v1, Ollama for /api).

- `render_chat`: a conversation -> prompt ids and its thinking mode (None: the model has no thinking).
- `thinking_budget_for(reasoning_effort, thinking_budget)`: OpenAI's `reasoning_effort` as a budget
  (`REASONING_EFFORT_BUDGETS`); an explicit budget wins.
- `sampling_params(mode, given, defaults)`: fields the client left out come from the thinking mode
  (models with `<think>`: Qwen3's per-mode values) or else from `defaults` (the API's own).
- `make_request`: max_tokens defaulted and checked against the context (the error names the token
  counts) and the server's per-request cap.
- `constraint_factory`: `response_format` (JSON mode / JSON schema, by `structured.constraint_for`)
  and `logit_bias`, as the per-request `Constraint` factory a `Request` takes.
- `error_status` / `error_code`: the HTTP status and a short code for an exception.
- `reasoning_token_count`, `token_bytes`: usage and logprob details.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence as Seq

import torch

from ..engine.generate import Constraint
from ..engine.sampling import SamplingParams, params_for_mode
from ..engine.scheduler import QueueFull, Request, SchedulerStopped
from ..engine.thinking import check_thinking_budget, thinking_tokens
from ..errors import ContextLengthError, ZenError

if TYPE_CHECKING:
    from ..api import ZenModel
    from .state import ServerState

# OpenAI's documented defaults (temperature 1, top_p 1) and no other truncation; models with
# thinking tokens use Qwen3's per-mode values instead (engine.sampling.mode_defaults).
OPENAI_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}

# reasoning_effort -> thinking budget in tokens. "none" turns thinking off; the others cap it.
REASONING_EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384}

MAX_N = 16  # most choices one request may ask for (`n`); each is a sequence in the scheduler
MAX_STOP = 16  # most stop strings per request
MAX_LOGPROBS = 20  # most alternatives per token (`top_logprobs`, OpenAI's limit)


def thinking_budget_for(reasoning_effort: str | None, thinking_budget: int | None) -> int | None:
    """The thinking budget a request asks for: `thinking_budget` if given, else `reasoning_effort`'s."""
    if thinking_budget is not None:
        return check_thinking_budget(thinking_budget)
    if reasoning_effort is None:
        return None
    try:
        return REASONING_EFFORT_BUDGETS[reasoning_effort]
    except KeyError:
        raise ZenError(f"reasoning_effort {reasoning_effort!r} is not one of {', '.join(REASONING_EFFORT_BUDGETS)}") from None


def render_chat(zm: "ZenModel", messages: list[dict[str, Any]], enable_thinking: bool | None = None,
                thinking_budget: int | None = None, template_kwargs: Mapping[str, Any] | None = None,
                ) -> tuple[list[int], bool | None]:
    """Prompt ids for a conversation (the checkpoint's chat template) and whether it thinks (None: the
    model has no thinking tokens). Thinking: off with enable_thinking=False or thinking_budget=0, else
    the latest /think or /no_think in the user messages, else on."""
    if zm.tokenizer.chat_template is None:
        raise ZenError(f"{zm.path} has no chat template; use the completions endpoint with a plain prompt")
    if not messages:
        raise ZenError("messages is empty: give at least one message")
    kwargs = dict(template_kwargs or {})
    if enable_thinking is None:
        enable_thinking = kwargs.get("enable_thinking")
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise ZenError(f"enable_thinking must be true or false, got {enable_thinking!r}")
    return zm.chat_prompt(messages, enable_thinking, thinking_budget, kwargs)


def sampling_params(mode: bool | None, given: Mapping[str, Any],
                    defaults: Mapping[str, Any] = OPENAI_SAMPLING_DEFAULTS) -> SamplingParams:
    """`SamplingParams` from the fields a client set (None values count as not set). Left-out
    temperature/top_p/top_k/min_p follow the thinking mode for models with thinking tokens (mode not
    None), else `defaults`. Raises SamplingError (a ZenError) for out-of-range values."""
    given = {k: v for k, v in given.items() if v is not None}
    if mode is not None:
        return params_for_mode(mode, **given)
    return SamplingParams(**(dict(defaults) | given))


def make_request(state: "ServerState", prompt_ids: Seq[int], params: SamplingParams, max_tokens: int | None = None,
                 stop: str | Seq[str] | None = None, enable_thinking: bool | None = None,
                 thinking_budget: int | None = None, constraint: Callable[[], Constraint] | None = None,
                 top_logprobs: int = 0) -> Request:
    """A scheduler `Request`, checked now. `max_tokens` None: the rest of the context. A request whose
    prompt plus max_tokens exceed the context raises ContextLengthError naming the counts; within
    the context, max_tokens is then capped at the server's `--max-tokens` (when set)."""
    ids = list(prompt_ids)
    context = state.scheduler.context
    room = context - len(ids)
    if not ids:
        raise ZenError("the prompt is empty: give at least one token")
    if max_tokens is None:
        if room < 1:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens, which leaves no room to generate in the "
                                     f"context of {context} tokens")
        max_tokens = room
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ZenError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    elif max_tokens > room:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens and {max_tokens} new tokens were asked for: "
                                 f"{len(ids) + max_tokens} exceeds the context of {context} tokens")
    if state.config.max_tokens is not None:
        max_tokens = min(max_tokens, state.config.max_tokens)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise ZenError(f"stop must be a string or a list of at most {MAX_STOP} strings")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_LOGPROBS:
        raise ZenError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top_logprobs!r}")
    check_thinking_budget(thinking_budget)
    vocab = state.zm.config.vocab_size
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
        raise ZenError(f"prompt token ids must be integers in [0, {vocab})")
    request = Request(ids, params, max_tokens, stops, enable_thinking, thinking_budget, constraint, top_logprobs)
    state.scheduler.check(request)
    return request


# ------------------------------------------------------------------ constraints


class LogitBias:
    """OpenAI's `logit_bias` as a `Constraint`: adds a fixed value to chosen tokens' logits."""

    def __init__(self, bias: Mapping[int, float], vocab_size: int) -> None:
        self.bias = torch.zeros(vocab_size)
        for token, value in bias.items():
            self.bias[token] = value

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bias.device != logits.device:
            self.bias = self.bias.to(logits.device)
        return logits.float() + self.bias

    def accept(self, token: int) -> None:
        pass


class Chain:
    """Several constraints applied in order (e.g. a JSON schema and a logit bias)."""

    def __init__(self, parts: list[Constraint]) -> None:
        self.parts = parts

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            logits = part.mask(logits)
        return logits

    def accept(self, token: int) -> None:
        for part in self.parts:
            part.accept(token)


def parse_logit_bias(bias: Mapping[str, Any] | None, vocab_size: int) -> dict[int, float]:
    """{"token id as a string": bias in [-100, 100]} -> {id: bias}; raises ZenError naming a bad entry."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ZenError(f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= token < vocab_size:
            raise ZenError(f"logit_bias token {token} is outside the vocabulary [0, {vocab_size})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ZenError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {token}")
        out[token] = float(value)
    return out


def constraint_factory(zm: "ZenModel", response_format: Mapping[str, Any] | None = None,
                       logit_bias: Mapping[str, Any] | None = None, thinking: bool | None = None,
                       prompt_ids: Seq[int] | None = None) -> Callable[[], Constraint] | None:
    """The per-request constraint factory for a `Request`, or None when nothing constrains output.
    response_format {"type": "text"} is no constraint; "json_object" / "json_schema" go to
    `structured.constraint_for` (which raises ZenError for a bad schema; a thinking turn's
    `<think>` block is left unconstrained). `logit_bias` ({"token id": -100..100}) is added to the
    logits of every sampled step."""
    makers: list[Callable[[], Constraint]] = []
    kind = (response_format or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ZenError(f"response_format type {kind!r} is not one of text, json_object, json_schema")
    if kind != "text":
        from .structured import constraint_for  # lazy: llguidance loads only when asked for

        structured = constraint_for(zm.tokenizer, dict(response_format), thinking=thinking, prompt_ids=prompt_ids)
        if structured is not None:
            makers.append(structured)
    vocab = zm.config.vocab_size  # the logits' size (embedding rows may pad the tokenizer's vocabulary)
    bias = parse_logit_bias(logit_bias, vocab)
    if bias:
        makers.append(lambda: LogitBias(bias, vocab))
    if not makers:
        return None
    if len(makers) == 1:
        return makers[0]
    return lambda: Chain([make() for make in makers])


# ------------------------------------------------------------------ errors


def error_status(exc: BaseException) -> int:
    """The HTTP status for an exception: 429 queue full, 503 shutting down, 400 any other ZenError
    (the client's request was wrong), 500 anything else (a bug)."""
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, SchedulerStopped):
        return 503
    if isinstance(exc, ZenError):
        return 400
    return 500


def error_code(exc: BaseException) -> str | None:
    """A short machine-readable code (OpenAI's `error.code`) for the exceptions clients act on."""
    if isinstance(exc, ContextLengthError):
        return "context_length_exceeded"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, SchedulerStopped):
        return "server_shutting_down"
    return None


# ------------------------------------------------------------------ usage and logprob details


def reasoning_token_count(output_ids: Seq[int], tokenizer, thinking: bool | None, reasoning: str) -> int:
    """Output tokens spent in the thinking block (`completion_tokens_details.reasoning_tokens`): up to
    and including `</think>`; all of them when the output stopped inside the block. 0 when the
    request did not think (thinking False/None) or produced no reasoning."""
    tokens = thinking_tokens(tokenizer)
    if not thinking or tokens is None:
        return 0
    if tokens.close_id in output_ids:
        return list(output_ids).index(tokens.close_id) + 1
    return len(output_ids) if reasoning else 0


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_byte_of: dict[str, int] | None = None


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for (OpenAI's logprob `bytes`): exact for byte-level BPE vocabularies
    (GPT-2/Qwen/SmolLM2) and byte-fallback tokens; the token decoded alone otherwise."""
    global _byte_of
    if _byte_of is None:
        from ..tokenizer.qwen import byte_alphabet

        _byte_of = {c: i for i, c in enumerate(byte_alphabet())}
    piece = tokenizer.id_to_token(token) or ""
    if piece and all(c in _byte_of for c in piece):
        return bytes(_byte_of[c] for c in piece)
    if m := _BYTE_TOKEN.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    if not piece:  # an embedding row past the tokenizer's vocabulary (padding)
        return b""
    return tokenizer.decode([token]).encode("utf-8")


def token_text(tokenizer, token: int) -> str:
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")
