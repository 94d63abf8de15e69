"""OpenAI's API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}].

A request becomes `n` scheduler requests (choice i samples with seed + i), submitted together before
any response starts, so a bad or refused request gets a real status (400/429/503). Streaming is SSE
(`data: {chunk}` ... `data: [DONE]`); a client that disconnects cancels its requests. Models with
thinking tokens get the thinking split out as `reasoning_content` and `reasoning` (the two names
clients read) beside `content`, in messages and in stream deltas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.generate import GenerationChunk
from ..errors import ZenError
from .openai_schema import ChatCompletionRequest, CompletionRequest
from .requests import (constraint_factory, error_code, error_status, make_request, reasoning_token_count,
                       render_chat, sampling_params, thinking_budget_for, token_bytes, token_text)
from .state import ServerState

log = logging.getLogger("zen_eco.serve")
router = APIRouter()

FINGERPRINT = "zen-eco"
DONE = b"data: [DONE]\n\n"


def openai_error(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    kind = ("invalid_request_error" if status < 429 or 429 < status < 500 else
            "rate_limit_error" if status == 429 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_event(exc: BaseException) -> bytes:
    status = error_status(exc)
    if status >= 500 and status != 503:
        log.exception("request failed mid-stream", exc_info=exc)
    return _sse(openai_error(str(exc) if status < 500 or status == 503 else "internal error", status,
                             code=error_code(exc)))


class EventStream(StreamingResponse):
    """SSE response that always closes its generator (which cancels the generation), however the
    response ends: finished, client gone (Starlette cancels the send loop), or server shutdown."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _finite(x: float | None) -> float:
    return -9999.0 if x is None or not math.isfinite(x) else x  # JSON has no -inf


def _state(request: Request) -> ServerState:
    return request.app.state.zen


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, chunk: GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        self.content.append(chunk.content)
        if chunk.token is not None:
            self.ids.append(chunk.token)
        self.finish_reason = chunk.finish_reason
        self.prompt_tokens, self.cached_tokens = chunk.prompt_tokens, chunk.reused_prompt_tokens


def _usage(choices: list[_Choice], prompt_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": choices[0].cached_tokens if choices else 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def _response_format(body: ChatCompletionRequest) -> dict[str, Any] | None:
    return body.response_format.model_dump(exclude_none=True) if body.response_format is not None else None


def _constraint(state: ServerState, response_format, logit_bias, thinking=None, prompt_ids=None):
    try:
        return constraint_factory(state.zm, response_format, logit_bias, thinking, prompt_ids)
    except ImportError as exc:  # structured output's module or llguidance missing
        raise ZenError(f"structured output is not available on this server: {exc}") from None


# ------------------------------------------------------------------ chat


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    zm = state.zm
    budget = thinking_budget_for(body.reasoning_effort, body.thinking_budget)
    messages = [m.to_template() for m in body.messages]
    ids, mode = await asyncio.to_thread(render_chat, zm, messages, body.enable_thinking, budget,
                                        body.chat_template_kwargs)
    constraint = _constraint(state, _response_format(body), body.logit_bias, mode, ids)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    requests = [make_request(state, ids, sampling_params(mode, body.sampling_fields() | {"seed": body.seed_for(i)}),
                             max_tokens, body.stop, mode, budget, constraint, top) for i in range(body.n)]
    handles, event = state.submit_many(requests)
    chat = _Chat(state, body, request, ids, mode)
    if body.stream:
        return EventStream(chat.stream(handles, event))
    return await chat.collect(handles, event)


class _Chat:
    def __init__(self, state: ServerState, body: ChatCompletionRequest, request: Request, prompt_ids: list[int],
                 mode: bool | None) -> None:
        self.state, self.body, self.request, self.prompt_ids, self.mode = state, body, request, prompt_ids, mode
        self.tok = state.zm.tokenizer
        self.eos = set(self.tok.eos_token_ids)
        self.id, self.created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

    def _logprob(self, chunk: GenerationChunk) -> dict[str, Any] | None:
        if not self.body.logprobs or chunk.token is None or chunk.token in self.eos:
            return None
        tok, top = self.tok, self.body.top_logprobs or 0
        return {"token": token_text(tok, chunk.token), "logprob": _finite(chunk.logprob),
                "bytes": list(token_bytes(tok, chunk.token)),
                "top_logprobs": [{"token": token_text(tok, t), "logprob": _finite(lp), "bytes": list(token_bytes(tok, t))}
                                 for t, lp in chunk.top_logprobs[:top]]}

    def _reasoning_tokens(self, choices: list[_Choice]) -> int:
        return sum(reasoning_token_count(c.ids, self.tok, self.mode, "".join(c.reasoning)) for c in choices)

    def _message(self, c: _Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(c.content)}
        reasoning = "".join(c.reasoning)
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        return message

    async def collect(self, handles, event) -> Response:
        choices = [_Choice() for _ in handles]
        async for i, chunk in self.state.follow_many(handles, event, self.request.is_disconnected):
            choices[i].add(chunk)
            if (lp := self._logprob(chunk)) is not None:
                choices[i].logprobs.append(lp)
        if any(c.finish_reason is None for c in choices):  # the client left
            return Response(status_code=499)
        return JSONResponse({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.state.config.model_id,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": i, "message": self._message(c),
                         "logprobs": {"content": c.logprobs, "refusal": None} if self.body.logprobs else None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": _usage(choices, len(self.prompt_ids), self._reasoning_tokens(choices)),
        })

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.state.config.model_id, "system_fingerprint": FINGERPRINT, "choices": choices}
        if self.body.include_usage:
            obj["usage"] = None
        return _sse(obj)

    async def stream(self, handles, event) -> AsyncIterator[bytes]:
        choices = [_Choice() for _ in handles]
        for i in range(len(handles)):
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
        try:
            async for i, chunk in self.state.follow_many(handles, event, self.request.is_disconnected):
                choices[i].add(chunk)
                delta: dict[str, Any] = {}
                if chunk.reasoning:
                    delta["reasoning_content"] = delta["reasoning"] = chunk.reasoning
                if chunk.content:
                    delta["content"] = chunk.content
                lp = self._logprob(chunk)
                if delta or lp is not None:
                    yield self._chunk([{"index": i, "delta": delta,
                                        "logprobs": {"content": [lp], "refusal": None} if lp is not None else None,
                                        "finish_reason": None}])
                if chunk.finish_reason is not None:
                    yield self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": chunk.finish_reason}])
        except Exception as exc:  # a request failed mid-stream (e.g. the server is shutting down)
            yield error_event(exc)
            yield DONE
            return
        if any(c.finish_reason is None for c in choices):  # the client left
            return
        if self.body.include_usage:
            usage = _usage(choices, len(self.prompt_ids), self._reasoning_tokens(choices))
            yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.state.config.model_id, "system_fingerprint": FINGERPRINT, "choices": [],
                        "usage": usage})
        yield DONE


# ------------------------------------------------------------------ completions


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    tok = state.zm.tokenizer
    prompts = body.prompts()
    encoded = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else p for p in prompts])
    constraint = _constraint(state, None, body.logit_bias)
    top = body.logprobs or 0
    requests, echo = [], []
    for p, ids in zip(prompts, encoded):
        for j in range(body.n):
            params = sampling_params(None, body.sampling_fields() | {"seed": body.seed_for(j)})
            requests.append(make_request(state, ids, params, body.max_tokens, body.stop, None, None, constraint, top))
            echo.append((p if isinstance(p, str) else tok.decode(ids, skip_special_tokens=True)) if body.echo else "")
    handles, event = state.submit_many(requests)
    comp = _Completion(state, body, request, sum(len(ids) for ids in encoded), echo)
    if body.stream:
        return EventStream(comp.stream(handles, event))
    return await comp.collect(handles, event)


class _Completion:
    def __init__(self, state: ServerState, body: CompletionRequest, request: Request, prompt_tokens: int,
                 echo: list[str]) -> None:
        self.state, self.body, self.request, self.prompt_tokens, self.echo = state, body, request, prompt_tokens, echo
        self.tok = state.zm.tokenizer
        self.eos = set(self.tok.eos_token_ids)
        self.id, self.created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        self.offsets = [len(e) for e in echo]

    def _logprobs(self, i: int, chunk: GenerationChunk) -> dict[str, Any] | None:
        """One token's entry in OpenAI's completions logprobs format (parallel lists)."""
        if self.body.logprobs is None or chunk.token is None or chunk.token in self.eos:
            return None
        tok = self.tok
        text = token_text(tok, chunk.token)
        out = {"tokens": [text], "token_logprobs": [_finite(chunk.logprob)],
               "top_logprobs": [{token_text(tok, t): _finite(lp) for t, lp in chunk.top_logprobs[: self.body.logprobs]}],
               "text_offset": [self.offsets[i]]}
        self.offsets[i] += len(text)
        return out

    def _object(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        obj = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.state.config.model_id, "system_fingerprint": FINGERPRINT, "choices": choices}
        if usage is not None or self.body.include_usage:
            obj["usage"] = usage
        return obj

    async def collect(self, handles, event) -> Response:
        choices = [_Choice() for _ in handles]
        merged: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                         for _ in handles]
        async for i, chunk in self.state.follow_many(handles, event, self.request.is_disconnected):
            choices[i].add(chunk)
            if (lp := self._logprobs(i, chunk)) is not None:
                for k, v in lp.items():
                    merged[i][k] += v
        if any(c.finish_reason is None for c in choices):
            return Response(status_code=499)
        return JSONResponse(self._object(
            [{"index": i, "text": self.echo[i] + "".join(c.text),
              "logprobs": merged[i] if self.body.logprobs is not None else None,
              "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            _usage(choices, self.prompt_tokens, 0)))

    async def stream(self, handles, event) -> AsyncIterator[bytes]:
        choices = [_Choice() for _ in handles]
        for i, text in enumerate(self.echo):
            if text:
                yield _sse(self._object([{"index": i, "text": text, "logprobs": None, "finish_reason": None}]))
        try:
            async for i, chunk in self.state.follow_many(handles, event, self.request.is_disconnected):
                choices[i].add(chunk)
                lp = self._logprobs(i, chunk)
                if chunk.text or lp is not None or chunk.finish_reason is not None:
                    yield _sse(self._object([{"index": i, "text": chunk.text, "logprobs": lp,
                                              "finish_reason": chunk.finish_reason}]))
        except Exception as exc:
            yield error_event(exc)
            yield DONE
            return
        if any(c.finish_reason is None for c in choices):
            return
        if self.body.include_usage:
            yield _sse(self._object([], _usage(choices, self.prompt_tokens, 0)))
        yield DONE


# ------------------------------------------------------------------ models


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.config.model_id, "object": "model", "created": int(state.started), "owned_by": "zen-eco"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    if model != state.config.model_id:
        raise HTTPException(404, f"model {model!r} does not exist; this server serves {state.config.model_id!r}")
    return _model_card(state)
