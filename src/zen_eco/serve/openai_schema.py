"""The request bodies of the OpenAI routes, as pydantic models (they also make the OpenAPI schema).

Unknown fields are ignored (clients send many we do not use: `user`, `tools`, `store`...); known
fields are checked strictly (no "10" for 10, no true for 1.0), so a wrong type is a 400, not a guess.
Ranges are OpenAI's where it has them; `n`, `stop`, `top_logprobs` have the limits in requests.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from ..engine.thinking import MAX_THINKING_BUDGET
from .requests import MAX_LOGPROBS, MAX_N, MAX_STOP, REASONING_EFFORT_BUDGETS

_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

Stop = Union[str, list[str], None]
# Checked by ChatMessage._text_parts (for a clearer message than a union error); documented as:
TextPart = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}})]
ReasoningEffort = Literal[tuple(REASONING_EFFORT_BUDGETS)]  # type: ignore[valid-type]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict"} for type json_schema


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None  # a string or [{"type": "text", "text": ...}]
    name: str | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's thinking (templates may drop it)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {j} has type {part.get('type')!r}; only "
                                     "{'type': 'text', 'text': str} parts are supported")
        return content

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template gets it: text parts joined, `developer` as `system`."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        return out


class _Sampling(BaseModel):
    """Fields both endpoints take. None: not set (the server's default applies)."""

    model_config = _STRICT
    model: str | None = None  # any name is accepted; responses carry the served model's id
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Stop = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # {"token id": -100..100}

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, stop: Stop) -> Stop:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}")
        return stop

    def sampling_fields(self) -> dict[str, Any]:
        """The sampling fields the client set (None: unset), in SamplingParams' terms."""
        return {"temperature": self.temperature, "top_p": self.top_p,
                "top_k": 0 if self.top_k == -1 else self.top_k, "min_p": self.min_p,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty}

    def seed_for(self, choice: int) -> int | None:
        """Choice i samples with seed + i (mod 2**64), so n choices differ and a request repeats exactly."""
        return None if self.seed is None else (self.seed + choice) % 2**64

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    model_config = _STRICT | ConfigDict(json_schema_extra={"examples": [
        {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "temperature": 0}]})
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # reasoning + answer; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    # thinking (models with <think> tokens; ignored by others)
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}
    enable_thinking: bool | None = None  # the same switch at the top level (as Qwen's own API takes it)
    thinking_budget: int | None = Field(None, ge=0, le=MAX_THINKING_BUDGET)
    reasoning_effort: ReasoningEffort | None = None  # none/minimal/low/medium/high -> a thinking budget


class CompletionRequest(_Sampling):
    model_config = _STRICT | ConfigDict(json_schema_extra={"examples": [
        {"model": "default", "prompt": "Once upon a time", "max_tokens": 16}]})
    prompt: Union[str, list[str], list[int], list[list[int]]]  # text, texts, token ids, or lists of ids
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token
    echo: bool = False  # put the prompt before each completion's text
    suffix: str | None = None  # accepted, not used (no fill-in-the-middle)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt is empty: give a string, a list of strings, or token ids")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)
