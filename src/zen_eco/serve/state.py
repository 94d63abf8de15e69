"""What every route shares: the loaded model, its scheduler, and the bridge from the scheduler's
worker thread to asyncio.

`ServerState.stream(request)` submits a `Request` and yields its `GenerationChunk`s in the event
loop without blocking it; when the consumer stops early (a client disconnected, an exception), the
request is cancelled, so its batch slot and KV cache go back to the pool at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..api import ZenModel
from ..engine.generate import GenerationChunk
from ..engine.scheduler import Handle, Request, Scheduler


@dataclass
class ServerConfig:
    model_id: str  # the name clients see in /v1/models and must send as `model` (any name is accepted)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, every /v1 and /api route needs `Authorization: Bearer <key>`
    cors_origins: list[str] = field(default_factory=list)  # e.g. ["*"] or ["http://localhost:3000"]
    max_batch: int = 8  # sequences decoded together in one step
    max_queue: int = 64  # requests waiting beyond the batch; more get 429
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413


class ServerState:
    def __init__(self, zm: ZenModel, config: ServerConfig) -> None:
        self.zm = zm
        self.config = config
        self.scheduler = Scheduler(zm.model, zm.tokenizer, zm.context, config.max_batch, config.max_queue)
        self.started = time.time()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def submit(self, request: Request) -> tuple[Handle, asyncio.Event]:
        """Queue a request (raises QueueFull / ContextLengthError / ZenError at once); the event is set
        from the worker thread whenever the handle has something new."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        handle = self.scheduler.submit(request, on_event=lambda: loop.call_soon_threadsafe(event.set))
        return handle, event

    async def stream(self, request: Request) -> AsyncIterator[GenerationChunk]:
        handle, event = self.submit(request)
        async for chunk in self.follow(handle, event):
            yield chunk

    @staticmethod
    async def follow(handle: Handle, event: asyncio.Event) -> AsyncIterator[GenerationChunk]:
        """Yield a submitted handle's chunks; cancels it if the consumer stops before the end."""
        try:
            while True:
                try:
                    chunk = handle.get(block=False)
                except queue.Empty:
                    await event.wait()
                    event.clear()
                    continue
                if chunk is None:
                    return
                yield chunk
        finally:
            handle.cancel()
