"""Ollama's API over the same scheduler: POST /api/chat, /api/generate, /api/show; GET /api/tags,
/api/ps, /api/version. Clients written for Ollama (Open WebUI, ollama-python, editors) work as is.

What it follows of Ollama (docs/api.md):
- `stream` defaults to true: NDJSON, one object per line, the last with `done: true`, `done_reason`
  ("stop" or "length") and the timings in nanoseconds: total_duration, load_duration (here: rendering
  and tokenizing the prompt; the model is loaded at startup), prompt_eval_count/_duration (prompt
  tokens; submit to first token, queue wait included), eval_count/_duration (generated tokens; first
  to last token).
- `think`: true/false switches thinking (models with `<think>`; true on other models is a 400, as in
  Ollama); "low"/"medium"/"high" think with the budgets of `requests.REASONING_EFFORT_BUDGETS`; left
  out, the model's default (on, unless a /no_think in the messages says otherwise). zen-eco also
  takes `thinking_budget` (tokens) beside `think`, as its OpenAI routes do. The reasoning comes
  in `message.thinking` (/api/chat) or `thinking` (/api/generate), the answer in `content`/`response`.
- `format`: "json" or a JSON schema; the output is constrained to it (`structured.py`).
- `options`: temperature, top_k, top_p, min_p, seed, num_predict (-1/-2 or unset: up to the end of
  the context, as is anything beyond it; 0: nothing), stop, repeat_penalty, presence_penalty, frequency_penalty. Others
  (num_ctx: the context is fixed when the server starts, num_thread, mirostat...) are ignored.
- Any `model` name is accepted (the server has one model); responses echo the name asked for.
- An empty prompt (/api/generate) or no messages (/api/chat) answers `done_reason: "load"`, as
  Ollama does when asked to load a model.
- Errors are `{"error": "..."}` (app.py shapes them for /api paths): 400 for a bad request, 429 when
  the queue is full, 503 while shutting down, 404 for routes zen-eco does not have (pull, push,
  create...). Once a stream has started, an error is its last line.
- Not supported: images, tools, `suffix`, custom `template`s (ignored), `keep_alive` (ignored).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.generate import GenerationChunk
from ..engine.thinking import MAX_THINKING_BUDGET
from ..errors import ZenError
from .requests import REASONING_EFFORT_BUDGETS, error_status, make_request, render_chat, sampling_params

OLLAMA_VERSION = "0.12.0"  # the Ollama release whose API this follows (clients check it)
# Ollama's defaults for a model without its own; models with thinking tokens use Qwen3's per-mode ones.
OLLAMA_SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0}
NDJSON = "application/x-ndjson"


def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class NDJSONStream(StreamingResponse):
    """NDJSON response that always closes its generator (which cancels the generation), however the
    response ends: finished, client gone, or server shutdown."""

    media_type = NDJSON

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


router = APIRouter()


# ---------------------------------------------------------------------------- request bodies

_BODY = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class Options(BaseModel):
    """Ollama's `options` that apply here; the rest (num_ctx, num_thread, mirostat...) are ignored."""

    model_config = _BODY
    temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = None  # <= 0: off
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None  # negative: random
    num_predict: int | None = None  # -1 / -2 / unset: up to the end of the context
    stop: Union[str, list[str], None] = None
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    num_ctx: int | None = None  # ignored: the server's context is fixed at startup

    def sampling_fields(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": None if self.top_k is None else max(self.top_k, 0),
                "top_p": self.top_p, "min_p": self.min_p, "repetition_penalty": self.repeat_penalty,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "seed": self.seed if self.seed is not None and 0 <= self.seed < 2**64 else None}


Think = Union[bool, Literal["low", "medium", "high"], None]
Format = Union[Literal["", "json"], dict[str, Any], None]


class _Common(BaseModel):
    model_config = _BODY
    model: str = Field(..., min_length=1)
    format: Format = None
    options: Options | None = None
    stream: bool = True
    think: Think = None
    thinking_budget: int | None = Field(None, ge=0, le=MAX_THINKING_BUDGET)  # zen-eco's: cap on thinking tokens
    keep_alive: Any = None  # ignored: the model stays loaded


class Message(BaseModel):
    model_config = _BODY
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None  # an earlier assistant turn's reasoning (templates may drop it)
    images: list[str] | None = None
    tool_calls: list[Any] | None = None

    def to_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.thinking:
            out["reasoning_content"] = self.thinking
        return out


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(_Common):
    prompt: str = ""
    system: str | None = None
    template: str | None = None  # ignored: the checkpoint's own chat template is used
    raw: bool = False  # true: the prompt is sent as is, no template
    suffix: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None  # ids from an earlier /api/generate answer, continued


# ---------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _thinking_switch(state, body: _Common) -> tuple[bool | None, int | None]:
    """(enable_thinking, thinking_budget) for the request's `think`."""
    think, budget = body.think, body.thinking_budget
    if think not in (None, False) and not state.zm.supports_thinking:
        raise ZenError(f'"{body.model}" does not support thinking')
    if isinstance(think, str):
        return True, budget if budget is not None else REASONING_EFFORT_BUDGETS[think]
    return think, budget


def _unsupported(model: str, images: list[str] | None, tools: list[Any] | None = None,
                 suffix: str | None = None) -> None:
    if images:
        raise ZenError(f'"{model}" does not support images')
    if tools:
        raise ZenError(f'"{model}" does not support tools')
    if suffix:
        raise ZenError(f'"{model}" does not support insert (suffix)')


def _build(state, body: _Common, ids: list[int], mode: bool | None, budget: int | None):
    """The scheduler Request for prompt ids and the request's options and format (runs in a thread:
    compiling a schema can take a moment)."""
    from .structured import constraint_for  # lazy: llguidance loads only when a format is asked for

    opts = body.options or Options()
    params = sampling_params(mode, opts.sampling_fields(), OLLAMA_SAMPLING_DEFAULTS)
    # None: the rest of the context. Like Ollama, a num_predict beyond the context is not an error: it
    # stops where the context ends.
    room = state.scheduler.context - len(ids)
    num_predict = opts.num_predict
    max_tokens = None if num_predict is None or num_predict < 0 or room < 1 else min(num_predict, room)
    constraint = None
    if body.format not in (None, ""):
        constraint = constraint_for(state.zm.tokenizer, body.format, thinking=bool(mode), prompt_ids=ids)
    return make_request(state, ids, params, max_tokens, opts.stop, mode, budget, constraint)


def _timings(t0: float, t_prep: float, t_first: float | None, t_last: float | None, prompt_tokens: int,
             eval_count: int) -> dict[str, Any]:
    end = time.perf_counter()
    first = t_first if t_first is not None else end
    last = t_last if t_last is not None else end
    return {"total_duration": _ns(end - t0), "load_duration": _ns(t_prep - t0),
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": _ns(first - t_prep),
            "eval_count": eval_count, "eval_duration": _ns(last - first)}


async def _run(state, http: Request, body: _Common, ids: list[int], mode: bool | None, budget: int | None,
               t0: float, shape: Callable[[str, str], dict[str, Any]], final_extra: Callable[[list[int]], dict]):
    """Generate and answer: NDJSON lines when streaming, else one JSON object. `shape(content,
    thinking)` makes a chunk's payload; `final_extra(output_ids)` adds fields to the last object.
    The request is queued before any response starts, so a refused one gets its status (429/503)."""
    opts = body.options or Options()
    if opts.num_predict == 0:  # nothing to generate: answer at once
        now = time.perf_counter()
        return _respond(body.stream, {"model": body.model, "created_at": _now(), **shape("", ""), "done": True,
                                      "done_reason": "length", **_timings(t0, now, now, now, len(ids), 0),
                                      **final_extra([])})
    request = await asyncio.to_thread(_build, state, body, ids, mode, budget)
    handle, event = state.submit(request)
    t_prep = time.perf_counter()

    async def events() -> AsyncIterator[dict[str, Any]]:
        t_first = t_last = None
        out_ids: list[int] = []
        last: GenerationChunk | None = None
        try:
            async for chunk in state.follow(handle, event, http.is_disconnected):
                t_last = time.perf_counter()
                t_first = t_first or t_last
                last = chunk
                if chunk.token is not None:
                    out_ids.append(chunk.token)
                if chunk.reasoning or chunk.content:
                    yield {"model": body.model, "created_at": _now(), **shape(chunk.content, chunk.reasoning),
                           "done": False}
        except Exception as e:
            status = error_status(e)
            yield {"error": str(e) if status < 500 or status == 503 else f"internal error: {type(e).__name__}",
                   "status": status}
            return
        yield {"model": body.model, "created_at": _now(), **shape("", ""), "done": True,
               "done_reason": (last.finish_reason if last else None) or "stop",
               **_timings(t0, t_prep, t_first, t_last, last.prompt_tokens if last else len(ids), len(out_ids)),
               **final_extra(out_ids)}

    if body.stream:
        async def lines() -> AsyncIterator[bytes]:
            async for e in events():
                e.pop("status", None)
                yield (json.dumps(e, ensure_ascii=False) + "\n").encode()

        return NDJSONStream(lines())
    content: list[str] = []
    thinking: list[str] = []
    final: dict[str, Any] = {}
    async for e in events():
        if "error" in e:
            return ollama_error(e["status"], e["error"])
        piece = e.get("message", e)
        content.append(piece.get("content", piece.get("response", "")))
        thinking.append(piece.get("thinking", ""))
        final = e
    return JSONResponse({**final, **shape("".join(content), "".join(thinking))})


def _respond(stream: bool, event: dict[str, Any]):
    if stream:
        return NDJSONStream(iter([(json.dumps(event) + "\n").encode()]))
    return JSONResponse(event)


def _loaded(body: _Common, shape: Callable[[str, str], dict[str, Any]]) -> JSONResponse:
    """Ollama's answer to a request with nothing to do: the model is loaded."""
    return JSONResponse({"model": body.model, "created_at": _now(), **shape("", ""), "done": True,
                         "done_reason": "load"})


# ---------------------------------------------------------------------------- generation routes


@router.post("/api/chat")
async def chat(body: ChatRequest, http: Request):
    """Ollama's chat: `messages` in, the assistant's message out (streamed as NDJSON by default)."""
    t0 = time.perf_counter()
    state = http.app.state.zen
    _unsupported(body.model, [i for m in body.messages for i in (m.images or [])], body.tools)

    def shape(content: str, thinking: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        return {"message": message}

    if not body.messages:
        return _loaded(body, shape)
    enable, budget = _thinking_switch(state, body)
    messages = [m.to_template() for m in body.messages]
    ids, mode = await asyncio.to_thread(render_chat, state.zm, messages, enable, budget)
    return await _run(state, http, body, ids, mode, budget, t0, shape, lambda out: {})


@router.post("/api/generate")
async def generate(body: GenerateRequest, http: Request):
    """Ollama's completion: `prompt` (wrapped in the chat template unless `raw`) in, `response` out;
    the last object carries `context`, the token ids to send back to continue."""
    t0 = time.perf_counter()
    state = http.app.state.zen
    zm = state.zm
    _unsupported(body.model, body.images, suffix=body.suffix)

    def shape(content: str, thinking: str) -> dict[str, Any]:
        return {"response": content, **({"thinking": thinking} if thinking else {})}

    if not body.prompt and not body.context:
        return _loaded(body, shape)
    enable, budget = _thinking_switch(state, body)

    def render() -> tuple[list[int], bool | None]:
        if body.raw or zm.tokenizer.chat_template is None:
            return zm.tokenizer.encode(body.prompt, add_special_tokens=not body.context), None
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": body.prompt}]
        ids, m = render_chat(zm, messages, enable, budget)
        if body.context and zm.tokenizer.add_bos and ids[:1] == [zm.tokenizer.bos_token_id]:
            ids = ids[1:]  # the context already starts with BOS
        return ids, m

    ids, mode = await asyncio.to_thread(render)
    if body.context:
        vocab = zm.config.vocab_size
        if any(not 0 <= t < vocab for t in body.context):
            raise ZenError(f"context holds token ids outside the vocabulary [0, {vocab})")
        ids = list(body.context) + ids
    prompt_ids = list(ids)
    return await _run(state, http, body, ids, mode, budget, t0, shape, lambda out: {"context": prompt_ids + out})


# ---------------------------------------------------------------------------- model routes


def _model_facts(state) -> dict[str, Any]:
    """What /api/tags, /api/show and /api/ps say about the served model (computed once)."""
    facts = getattr(state, "_ollama_facts", None)
    if facts is not None:
        return facts
    from pathlib import Path

    zm = state.zm
    cfg = zm.config
    path = Path(zm.path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
    size = sum(p.stat().st_size for p in files)
    mtime = max((p.stat().st_mtime for p in files), default=state.started)
    n = cfg.num_parameters()
    digest = hashlib.sha256(f"{path.resolve()}:{size}:{mtime}".encode()).hexdigest()  # cheap: no file read
    facts = {
        "size": size,
        "digest": digest,
        "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
        "details": {"parent_model": "", "format": "gguf" if path.suffix == ".gguf" else "safetensors",
                    "family": cfg.model_type, "families": [cfg.model_type],
                    "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
                    "quantization_level": _quantization_level(zm)},
        "parameters": n,
    }
    state._ollama_facts = facts
    return facts


def _quantization_level(zm) -> str:
    """The storage type most of the weights have: a GGUF type name (Q4_1...) or the dtype (BF16...)."""
    if str(zm.path).endswith(".gguf"):
        try:
            from ..checkpoint.gguf_file import ggml_type_name
            from ..checkpoint.gguf_source import GGUFSource

            source = GGUFSource(zm.path)
            try:
                types = Counter(ggml_type_name(t.ggml_type) for t in source.file.tensors.values()
                                if len(t.shape) == 2)
            finally:
                source.close()
            return types.most_common(1)[0][0] if types else "unknown"
        except Exception:  # a label only: never fail a listing over it
            return "unknown"
    dtypes = Counter(str(p.dtype).removeprefix("torch.") for p in zm.model.parameters())
    name = dtypes.most_common(1)[0][0] if dtypes else "unknown"
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(name, name.upper())


def _entry(state, name: str) -> dict[str, Any]:
    f = _model_facts(state)
    return {"name": name, "model": name, "modified_at": f["modified_at"], "size": f["size"],
            "digest": f["digest"], "details": f["details"]}


@router.get("/api/tags")
async def tags(http: Request):
    """The models this server has: one."""
    state = http.app.state.zen
    entry = await asyncio.to_thread(_entry, state, state.config.model_id)
    return {"models": [entry]}


@router.get("/api/ps")
async def ps(http: Request):
    """The models loaded now: the one, for as long as the server runs."""
    state = http.app.state.zen
    entry = await asyncio.to_thread(_entry, state, state.config.model_id)
    on_gpu = state.zm.model.device.type == "cuda"
    return {"models": [{**entry, "expires_at": "2999-01-01T00:00:00Z", "size_vram": entry["size"] if on_gpu else 0,
                        "context_length": state.zm.context}]}


class ShowRequest(BaseModel):
    model_config = _BODY
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool = False


@router.post("/api/show")
async def show(body: ShowRequest, http: Request):
    """Details of the served model (any name gets them): template, parameters, capabilities."""
    name = body.model or body.name
    if not name:
        raise ZenError("model is required")
    state = http.app.state.zen
    zm, cfg = state.zm, state.zm.config
    f = await asyncio.to_thread(_model_facts, state)
    arch = cfg.model_type
    template = zm.tokenizer.chat_template.source if zm.tokenizer.chat_template else ""
    defaults = OLLAMA_SAMPLING_DEFAULTS if not zm.supports_thinking else {"temperature": 0.6, "top_k": 20,
                                                                          "top_p": 0.95, "min_p": 0.0}
    stops = [zm.tokenizer.id_to_token(i) for i in zm.tokenizer.eos_token_ids]
    parameters = "\n".join([f"{k:<15} {v}" for k, v in defaults.items()] + [f'stop{"":<11} "{s}"' for s in stops if s])
    return {
        "modelfile": f"# served by zen-eco from {zm.path}\nFROM {zm.path}\n",
        "parameters": parameters,
        "template": template,
        "details": f["details"],
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": f["parameters"],
            f"{arch}.context_length": zm.context,
            f"{arch}.embedding_length": cfg.hidden_size,
            f"{arch}.block_count": cfg.num_hidden_layers,
            f"{arch}.attention.head_count": cfg.num_attention_heads,
            f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
            f"{arch}.vocab_size": cfg.vocab_size,
        },
        "capabilities": ["completion"] + (["thinking"] if zm.supports_thinking else []),
        "modified_at": f["modified_at"],
    }


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_VERSION}


@router.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"], include_in_schema=False)
async def not_here(path: str):
    """Ollama routes zen-eco does not have (pull, push, create, copy, delete, embed...)."""
    return ollama_error(404, f"zen-eco does not serve /api/{path} (it has /api/chat, /api/generate, /api/tags, "
                             "/api/show, /api/ps, /api/version)")
