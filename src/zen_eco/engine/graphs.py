"""Decode steps recorded once as a CUDA graph and replayed for every token (and/or compiled).

At batch 1 a decode step of zen-eco-4b is ~2,000 small kernels. Launched one by one from Python the
GPU spends most of the step waiting for the next launch; a CUDA graph launches them all at once.

A graph replays fixed kernels on fixed addresses, so the recorded step must not depend on Python
values that change per token. `StaticStep` gives the model that view of a `KVCache`: the token and
its position live in device tensors that are refilled before each replay, K/V are written with
`index_copy_` at that position, and attention runs over the cache's whole allocated capacity with a
mask (positions after the current one, or outside a sliding window, masked) instead of a slice to the
valid length. The cache still grows in blocks; a growth moves its tensors, so the graph recorded for
the old capacity is dropped and a new one recorded (once per `block_size` tokens).

The static step applies to a batch-1 decode with a plain (unquantized) `KVCache`:
- on CUDA while `model.cuda_graphs` is on (the default; `zen_eco.load(cuda_graphs=False)`,
  `zen-eco bench --no-cuda-graphs` turn it off), recorded as a graph;
- with `model.compile_decode` (`zen_eco.load(compile=True)`, `--compile`), on any device, compiled by
  torch.compile first, which fuses the small elementwise kernels (and then recorded, on CUDA). On an
  H200 that took zen-eco-4b bf16 from 158 to 273 tok/s; compiling costs ~35 s per process (~8 s with
  inductor's on-disk cache warm), so it pays for a server or a long session, not a one-shot run
  (docs/benchmarks.md "GPU" and "torch.compile on the CPU"). The capacity is marked dynamic, so one
  compile serves every size the cache grows to.
Elsewhere `decode_one` is the ordinary forward. On the CPU without compile `DecodeGraph` runs the
static step eagerly (`record=False`), which is how the tests check it against the ordinary step.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..kv_cache import KVCache
from . import native_step


class StaticStep:
    """A KVCache as one recordable decode step sees it (the model's cache protocol for T = 1)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.position = torch.zeros(1, dtype=torch.long, device=cache.device)  # refilled before each step
        self.key_positions = torch.arange(cache.capacity, device=cache.device)[None, :]  # SDPA wants a 2-D mask
        self.first_keys = cache.keys[0]  # to notice when growth has moved the cache's tensors
        self._masks: dict[int | None, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return self.cache.length

    def begin(self) -> None:
        self._masks.clear()  # masks are computed inside the step, once per window size

    def reserve(self, new_tokens: int) -> None:
        pass  # DecodeGraph reserved room before the step

    def advance(self, n: int) -> None:
        pass  # ... and advances the cache after it

    def positions(self, new_tokens: int) -> torch.Tensor:
        return self.position

    def _mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            allowed = self.key_positions <= self.position
            if window is not None:
                allowed = allowed & (self.key_positions > self.position - window)
            self._masks[window] = allowed
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]  # (1, H_kv, capacity, D)
        keys.index_copy_(2, self.position, k.to(keys.dtype))
        values.index_copy_(2, self.position, v.to(values.dtype))
        if keys.dtype != q.dtype:  # bf16 rows under a float32 model (Transformer.kv_dtype)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        h_kv, d = keys.shape[1], keys.shape[3]
        out = F.scaled_dot_product_attention(q.view(1, h_kv, -1, d), keys, values, attn_mask=self._mask(window),
                                             scale=scale)
        return out.reshape(1, -1, d)


class DecodeGraph:
    """One sequence's decode step over `cache`, recorded as a CUDA graph (`record=True`) or run eagerly
    through the same static code (`record=False`). `graph(token)` runs `token` at the cache's next
    position and returns the (1, 1, vocab) float32 logits; the tensor is reused by the next call."""

    def __init__(self, model, cache: KVCache, record: bool = True, compile: bool = False) -> None:
        self.model, self.cache = model, cache
        # compile: the step through torch.compile first (fuses its small elementwise kernels; costs
        # one compile per process, see docs/benchmarks.md "GPU")
        self.forward = compiled(model) if compile else model
        self.record = record and cache.device.type == "cuda"
        self.tokens = torch.zeros((1, 1), dtype=torch.long, device=cache.device)
        self.step: StaticStep | None = None
        self.graph = None
        self.logits: torch.Tensor | None = None
        self.prepared = 0  # steps prepared (graphs recorded, on CUDA): one per capacity the cache grew to

    def _run(self) -> torch.Tensor:
        self.step.begin()
        return self.forward(self.tokens, self.step)

    def _prepare(self) -> None:
        """A step (and graph) for the cache's current tensors."""
        self.graph = self.logits = None  # drop the old graph before its tensors can be reused
        self.step = StaticStep(self.cache)
        self.step.position.fill_(self.cache.length)
        self.prepared += 1
        if self.forward is not self.model:  # compiled: one compile serves every capacity
            for t in [self.step.key_positions, *self.cache.keys, *self.cache.values]:
                torch._dynamo.mark_dynamic(t, t.dim() - 1 if t.dim() == 2 else 2)
        if not self.record:
            return
        # Warm up on a side stream (cuBLAS workspaces, lazy inits), then record. The warm-up writes the
        # same K/V at the same position as the replay that follows, so running it twice is harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Each recording gets a memory pool of its own (torch's default): the old graph's pool is freed
        # only once the caller drops the logits it returned, and recording into it meanwhile fails.
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def __call__(self, token: int) -> torch.Tensor:
        cache = self.cache
        cache.reserve(1)
        self.tokens.fill_(token)
        if self.step is None or self.step.first_keys is not cache.keys[0]:
            self._prepare()  # first step, or the cache grew (its tensors moved)
        self.step.position.fill_(cache.length)
        if self.graph is None:
            logits = self._run()
        else:
            self.graph.replay()
            logits = self.logits
        cache.advance(1)
        return logits


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its compiled wrapper


def compiled(model):
    """`model` through torch.compile, made once per model (kept beside it, not on it: as an attribute
    the wrapper would become a submodule that contains the model). The decode step's shapes are fixed
    except the cache capacity, which `DecodeGraph` marks dynamic, so one compile serves a whole session."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, fullgraph=True)
    return _COMPILED[model]


def graphs_apply(model, cache) -> bool:
    """Whether a decode step of `model` over `cache` takes the static step: recorded as a CUDA graph
    (on CUDA, `model.cuda_graphs`) and/or compiled (`model.compile_decode`, any device)."""
    if type(cache) is not KVCache or cache.batch_size != 1:
        return False
    return (cache.device.type == "cuda" and getattr(model, "cuda_graphs", False)) or getattr(model, "compile_decode", False)


def decode_one(model, cache: KVCache, token: int) -> torch.Tensor:
    """Run one token after what `cache` holds: (1, 1, vocab) float32 logits. The static step where
    `graphs_apply`, else the whole step in C where `native_step.applies` (CPU), else the model's
    ordinary forward."""
    if not graphs_apply(model, cache):
        if native_step.applies(model, cache):
            return native_step.native_step(model).step(cache, token)
        return model(torch.tensor([[token]], device=model.device), cache)
    graph = cache.decode_graph
    record, compile = getattr(model, "cuda_graphs", False), getattr(model, "compile_decode", False)
    if (graph is None or graph.model is not model or (graph.forward is not model) != compile
            or graph.record != (record and cache.device.type == "cuda")):
        graph = cache.decode_graph = DecodeGraph(model, cache, record=record, compile=compile)
    return graph(token)
