"""Batch-1 CPU decode steps through `decode_kernel`: the whole step in one C call.

`NativeStep(model)` describes the model to the C code once (pointers to its weights, float32 copies of
its norm scales and biases), then each `step(cache, token)` embeds the token (the model's own
`embed_tokens`), looks up the RoPE rows for its position, and runs every layer and the head in C,
writing K/V into the cache's own tensors. A quantized KV cache (kv_quant) is one call too
(`zen_decode_step_kvq`): the new token's K/V go into its unquantized window (or, int8, are quantized
as one row) and kv_kernel attends its sink, pages and window from C, as the cache's own `attend`
would. A step whose write moves a key group out of the window (once per group) calls C twice per
layer around the cache's `write`/`attend` instead, which quantize the group. `decode_one` takes this
path wherever `applies` says so; everything else (prompts, batched steps, CUDA, unsupported weight
kinds) stays on the model's forward.
`Transformer.native_step = False` (`zen_eco.load(native_step=False)`, `zen-eco bench --no-native-step`,
or the environment's ZEN_ECO_NATIVE_STEP=0) turns it off.
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn

from .. import decode_kernel as dk
from .. import kv_kernel, kv_quant
from ..kv_cache import KVCache
from ..kv_quant import QuantizedKVCache
from .. import kquant_kernel, q4_kernel
from ..quant import Int4Linear, Int8BlockLinear, Int8Linear, KQuantLinear, StackedLinear
from ..rope import rope_cos_sin

ROPE_ROWS = 256  # positions whose cos/sin rows are computed at a time


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class NativeStep:
    def __init__(self, model) -> None:
        cfg = model.config
        self.model, self.lib = model, dk.library()
        self._keep: list[torch.Tensor] = []  # everything the descriptors point into
        self._keep_parts: list[dk.Linear] = []  # StackedLinear parts' descriptors, chained by their `next`
        layers = (dk.Layer * cfg.num_hidden_layers)()
        for i, block in enumerate(model.layers):
            a, mlp = block.attn, block.mlp
            layers[i] = dk.Layer(
                self._linear(a.wqkv), self._linear(a.wo), self._linear(mlp.w_gate_up), self._linear(mlp.w_down),
                self._norm(block.attn_norm), self._norm(block.attn_post_norm), self._norm(block.mlp_norm),
                self._norm(block.mlp_post_norm), self._norm(a.q_norm), self._norm(a.k_norm),
                a.window or 0, int(a.window is not None and model.local_rope))
        self.layers = layers
        scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim**-0.5
        self.desc = dk.Model(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                             cfg.head_dim, cfg.intermediate_size, int(cfg.hidden_act == "gelu_pytorch_tanh"),
                             int(_plain_cache_dtype(model) == torch.bfloat16), cfg.rms_norm_eps, scale,
                             cfg.final_logit_softcapping or 0.0, layers, self._norm(model.norm),
                             self._linear(model.lm_head))
        self._rope: dict[bool, tuple[int, torch.Tensor]] = {}  # local? -> (first position, its table)
        self._pointers: "weakref.WeakKeyDictionary[KVCache, tuple]" = weakref.WeakKeyDictionary()
        self._kvq_held: "weakref.WeakKeyDictionary[QuantizedKVCache, tuple]" = weakref.WeakKeyDictionary()

    @staticmethod
    def unsupported(model) -> str | None:
        """Why `model` cannot take this path (None: it can)."""
        if dk.library() is None:
            return "the native decode step is not built here (no C compiler, or turned off)"
        if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
            return f"runs on the CPU in float32 or bfloat16, not {model.device.type} {model.dtype}"
        if model.config.head_dim > dk.MAX_HEAD_DIM or model.config.head_dim % 2:
            return f"head_dim {model.config.head_dim} not supported"
        for name, mod in model.named_modules():
            if isinstance(mod, (Int4Linear, Int8Linear, Int8BlockLinear, KQuantLinear)) and mod.backend != "native":
                return f"{name}: {type(mod).__name__} backend {mod.backend!r}"
            if type(mod) is nn.Linear and mod.weight.dtype not in (torch.float32, torch.bfloat16):
                return f"{name}: dense weights in {mod.weight.dtype}"
        return None

    def _norm(self, norm) -> int | None:
        if norm is None:
            return None
        w = norm.weight.detach().float()
        w = (1.0 + w if norm.unit_offset else w).contiguous()
        self._keep.append(w)
        return w.data_ptr()

    def _linear(self, mod) -> dk.Linear:
        if isinstance(mod, StackedLinear):  # each part's descriptor points to the next's
            parts = [self._linear(p) for p in mod.parts]
            for part, after in zip(parts, parts[1:]):
                part.next = ctypes.pointer(after)
            self._keep_parts.extend(parts)
            return parts[0]
        bias = _f32(getattr(mod, "bias", None))
        if bias is not None:
            self._keep.append(bias)
        bias_ptr = None if bias is None else bias.data_ptr()
        if isinstance(mod, Int4Linear):
            group = q4_kernel.group_arg(mod.group_size, mod.scale_zero)
            return dk.Linear(dk.LIN_Q4, mod.out_features, mod.in_features, group, mod.packed.data_ptr(),
                             mod.scale_zero.data_ptr(), bias_ptr, None if mod.high is None else mod.high.data_ptr())
        if isinstance(mod, Int8Linear):
            return dk.Linear(dk.LIN_Q8, mod.out_features, mod.in_features, 0, mod.codes.data_ptr(),
                             mod.scales_f32.data_ptr(), bias_ptr)
        if isinstance(mod, KQuantLinear):
            return dk.Linear(dk.LIN_KQ, mod.out_features, mod.in_features, kquant_kernel.KINDS[mod.kind],
                             mod.packed.data_ptr(), mod.sub_scales.data_ptr(), bias_ptr, mod.high.data_ptr(), None,
                             mod.d.data_ptr())
        if isinstance(mod, Int8BlockLinear):
            return dk.Linear(dk.LIN_Q8B, mod.out_features, mod.in_features, mod.block_flags, mod.codes.data_ptr(),
                             mod.block_scales.data_ptr(), bias_ptr)
        w = mod.weight.detach()
        if not w.is_contiguous():
            w = w.contiguous()
            self._keep.append(w)
        kind = dk.LIN_BF16 if w.dtype == torch.bfloat16 else dk.LIN_F32
        return dk.Linear(kind, w.shape[0], w.shape[1], 0, w.data_ptr(), None, bias_ptr)

    def _rope_row(self, local: bool, pos: int) -> int:
        """Address of the (cos, sin) float32 rows for `pos`, computed ROPE_ROWS positions at a time. Only
        the latest table is kept (decode moves forward): a 160K-token session would otherwise hold
        640 tables, ~160 MB."""
        start = pos // ROPE_ROWS * ROPE_ROWS
        held = self._rope.get(local)
        if held is None or held[0] != start:
            m = self.model
            inv_freq, scaling = (m.inv_freq_local, m.local_attention_scaling) if local else (m.inv_freq, m.attention_scaling)
            cos, sin = rope_cos_sin(inv_freq, scaling, torch.arange(start, start + ROPE_ROWS), torch.float32)
            held = self._rope[local] = (start, torch.stack([cos, sin], 1).contiguous())  # (ROPE_ROWS, 2, head_dim)
        return held[1][pos - start].data_ptr()

    def _kv_pointers(self, cache: KVCache):
        held = self._pointers.get(cache)
        if held is None or held[0] is not cache.keys[0]:  # first step, or the cache grew (its tensors moved)
            ptrs = [t.data_ptr() for pair in zip(cache.keys, cache.values) for t in pair]
            held = self._pointers[cache] = (cache.keys[0], (ctypes.c_void_p * len(ptrs))(*ptrs))
        return held[1]

    def _one_call(self, cache: QuantizedKVCache, pos: int) -> bool:
        """Whether this step over a quantized cache runs as one call (zen_decode_step_kvq): the kernel
        attends every segment and writing the token quantizes nothing in bulk (a key group leaving the
        window, once per group, takes the two-call path)."""
        rep = self.model.config.num_attention_heads // cache.num_kv_heads
        if not cache._native(rep) or ((cache.sink or cache.res_k) and not cache._native_plain(rep)):
            return False
        if cache.res_k:
            return cache._qlen_for(pos + 1) == cache.qlen
        return cache.key_codec.bits == 8 and cache.key_codec.group == cache.head_dim and cache.qlen == pos

    def _kvq(self, cache: QuantizedKVCache) -> dk.KVQ:
        """The cache's descriptor for zen_decode_step_kvq, rebuilt when its pages were (re)allocated."""
        key = tuple(cache.page_caps)
        held = self._kvq_held.get(cache)
        if held is not None and held[0] == key:
            return held[1]
        # The structures hold copies of the sides (whose tensors the cache keeps) and pointers to the
        # page arrays, which must live as long as the descriptor.
        none = kv_kernel.Side()
        layers, page_arrays = (dk.KVQLayer * cache.num_layers)(), []
        for i in range(cache.num_layers):
            pages = (kv_kernel.Side * (2 * len(cache.pages)))(*(s for p in range(len(cache.pages))
                                                                for s in cache._side(p, i)))
            sink = [kv_kernel.plain_side(t[i]) for t in (cache.sink_k, cache.sink_v)] if cache.sink_k else [none, none]
            window = [kv_kernel.plain_side(t[i]) for t in (cache.res_k, cache.res_v)] if cache.res_k else [none, none]
            layers[i] = dk.KVQLayer(pages, (kv_kernel.Side * 2)(*sink), (kv_kernel.Side * 2)(*window))
            page_arrays.append(pages)
        attend = ctypes.cast(kv_kernel.library().zen_kv_attend, ctypes.c_void_p).value
        kvq = dk.KVQ(attend, layers, cache.sink, cache.qlen, kv_quant.PAGE_TOKENS, len(cache.pages))
        kvq._keep = (layers, page_arrays)
        self._kvq_held[cache] = (key, kvq)
        return kvq

    @torch.inference_mode()
    def step(self, cache: KVCache, token: int) -> torch.Tensor:
        """(1, 1, vocab) float32 logits of `token` after what `cache` holds; K/V written, cache advanced.
        A plain cache: the whole step in one call. A quantized one (kv_quant): two calls per layer with
        the cache's own `attend` between them (its codes, pages and residual window stay its business)."""
        model = self.model
        cache.reserve(1)
        pos = cache.length
        x = model.embed_tokens(torch.tensor([[token]])).contiguous()
        logits = torch.empty(1, 1, model.config.vocab_size)
        glob = self._rope_row(False, pos)
        local = self._rope_row(True, pos) if model.local_rope else glob
        desc, threads = ctypes.byref(self.desc), torch.get_num_threads()
        if type(cache) is KVCache:
            _check(self.lib.zen_decode_step(desc, x.data_ptr(), pos, glob, local, self._kv_pointers(cache),
                                            cache.capacity, logits.data_ptr(), threads))
        elif self._one_call(cache, pos):
            kvq = self._kvq(cache)
            kvq.qlen = cache.qlen
            _check(self.lib.zen_decode_step_kvq(desc, x.data_ptr(), pos, glob, local, ctypes.byref(kvq),
                                                logits.data_ptr(), threads))
        else:
            cfg = model.config
            h, h_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            qkv = torch.empty((h + 2 * h_kv) * d)
            q, k, v = qkv.split((h * d, h_kv * d, h_kv * d))
            att = torch.empty(h * d)
            for i, layer in enumerate(model.layers):
                a = layer.attn
                _check(self.lib.zen_decode_attn_inputs(desc, i, x.data_ptr(), local if a.window is not None else glob,
                                                       qkv.data_ptr(), threads))
                out = cache.attend(i, q.view(1, h, 1, d), k.view(1, h_kv, 1, d), v.view(1, h_kv, 1, d), a.scale,
                                   a.window)
                att.copy_(out.reshape(-1))
                _check(self.lib.zen_decode_attn_outputs(desc, i, x.data_ptr(), att.data_ptr(), threads))
            _check(self.lib.zen_decode_head(desc, x.data_ptr(), logits.data_ptr(), threads))
        cache.advance(1)
        return logits


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("native decode step: out of memory") if rc == -1 else RuntimeError(
            f"native decode step refused the model's shapes (code {rc})")


_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (weights key, NativeStep or None)


def _main_tensor(mod) -> torch.Tensor:
    if isinstance(mod, StackedLinear):
        return _main_tensor(mod.parts[0])
    for name in ("weight", "packed", "codes"):
        t = getattr(mod, name, None)
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"{type(mod).__name__} holds no weight tensor")


def _weights_key(model) -> tuple:
    """The dtype and the addresses of a few of the model's tensors: a new key means its weights were
    replaced (`.to()`, new modules...), so the descriptors are rebuilt, not followed into freed memory."""
    mods = (model.norm, model.lm_head, model.layers[0].attn.wqkv, model.layers[-1].mlp.w_down)
    return (model.dtype, _plain_cache_dtype(model), *(_main_tensor(m).data_ptr() for m in mods))


def _plain_cache_dtype(model) -> torch.dtype:
    """The rows of the model's plain caches (Transformer.kv_dtype); a quantized cache's plain rows (sinks,
    window) are in the model's dtype."""
    return getattr(model, "kv_dtype", None) or model.dtype


def applies(model, cache) -> bool:
    """Whether a decode step of `model` over `cache` runs as one C call."""
    if not getattr(model, "native_step", False) or type(cache) not in (KVCache, QuantizedKVCache):
        return False
    if cache.batch_size != 1:
        return False
    rows = _plain_cache_dtype(model) if type(cache) is KVCache else model.dtype
    if cache.device.type != "cpu" or cache.dtype != rows:
        return False
    key = _weights_key(model)
    held = _STEPS.get(model)
    if held is None or held[0] != key:
        held = _STEPS[model] = (key, None if NativeStep.unsupported(model) else NativeStep(model))
    return held[1] is not None


def native_step(model) -> NativeStep:
    """The model's step, as `applies` last built it."""
    return _STEPS[model][1]
