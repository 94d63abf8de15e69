"""Continuous batching: many requests share each decode step; new ones join between steps.

A `Scheduler` owns one model and a worker thread. `submit(request)` queues a `Request` and returns
a `Handle` whose chunks arrive as the worker produces them. Each turn of the worker's loop:

1. admits queued requests while fewer than `max_batch` run, giving each a KV cache from the pool
   (the free cache sharing the longest prefix with its prompt, so a follow-up chat turn or a
   request with the same system prompt recomputes only what is new);
2. runs one prefill chunk of one admitted request (long prompts are cut in `prefill_chunk`-token
   pieces, so they delay the running streams by one chunk at a time, not by the whole prompt);
3. runs one decode step for every prefilled request together (`step_batch`: one pass over the
   weights, each row attending to its own cache) and hands each request its text chunk.

Finished and cancelled requests leave between steps and give their cache back (kept, with its
contents, for prefix reuse). The queue is bounded: `submit` raises `QueueFull` beyond `max_queue`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence as Seq

import torch

from ..errors import ZenError
from ..kv_cache import KVCache
from ..model import Transformer
from .generate import Constraint, Generation, GenerationChunk, check_context, step_batch
from .sampling import SamplingParams


class QueueFull(ZenError):
    """The scheduler's queue is full; try again later."""


class SchedulerStopped(ZenError):
    """The scheduler was shut down before the request finished."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    stop: Seq[str] = ()
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    constraint: Callable[[], Constraint] | None = None  # built when the request starts
    top_logprobs: int = 0


_DONE = object()


class Handle:
    """The caller's side of a request: iterate it for chunks (blocking), or read `chunks` (a queue of
    GenerationChunk, then an exception or the end marker). `cancel()` stops the generation at the
    next step and frees its slot."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, on_event: Callable[[], None] | None = None) -> None:
        self.id = next(self._ids)
        self.request = request
        self.chunks: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.produced: list[float] = []  # perf_counter() when each chunk was handed over (latency metrics)
        self._on_event = on_event  # e.g. wakes an asyncio consumer

    def _put(self, item) -> None:
        if isinstance(item, GenerationChunk):
            self.produced.append(time.perf_counter())
        self.chunks.put(item)
        if self._on_event is not None:
            self._on_event()

    def cancel(self) -> None:
        self.cancelled.set()

    def get(self, timeout: float | None = None, block: bool = True) -> GenerationChunk | None:
        """The next chunk, or None at the end; raises the request's error if it failed (and
        queue.Empty when nothing came within `timeout`, or at once with block=False)."""
        item = self.chunks.get(block=block, timeout=timeout)
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[GenerationChunk]:
        while (chunk := self.get()) is not None:
            yield chunk


class CachePool:
    """Up to `size` KV caches. A request gets the free cache whose tokens share the longest prefix
    with its prompt (least recently used among equals); a cache keeps its contents when freed."""

    def __init__(self, model: Transformer, context: int, size: int) -> None:
        self.model, self.context, self.size = model, context, size
        self.free: list[KVCache] = []
        self.busy = 0

    def acquire(self, prompt_ids: Seq[int]) -> KVCache | None:
        def shared(cache: KVCache) -> int:
            n = 0
            for a, b in zip(cache.token_ids, prompt_ids):
                if a != b:
                    break
                n += 1
            return n

        if self.free:
            best = max(range(len(self.free)), key=lambda i: (shared(self.free[i]), -i))
            if shared(self.free[best]) > 0 or self.busy + len(self.free) >= self.size:
                self.busy += 1
                return self.free.pop(best)
        if self.busy + len(self.free) < self.size:
            self.busy += 1
            return self.model.new_cache(max_tokens=self.context)
        return None

    def release(self, cache: KVCache) -> None:
        cache.owner = None
        self.busy -= 1
        self.free.append(cache)  # most recently used last

    def cached_tokens(self) -> int:
        return sum(c.length for c in self.free)


@dataclass
class _Active:
    handle: Handle
    gen: Generation


class Scheduler:
    def __init__(self, model: Transformer, tokenizer, context: int | None = None, max_batch: int = 8,
                 max_queue: int = 64, prefill_chunk: int = 256) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ZenError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.pool = CachePool(model, self.context, max_batch)
        self._waiting: list[Handle] = []
        self._active: list[_Active] = []
        self._lock = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (each serves every active request)
        self.on_finish: Callable[[Handle, GenerationChunk | None, BaseException | None], None] | None = None

    # ------------------------------------------------------------------ caller side

    def start(self) -> "Scheduler":
        with self._lock:
            if not self._running:
                self._running = True
                self._thread = threading.Thread(target=self._loop, name="zen-eco-scheduler", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current step; every unfinished request ends with SchedulerStopped."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for h in self._waiting + [a.handle for a in self._active]:
                h._put(SchedulerStopped("the server is shutting down"))
            for a in self._active:
                self.pool.release(a.gen.seq.cache)
            self._waiting.clear()
            self._active.clear()

    def check(self, request: Request) -> None:
        """Raise the error `submit` would raise for a request that can never run (context, lengths)."""
        check_context(len(request.prompt_ids), request.max_new_tokens, self.context)

    def submit(self, request: Request, on_event: Callable[[], None] | None = None) -> Handle:
        self.check(request)
        handle = Handle(request, on_event)
        with self._lock:
            if not self._running:
                raise SchedulerStopped("the scheduler is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    @property
    def running(self) -> bool:
        return self._running

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ worker side

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch:
            handle = self._waiting[0]
            if handle.cancelled.is_set():
                self._waiting.pop(0)
                handle._put(_DONE)
                continue
            cache = self.pool.acquire(handle.request.prompt_ids)
            if cache is None:
                return
            self._waiting.pop(0)
            r = handle.request
            try:
                gen = Generation(self.model, self.tokenizer, r.prompt_ids, r.params, r.max_new_tokens, r.stop, cache,
                                 self.context, r.enable_thinking, r.thinking_budget,
                                 r.constraint() if r.constraint is not None else None, r.top_logprobs)
            except Exception as e:  # bad request parts found late (e.g. a schema): fail only this one
                self.pool.release(cache)
                self._finish(handle, None, e)
                continue
            gen.t0 = handle.submitted  # time to first token counts the wait in the queue
            self._active.append(_Active(handle, gen))

    def _finish(self, handle: Handle, last: GenerationChunk | None, error: BaseException | None) -> None:
        if error is not None:
            handle._put(error)
        handle._put(_DONE)
        if self.on_finish is not None:
            self.on_finish(handle, last, error)

    def _drop(self, item: _Active, last: GenerationChunk | None = None, error: BaseException | None = None) -> None:
        self._active.remove(item)
        self.pool.release(item.gen.seq.cache)
        self._finish(item.handle, last, error)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while self._running and not self._waiting and not self._active:
                        self._lock.wait()
                    if not self._running:
                        return
                    for item in [a for a in self._active if a.handle.cancelled.is_set()]:
                        self._drop(item)
                    self._admit()
                    active = list(self._active)
                self._work(active)

    def _work(self, active: list[_Active]) -> None:
        prefilling = [a for a in active if not a.gen.seq.prefilled]
        if prefilling:  # one chunk of the oldest waiting prompt per turn
            item = prefilling[0]
            try:
                if item.gen.seq.prefill_step(self.prefill_chunk):
                    item.gen.prefill_done()
            except Exception as e:
                with self._lock:
                    self._drop(item, error=e)
                return
        ready = [a for a in active if a.gen.seq.prefilled and not a.handle.cancelled.is_set()]
        if not ready:
            return
        try:
            picked = step_batch([a.gen.seq for a in ready])
        except Exception as e:  # a failed step fails the requests in it, not the server
            with self._lock:
                for item in ready:
                    self._drop(item, error=e)
            return
        self.steps += 1
        for item, (token, logprob) in zip(ready, picked):
            try:
                chunk = item.gen.chunk(token, logprob)
            except Exception as e:
                with self._lock:
                    self._drop(item, error=e)
                continue
            item.handle._put(chunk)
            if item.gen.seq.finished:
                with self._lock:
                    self._drop(item, last=chunk)
