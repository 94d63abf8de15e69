"""What every route shares: the loaded model, its scheduler, the metrics, and the bridge from the
scheduler's worker thread to asyncio.

`ServerState.stream(request)` submits a `Request` and yields its `GenerationChunk`s in the event
loop without blocking it; when the consumer stops early (a client disconnected, an exception), the
request is cancelled, so its batch slot and KV cache go back to the pool at the next step. For
several requests at once (`n` > 1): `submit_many` (all or none) then `follow_many`, which yields
`(index, chunk)` as any of them produces one. Following records the token and latency metrics.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Sequence

from ..api import ZenModel
from ..engine.generate import GenerationChunk
from ..engine.scheduler import Handle, Request, Scheduler
from .metrics import Metrics

DISCONNECT_POLL_S = 0.25  # how often a follower waiting for tokens asks whether its client is gone


@dataclass
class ServerConfig:
    model_id: str  # the name clients see in /v1/models and must send as `model` (any name is accepted)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the bound one is written back here once the server listens)
    api_key: str | None = None  # when set, every /v1 and /api route needs `Authorization: Bearer <key>`
    cors_origins: list[str] = field(default_factory=list)  # e.g. ["*"] or ["http://localhost:3000"]
    max_batch: int = 8  # sequences decoded together in one step
    max_queue: int = 64  # requests waiting beyond the batch; more get 429
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    max_tokens: int | None = None  # most tokens one request generates (larger asks are capped); None: the context


class ServerState:
    def __init__(self, zm: ZenModel, config: ServerConfig) -> None:
        self.zm = zm
        self.config = config
        self.scheduler = Scheduler(zm.model, zm.tokenizer, zm.context, config.max_batch, config.max_queue)
        self.metrics = Metrics(self.scheduler)
        self.started = time.time()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        """Stop generating: every unfinished request ends with SchedulerStopped (streams close)."""
        self.scheduler.stop()

    def submit(self, request: Request) -> tuple[Handle, asyncio.Event]:
        """Queue a request (raises QueueFull / ContextLengthError / ZenError at once); the event is set
        from the worker thread whenever the handle has something new."""
        handles, event = self.submit_many([request])
        return handles[0], event

    def submit_many(self, requests: Sequence[Request]) -> tuple[list[Handle], asyncio.Event]:
        """Queue several requests, all or none: if one is refused, the ones already queued are
        cancelled and the error is raised. One event wakes the consumer for any of them."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        wake = lambda: loop.call_soon_threadsafe(event.set)  # noqa: E731 (called from the worker thread)
        handles: list[Handle] = []
        try:
            for request in requests:
                handles.append(self.scheduler.submit(request, on_event=wake))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles, event

    async def stream(self, request: Request,
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[GenerationChunk]:
        handle, event = self.submit(request)
        async for chunk in self.follow(handle, event, is_disconnected):
            yield chunk

    async def follow(self, handle: Handle, event: asyncio.Event,
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[GenerationChunk]:
        """Yield a submitted handle's chunks; cancels it if the consumer stops before the end."""
        async for _, chunk in self.follow_many([handle], event, is_disconnected):
            yield chunk

    async def follow_many(self, handles: Sequence[Handle], event: asyncio.Event,
                          is_disconnected: Callable[[], Awaitable[bool]] | None = None,
                          ) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Yield `(index, chunk)` for submitted handles as chunks arrive, until every one has ended;
        a failed request raises its error. On any early exit (the consumer stopped iterating, was
        cancelled, or `is_disconnected()` said the client left) every unfinished handle is cancelled.
        `is_disconnected` (e.g. Starlette's `request.is_disconnected`) is polled while waiting."""
        open_ = set(range(len(handles)))
        seen = [0] * len(handles)
        next_poll = time.monotonic() + DISCONNECT_POLL_S
        try:
            while open_:
                progressed = False
                for i in sorted(open_):
                    try:
                        chunk = handles[i].get(block=False)
                    except queue.Empty:
                        continue
                    progressed = True
                    if chunk is None:
                        open_.discard(i)
                        continue
                    self._record(handles[i], seen[i], chunk)
                    seen[i] += 1
                    yield i, chunk
                if is_disconnected is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + DISCONNECT_POLL_S
                    if await is_disconnected():
                        return
                if progressed:
                    continue
                if is_disconnected is None:
                    await event.wait()
                else:
                    try:
                        await asyncio.wait_for(event.wait(), max(0.0, next_poll - time.monotonic()))
                    except asyncio.TimeoutError:
                        continue
                event.clear()
        finally:
            for i in open_:
                handles[i].cancel()
                self.metrics.cancelled.inc()

    def _record(self, handle: Handle, k: int, chunk: GenerationChunk) -> None:
        m = self.metrics
        m.generation_tokens.inc()
        if k == 0:
            m.prompt_tokens.inc(chunk.prompt_tokens)
            m.cached_prompt_tokens.inc(chunk.reused_prompt_tokens)
            m.ttft.observe(chunk.time_to_first_token)
        elif k < len(handle.produced):
            m.itl.observe(max(0.0, handle.produced[k] - handle.produced[k - 1]))
