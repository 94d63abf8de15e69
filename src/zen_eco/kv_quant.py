"""Quantized KV caches: the formats behind `kv_cache="bf16" | "int8" | "int4" | "int2"`.

| format | keys | values | bytes per position and head (head_dim 128, K + V) |
|---|---|---|---|
| bf16 | the model's dtype (a plain `KVCache`) | same | 512 in bf16 |
| int8 | symmetric, one scale per (token, head) | same | 260 |
| int4 | 4-bit, asymmetric, one (scale, min) per channel and 128 tokens | 4-bit, asymmetric, one (scale, min) per 32 channels of a token | 148 |
| k4v2 | as int4 | as int2 | 116 |
| int2 | 2-bit, asymmetric, one (scale, min) per channel and 32 tokens | as int4, 2-bit | 96 |

Scales and minimums are float16; value = code * scale + min. int4 and int2 follow KIVI (Liu et al.
2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys have outlier *channels*,
so they are quantized along tokens, one (scale, min) per channel and group of G tokens (int4 128,
int2 32, KIVI-2's own G); values per token. Since a key group needs G tokens, the newest tokens (at
least `residual` = 128, fewer than 128 + G) wait unquantized in the model's dtype and are quantized a
group at a time when they leave that window — which also keeps the most recent context at full
precision. k4v2 mixes the two because keys carry most of the error: on SmolLM2, 2-bit keys with 4-bit
values cost about what int2 does, 4-bit keys with 2-bit values a tenth of its KL (docs/benchmarks.md). Every quantized format also
keeps the first `SINK_TOKENS` (128) positions unquantized: the attention sinks (the first tokens,
which most heads attend to heavily; KVQuant and IntactKV keep them exact too), 19 MB for zen-eco-4b.

Storage is paged: each layer's codes live in pages of `PAGE_TOKENS` positions, and only the last
page grows (in `block_size` steps, one layer at a time). Growing never copies the whole cache, so
at 160K tokens peak memory is the cache plus one layer's page, not twice the cache.

Attention never holds a dequantized copy of the cache. A decode step (`attend`) runs the C kernel
of `kv_kernel` (codes read once, online softmax; the unquantized sink and window rows too, so the
softmax merges happen there rather than as per-layer tensor ops) or, where it is unavailable, works
through `ATTEND_CHUNK` positions at a time and merges the chunks' softmaxes by log-sum-exp. Both
compute decode attention in integers: for the KIVI formats per key group the query times the channel
scales rounded to int8 (`QUERY_BLOCK` channels per scale) against the key codes, for int8 the query
rounded to int8 per 4 channels against each row (`_key_scores`, `_row_key_scores`); per block of
`VALUE_BLOCK` positions the softmax weights times the value scales rounded to uint8 (per query and
value group) against the value codes (`_merge_blocks`). What the rounding costs, per
format and change (KL against the fp32 cache, SmolLM2 and Gemma-3): docs/benchmarks.md. For that the codes are stored interleaved (`Codec.store`) and the value scales
group-major per `SCALE_TILE` tokens. A prefill (`update`) returns the valid range dequantized
(transient, one layer) for SDPA. Every token, the new ones included, is attended through its stored
codes, so a prefill equals the decode steps it replaces up to that rounding, and a reused prefix gives
what recomputing it would (int2: up to which key groups are quantized when, as the residual window moves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kv_kernel
from .errors import ConfigError
from .kv_cache import KVCache

KV_FORMATS = ("bf16", "int8", "int4", "k4v2", "int2")
PAGE_TOKENS = 16384  # positions per page: one kernel call per page and layer; growth copies one page
ATTEND_CHUNK = 4096  # positions dequantized at once by the PyTorch path (~16 MB of float32 per 8 heads)
# int4 is KIVI's layout at 4 bits: per-token 4-bit keys (groups of 32 channels) cost SmolLM2 a KL of
# 0.042 against the fp32 cache, per-channel ones ~10x less (docs/benchmarks.md, "Long context: KV cache formats").
INT4_KEY_GROUP = 128  # tokens per (scale, min) of a key channel
INT4_VALUE_GROUP = 32  # channels per (scale, min) of a value token
INT4_RESIDUAL = 128
INT2_KEY_GROUP = 32  # tokens per (scale, min) of a key channel (KIVI's G; 128 tokens cost SmolLM2 3x the KL)
INT2_VALUE_GROUP = 32  # channels per (scale, min) of a value token
INT2_RESIDUAL = 128  # newest tokens always kept unquantized (KIVI's R)
KEY_TILE, VALUE_TILE = 16, 4  # tokens interleaved in storage (see Codec); key groups and `flush` are multiples
SCALE_TILE = 32  # value scales stored group-major per 32 tokens (int2's flush, the smallest)
# Decode attention over the KIVI formats' codes is integer arithmetic (the kernel's VNNI dot products):
QUERY_BLOCK = 32  # channels per int8 scale of (query x key scale) against 4-/2-bit key codes
VALUE_BLOCK = 64  # positions per uint8 scale of (softmax weight x value scale) against value codes
SINK_TOKENS = 128  # first tokens kept unquantized by every format: the attention sinks (one key group)
SCALE_DTYPE = torch.float16


def check_kv_format(kv_format: str | None) -> str:
    """The format name ("bf16" for None), or ConfigError naming the valid ones."""
    fmt = "bf16" if kv_format is None else str(kv_format).strip().lower()
    if fmt not in KV_FORMATS:
        raise ConfigError(f"unknown KV cache format {kv_format!r}; use one of {', '.join(KV_FORMATS)}")
    return fmt


# --------------------------------------------------------------------------- codes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) uint8 codes < 2**bits -> (..., D * bits / 8) bytes, by planes: byte i holds column
    i + j * D/n in bits [j * bits, (j + 1) * bits), n = 8 / bits (the kernel unpacks with plain loops)."""
    n = 8 // bits
    planes = codes.unflatten(-1, (n, codes.shape[-1] // n))
    out = planes[..., 0, :].clone()
    for j in range(1, n):
        out |= planes[..., j, :] << (j * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (..., D * bits / 8) bytes -> (..., D) uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-2) >> shifts[:, None]) & (2**bits - 1)).flatten(-2)


def interleave(codes: torch.Tensor, tile: int, lane: int) -> torch.Tensor:
    """(..., T, D) codes -> (..., T / tile, tile * D) in the order the kernel's 32-bit lanes take them:
    per tile of `tile` tokens, for each run of `lane` channels, each token's `lane` codes."""
    T, D = codes.shape[-2:]
    x = codes.unflatten(-1, (D // lane, lane)).unflatten(-3, (T // tile, tile))  # (..., T/tile, tile, D/lane, lane)
    return x.transpose(-3, -2).flatten(-3)


def deinterleave(rows: torch.Tensor, tile: int, lane: int) -> torch.Tensor:
    """Inverse of `interleave`: (..., T / tile, tile * D) -> (..., T, D)."""
    D = rows.shape[-1] // tile
    x = rows.unflatten(-1, (D // lane, tile, lane))  # (..., T/tile, D/lane, tile, lane)
    return x.transpose(-3, -2).flatten(-2).flatten(-3, -2)


@dataclass(frozen=True)
class Codec:
    """How one of K or V is stored: `bits`-bit codes, one (scale, min) per `group` channels of a
    token, or with `per_channel` per `group` tokens of a channel. `symmetric` (8 bits only): signed
    codes, value = code * scale.

    `tile` > 1 (the KIVI formats, whose positions are stored `flush` tokens at a time): codes are
    interleaved over tiles of `tile` tokens before packing by planes, so that the kernel's integer dot
    products find them in 32-bit lanes: keys (tile 16, `lane` 4): a lane is one token's codes of 4
    channels, 16 tokens per 512-bit vector, dotted with 4 int8 query channels; values (tile 4, lane 1):
    a lane is 4 tokens' codes of one channel, dotted with their 4 uint8 softmax weights."""

    bits: int
    group: int
    per_channel: bool = False
    symmetric: bool = False
    tile: int = 1
    scale_tile: int = 1  # per-token scales: stored group-major over tiles of this many tokens (kernel loads)

    @property
    def lane(self) -> int:
        return 4 if self.per_channel else 1

    def store(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., T, D) uint8/int8 codes -> (..., T, row_bytes) as stored (T a multiple of `tile`)."""
        if self.bits == 8:
            return codes
        if self.tile == 1:
            return pack(codes, self.bits)
        T, D = codes.shape[-2:]
        return pack(interleave(codes, self.tile, self.lane), self.bits).reshape(codes.shape[:-2] + (T, self.row_bytes(D)))

    @property
    def unit(self) -> int:
        """Stored positions come in whole units of this many (key groups; value tiles)."""
        return self.group if self.per_channel else math.lcm(self.tile, self.scale_tile)

    def store_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token (..., T, D / group) scales or minimums -> as stored (same shape; T a multiple of
        `scale_tile`): each tile of `scale_tile` tokens group-major, so a group's run is contiguous."""
        if self.scale_tile == 1:
            return x
        return x.unflatten(-2, (-1, self.scale_tile)).transpose(-1, -2).reshape(x.shape)

    def load_scale(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of `store_scale`."""
        if self.scale_tile == 1:
            return stored
        G = stored.shape[-1]
        return stored.flatten(-2).unflatten(-1, (-1, G, self.scale_tile)).transpose(-1, -2).reshape(stored.shape)

    def load(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of `store`: (..., T, row_bytes) -> (..., T, D) codes (T a multiple of `tile`)."""
        if self.bits == 8:
            return stored
        if self.tile == 1:
            return unpack(stored, self.bits)
        T = stored.shape[-2]
        rows = unpack(stored.reshape(stored.shape[:-2] + (T // self.tile, self.tile * stored.shape[-1])), self.bits)
        return deinterleave(rows, self.tile, self.lane)

    @property
    def qmax(self) -> int:
        return 127 if self.symmetric else 2**self.bits - 1

    def row_bytes(self, dim: int) -> int:
        return dim * self.bits // 8

    def bytes_per_token(self, dim: int) -> float:
        """Codes plus float16 scales (and minimums) per position of one head."""
        return self.row_bytes(dim) + (1 if self.symmetric else 2) * 2 * dim / self.group

    def scale_shape(self, tokens: int, dim: int) -> tuple[int, int]:
        """(rows, columns) of scales for `tokens` positions."""
        return (-(-tokens // self.group), dim) if self.per_channel else (tokens, dim // self.group)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (..., T, D) float (T a multiple of `group` when per_channel) -> (codes, scale, min)."""
        x = x.float()
        T, D = x.shape[-2:]
        # groups: (..., rows, members, cols) per channel; (..., T, D/g, g) per token, reduced over the last axis
        g = x.unflatten(-2, (T // self.group, self.group)) if self.per_channel else x.unflatten(-1, (D // self.group, self.group))
        axis = -2 if self.per_channel else -1
        if self.symmetric:
            scale = (g.abs().amax(axis) / self.qmax).to(SCALE_DTYPE)
            s = scale.float().unsqueeze(axis)
            codes = torch.round(g / torch.where(s > 0, s, 1.0)).clamp_(-self.qmax, self.qmax).to(torch.int8)
            return codes.reshape(x.shape), scale, None
        lo, hi = g.amin(axis), g.amax(axis)
        scale, zero = ((hi - lo) / self.qmax).to(SCALE_DTYPE), lo.to(SCALE_DTYPE)
        s, z = scale.float().unsqueeze(axis), zero.float().unsqueeze(axis)
        codes = torch.round((g - z) / torch.where(s > 0, s, 1.0)).clamp_(0, self.qmax).to(torch.uint8)
        return self.store(codes.reshape(x.shape)), scale, zero

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes, scale, min) of T positions -> (..., T, D) in `dtype` (computed in float32)."""
        c = self.load(codes).float()
        T, D = c.shape[-2:]
        if self.per_channel:  # the last group may be partial (the scale rows cover ceil(T / group))
            s = scale.float().repeat_interleave(self.group, dim=-2)[..., :T, :]
            z = 0.0 if zero is None else zero.float().repeat_interleave(self.group, dim=-2)[..., :T, :]
            return (c * s + z).to(dtype)
        c = c.unflatten(-1, (D // self.group, self.group))
        z = 0.0 if zero is None else zero.float()[..., None]
        return (c * scale.float()[..., None] + z).flatten(-2).to(dtype)


def _round(x: torch.Tensor, qmax: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x rounded to integers in [-qmax, qmax] (integer-valued floats) on one scale per slice along
    `dim`, and those scales (amax / qmax, keepdim): x ~ codes * scale. The kernel computes the same."""
    amax = x.abs().amax(dim, keepdim=True)
    return torch.round(x * torch.where(amax > 0, qmax / amax, 0.0)), amax / qmax


def _key_scores(codec: Codec, qf: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Scores of queries qf (N, R, D) against per-channel key codes k (N, T, D) (integer-valued floats,
    whole key groups from a group boundary) with their (scale, min) rows (N, T / group, D): per group,
    q * scale rounded to int8 per QUERY_BLOCK channels, dotted with the codes, plus q . min."""
    N, T, D = k.shape
    B = math.gcd(QUERY_BLOCK, D)  # small heads (16): one scale for all channels
    qs = qf[:, :, None, :] * scale.float()[:, None]  # (N, R, G, D)
    q8, s = _round(qs.unflatten(-1, (D // B, B)), 127, -1)  # (N, R, G, D/B, B), (.., 1)
    ints = torch.einsum("nrgkb,ngtkb->nrgtk", q8, k.unflatten(1, (-1, codec.group)).unflatten(-1, (D // B, B)))
    scores = (ints * s.squeeze(-1)[:, :, :, None, :]).sum(-1)  # (N, R, G, group)
    scores = scores + (qf[:, :, None, :] * zero.float()[:, None]).sum(-1)[..., None]
    return scores.flatten(2)


def _row_key_scores(qf: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Scores of queries qf (N, R, D) against int8 rows k (N, T, D) (integer-valued floats) with their
    per-row scales (N, T): q rounded to int8 per 4 channels (a scale each), dotted with the codes,
    times the row's scale."""
    N, R, D = qf.shape
    q8, s = _round(qf.unflatten(-1, (D // 4, 4)), 127, -1)  # (N, R, D/4, 4), (N, R, D/4, 1)
    ints = torch.einsum("nrlc,ntlc->nrtl", q8, k.unflatten(-1, (D // 4, 4)))
    return (ints * s.squeeze(-1)[:, :, None, :]).sum(-1) * scale[:, None, :]


def _merge_blocks(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor, v: torch.Tensor,
                  scale: torch.Tensor, zero: torch.Tensor, start: int) -> None:
    """Fold positions [start, start + n) into the running softmax state (as `_merge`), values as codes
    v (N, n, D) with per-token (scale, min) (N, n, D / g): per block of VALUE_BLOCK positions (aligned to
    multiples of it), exp(score - block max) * scale rounded to uint8 per (query, block, value group),
    dotted with the codes; plus exp(score - block max) * min."""
    N, R, n = scores.shape
    B, G = VALUE_BLOCK, scale.shape[-1]
    left = start % B
    right = -(left + n) % B
    pad = torch.nn.functional.pad
    x = pad(scores, (left, right), value=-math.inf).unflatten(-1, (-1, B))  # (N, R, nb, B)
    mb = x.amax(-1)  # every block holds at least one position
    p = torch.exp(x - mb[..., None])
    sc = pad(scale.float(), (0, 0, left, right)).unflatten(1, (-1, B))  # (N, nb, B, G)
    zr = pad(zero.float(), (0, 0, left, right)).unflatten(1, (-1, B))
    w8, ws = _round(p[..., None] * sc[:, None], 255, -2)  # (N, R, nb, B, G), (N, R, nb, 1, G)
    codes = pad(v, (0, 0, left, right)).unflatten(1, (-1, B)).unflatten(-1, (G, -1))  # (N, nb, B, G, D/G)
    out = torch.einsum("nrbtg,nbtgc->nrbgc", w8, codes) * ws.squeeze(-2)[..., None]
    out = (out + torch.einsum("nrbt,nbtg->nrbg", p, zr)[..., None]).flatten(-2)  # (N, R, nb, D)
    m_new = torch.maximum(m, mb.amax(-1))
    f, corr = torch.exp(mb - m_new[..., None]), torch.exp(m - m_new)  # corr 0 while nothing was merged
    l.mul_(corr).add_((p.sum(-1) * f).sum(-1))
    acc.mul_(corr[..., None]).add_((out * f[..., None]).sum(-2))
    m.copy_(m_new)


def _merge(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor, v: torch.Tensor) -> None:
    """Fold a chunk (scores (N, R, n), values (N, n, D)) into the running softmax state, in place:
    m the running max, l the sum of exp(score - m), acc the sum of exp(score - m) * value."""
    m_new = torch.maximum(m, scores.amax(-1))
    p = torch.exp(scores - m_new[..., None])
    corr = torch.exp(m - m_new)  # 0 while nothing was merged (m = -inf)
    l.mul_(corr).add_(p.sum(-1))
    acc.mul_(corr[..., None]).add_(p @ v)
    m.copy_(m_new)


# --------------------------------------------------------------------------- the cache


class QuantizedKVCache(KVCache):
    """A KVCache whose positions [0, qlen) are stored as codes (`key_codec`, `value_codec`) and
    [qlen, length) unquantized in a small residual window (per-token formats: qlen == length).
    Same protocol as KVCache: reserve, update/attend per layer, advance, trim; `token_ids`, `owner`."""

    def __init__(self, key_codec: Codec, value_codec: Codec, residual: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, max_tokens: int, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", block_size: int = 256, kv_format: str = "",
                 sink: int = 0) -> None:
        for c in (key_codec, value_codec):
            if (not c.per_channel and head_dim % c.group) or head_dim % (8 // min(c.bits, 8)):
                raise ConfigError(f"head_dim {head_dim} does not split into {c.bits}-bit codes in groups of {c.group}")
        self.key_codec, self.value_codec, self.kv_format = key_codec, value_codec, kv_format
        # Quantization happens in steps of `flush` tokens (a key group) once `residual` newer ones exist.
        self.flush = key_codec.group if key_codec.per_channel else 1
        self.residual = residual
        if sink % self.flush:
            raise ConfigError(f"the unquantized first {sink} positions must be whole key groups of {self.flush}")
        self.sink = sink  # the first `sink` positions are also kept unquantized (attention sinks)
        self.qlen = 0
        self.pages: list[list[tuple]] = []  # pages[p][layer] = (k codes, k scale, k min, v codes, v scale, v min)
        self.page_caps: list[int] = []
        self._sides: dict[tuple, tuple] = {}  # kernel descriptors: (page, layer), rebuilt when a page is
        # reallocated; ("rows", 0 sink / 1 window, layer) for the unquantized rows
        self._kernel_ok: bool | None = None  # whether kv_kernel has this format (asked once)
        self._plain_ok: bool | None = None  # whether it has this head_dim for unquantized rows
        self.res_k: list[torch.Tensor] = []
        self.res_v: list[torch.Tensor] = []
        super().__init__(num_layers, num_kv_heads, head_dim, max_tokens, batch_size, dtype, device, block_size)
        if self.flush > 1 or residual:
            shape = (batch_size, num_kv_heads, residual + self.flush, head_dim)
            self.res_k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
            self.res_v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        shape = (batch_size, num_kv_heads, min(sink, max_tokens), head_dim)
        self.sink_k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers if sink else 0)]
        self.sink_v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers if sink else 0)]

    # ---- storage

    def _alloc(self, cap: int) -> tuple:
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        out = []
        for c in (self.key_codec, self.value_codec):
            rows = -(-cap // c.unit) * c.unit  # whole key groups (whole tiles), whole value tiles
            codes = torch.zeros(B, H, rows, c.row_bytes(D), dtype=torch.int8 if c.symmetric else torch.uint8,
                                device=self.device)
            rows, cols = c.scale_shape(-(-cap // VALUE_BLOCK) * VALUE_BLOCK if c.scale_tile > 1 else cap, D)
            scale = torch.zeros(B, H, rows, cols, dtype=SCALE_DTYPE, device=self.device)
            zero = None if c.symmetric else torch.zeros_like(scale)
            out += [codes, scale, zero]
        return tuple(out)

    def _grow_to(self, capacity: int) -> None:
        P = PAGE_TOKENS
        for p in range(-(-capacity // P)):
            cap = min(P, capacity - p * P)
            if p < len(self.pages) and self.page_caps[p] == cap:
                continue
            if p == len(self.pages):
                self.pages.append([None] * self.num_layers)
                self.page_caps.append(0)
            for layer in range(self.num_layers):  # one layer at a time: the transient copy is one layer's page
                new, old = self._alloc(cap), self.pages[p][layer]
                if old is not None:
                    for n, o in zip(new, old):
                        if n is not None:
                            rows = min(o.shape[2], n.shape[2])
                            n[:, :, :rows].copy_(o[:, :, :rows])
                self.pages[p][layer] = new
                self._sides.pop((p, layer), None)
            self.page_caps[p] = cap
        self.capacity = capacity

    def _segments(self, a: int, b: int, step: int | None = None):
        """(page, start, end) pieces of positions [a, b), page-relative, within one page and one aligned
        run of `step` (a multiple of the key groups and value blocks, so that none is split)."""
        step = step or PAGE_TOKENS
        while a < b:
            p, off = divmod(a, PAGE_TOKENS)
            n = min(b - a, PAGE_TOKENS - off, step - off % step)
            yield p, off, off + n
            a += n

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v (B, H, T, D) into positions [start, start + T) (whole key groups when per channel)."""
        for p, a, b in self._segments(start, start + k.shape[2]):
            i, j = p * PAGE_TOKENS + a - start, p * PAGE_TOKENS + b - start
            page = self.pages[p][layer]
            for c, x, (codes, scale, zero) in ((self.key_codec, k, page[:3]), (self.value_codec, v, page[3:])):
                qc, qs, qz = c.quantize(x[:, :, i:j])
                codes[:, :, a:b] = qc
                ra, rb = (a // c.group, -(-b // c.group)) if c.per_channel else (a, b)
                scale[:, :, ra:rb] = c.store_scale(qs)
                if zero is not None:
                    zero[:, :, ra:rb] = c.store_scale(qz)

    def _load(self, layer: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K, V (B, H, b - a, D) float32 of quantized positions [a, b) within one page."""
        p, off = divmod(a, PAGE_TOKENS)
        a, b = off, off + b - a
        page = self.pages[p][layer]
        out = []
        for c, (codes, scale, zero) in ((self.key_codec, page[:3]), (self.value_codec, page[3:])):
            lo, hi = a // c.unit * c.unit, -(-b // c.unit) * c.unit  # whole key groups, whole value tiles
            hi = min(hi, codes.shape[2])
            ra, rb = (lo // c.group, -(-hi // c.group)) if c.per_channel else (lo, hi)
            x = c.dequantize(codes[:, :, lo:hi], c.load_scale(scale[:, :, ra:rb]),
                             None if zero is None else c.load_scale(zero[:, :, ra:rb]))
            out.append(x[:, :, a - lo : b - lo])
        return out[0], out[1]

    def _qlen_for(self, length: int) -> int:
        """How many positions are quantized once the cache holds `length`."""
        if self.flush == 1 and not self.residual:
            return length
        return max(self.qlen, (length - self.residual) // self.flush * self.flush)

    # ---- the KVCache protocol

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, H_kv, T, D) at positions [length, length + T) without attending (`update`
        without its return value: filling a cache directly)."""
        start, end = self.length, self.length + k.shape[2]
        q0, q1 = self.qlen, self._qlen_for(end)
        if start < self.sink:
            n = min(end, self.sink) - start
            self.sink_k[layer][:, :, start : start + n] = k[:, :, :n]
            self.sink_v[layer][:, :, start : start + n] = v[:, :, :n]
        if not self.res_k:
            self._store(layer, start, k, v)
            return
        rk, rv = self.res_k[layer], self.res_v[layer]
        if q1 == q0:  # nothing leaves the window: the new rows go straight in
            rk[:, :, start - q0 : end - q0] = k
            rv[:, :, start - q0 : end - q0] = v
            return
        tail_k = torch.cat([rk[:, :, : start - q0], k.to(self.dtype)], dim=2)  # positions [q0, end)
        tail_v = torch.cat([rv[:, :, : start - q0], v.to(self.dtype)], dim=2)
        self._store(layer, q0, tail_k[:, :, : q1 - q0], tail_v[:, :, : q1 - q0])
        rk[:, :, : end - q1] = tail_k[:, :, q1 - q0 :]
        rv[:, :, : end - q1] = tail_v[:, :, q1 - q0 :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v and return the K, V of valid positions [first, length + T) (B, H_kv, length + T - first, D),
        dequantized into the model's dtype for one prefill call (transient: the cache keeps only codes; a
        sliding layer asks only for its window)."""
        self.write(layer, k, v)
        end = self.length + k.shape[2]
        q1 = self._qlen_for(end)
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        keys = torch.empty(B, H, end - first, D, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        S = min(self.sink, end)
        for p, a, b in self._segments(max(S, first), q1, ATTEND_CHUNK):
            pos = p * PAGE_TOKENS
            keys[:, :, pos + a - first : pos + b - first], values[:, :, pos + a - first : pos + b - first] = \
                self._load(layer, pos + a, pos + b)
        if self.res_k and end > max(q1, first):
            lo = max(q1, first)
            keys[:, :, lo - first :] = self.res_k[layer][:, :, lo - q1 : end - q1]
            values[:, :, lo - first :] = self.res_v[layer][:, :, lo - q1 : end - q1]
        if S > first:
            keys[:, :, : S - first] = self.sink_k[layer][:, :, first:S]
            values[:, :, : S - first] = self.sink_v[layer][:, :, first:S]
        return keys, values

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
               window: int | None) -> torch.Tensor:
        """One decode step: store k, v (B, H_kv, 1, D) and attend q (B, H, 1, D) to the cached
        positions (the last `window` for a sliding layer) without dequantizing the cache. Returns (B, H, D)."""
        self.write(layer, k, v)
        end = self.length + k.shape[2]
        q1 = self._qlen_for(end)
        lo = 0 if window is None else max(0, end - window)
        B, H, D = self.batch_size, self.num_kv_heads, self.head_dim
        rep = q.shape[1] // H
        qf = (q.float() * (D**-0.5 if scale is None else scale)).reshape(B * H, rep, D).contiguous()
        m = torch.full((B * H, rep), -math.inf, device=q.device)
        l = torch.zeros(B * H, rep, device=q.device)
        acc = torch.zeros(B * H, rep, D, device=q.device)
        native = self._native(rep)
        S = min(self.sink, end)
        if lo < S:  # the unquantized first positions
            self._attend_rows(layer, 0, qf, lo, S, m, l, acc)
        for p, a, b in self._segments(max(lo, S), q1, PAGE_TOKENS if native else ATTEND_CHUNK):
            if native:
                kv_kernel.attend(qf, *self._side(p, layer), a, b, m, l, acc)
            else:
                self._attend_codes(layer, qf, p, a, b, m, l, acc)
        if self.res_k and end > max(lo, q1, S):  # the residual window, positions q1 ..
            self._attend_rows(layer, 1, qf, max(lo, q1, S) - q1, end - q1, m, l, acc)
        return (acc / l[..., None]).to(q.dtype).reshape(B, H * rep, D)

    def _attend_rows(self, layer: int, which: int, qf: torch.Tensor, a: int, b: int, m: torch.Tensor,
                     l: torch.Tensor, acc: torch.Tensor) -> None:
        """Merge rows [a, b) of the unquantized sink (which 0) or residual window (1) into the state:
        by the kernel (bf16/float32 caches) or by a matmul."""
        keys, values = (self.sink_k, self.sink_v) if which == 0 else (self.res_k, self.res_v)
        if self._native_plain(qf.shape[1]):
            sides = self._sides.get(("rows", which, layer))
            if sides is None:  # the tensors live as long as the cache: one descriptor pair each
                sides = self._sides[("rows", which, layer)] = (kv_kernel.plain_side(keys[layer]),
                                                              kv_kernel.plain_side(values[layer]))
            kv_kernel.attend(qf, *sides, a, b, m, l, acc)
        else:
            kf, vf = keys[layer][:, :, a:b].float().flatten(0, 1), values[layer][:, :, a:b].float().flatten(0, 1)
            _merge(m, l, acc, qf @ kf.transpose(1, 2), vf)

    def _attend_codes(self, layer: int, qf: torch.Tensor, p: int, a: int, b: int, m: torch.Tensor,
                      l: torch.Tensor, acc: torch.Tensor) -> None:
        """The PyTorch path of the kernel's integer attention: page p's positions [a, b) (page-relative,
        within one aligned ATTEND_CHUNK), computed as the kernel does."""
        kc, vc = self.key_codec, self.value_codec
        kcodes, kscale, kzero, vcodes, vscale, vzero = self.pages[p][layer]
        if kc.bits == 8:  # int8 rows: one scale per row, symmetric
            scores = _row_key_scores(qf, kcodes[:, :, a:b].flatten(0, 1).float(), kscale[:, :, a:b, 0].flatten(0, 1).float())
            vs = vscale[:, :, a:b].flatten(0, 1).float()
            _merge_blocks(m, l, acc, scores, vcodes[:, :, a:b].flatten(0, 1).float(), vs, torch.zeros_like(vs), a)
            return
        lo, hi = a // kc.group * kc.group, -(-b // kc.group) * kc.group
        k = kc.load(kcodes[:, :, lo:hi].flatten(0, 1)).float()  # (N, hi - lo, D): rows are allocated in whole groups
        scores = _key_scores(kc, qf, k, kscale[:, :, lo // kc.group : hi // kc.group].flatten(0, 1),
                             kzero[:, :, lo // kc.group : hi // kc.group].flatten(0, 1))[..., a - lo : b - lo]
        t0, t1 = a // vc.unit * vc.unit, -(-b // vc.unit) * vc.unit
        v = vc.load(vcodes[:, :, t0:t1].flatten(0, 1)).float()[:, a - t0 : b - t0]
        vs, vz = (vc.load_scale(x[:, :, t0:t1].flatten(0, 1))[:, a - t0 : b - t0] for x in (vscale, vzero))
        _merge_blocks(m, l, acc, scores, v, vs, vz, a)

    def advance(self, n: int) -> None:
        self.qlen = self._qlen_for(self.length + n)
        self.length += n

    def trim(self, length: int) -> None:
        super().trim(length)
        if length >= self.qlen:
            return
        if not self.res_k:
            self.qlen = length
            return
        # Cut inside the quantized part: its last partial key group goes back to the residual window
        # (as its dequantized values) and is quantized again when the window moves on.
        q = length // self.flush * self.flush
        for layer in range(self.num_layers):
            if length > q:
                if q < self.sink:  # sink holds these positions unquantized (sink is whole key groups)
                    k, v = self.sink_k[layer][:, :, q:length], self.sink_v[layer][:, :, q:length]
                else:
                    k, v = self._load(layer, q, length)
                self.res_k[layer][:, :, : length - q] = k
                self.res_v[layer][:, :, : length - q] = v
        self.qlen = q

    def nbytes(self) -> int:
        tensors = [t for page in self.pages for layer in page for t in layer if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors + self.res_k + self.res_v + self.sink_k + self.sink_v)

    # ---- the C kernel

    def _native(self, rep: int) -> bool:
        if self.device.type != "cpu" or rep > kv_kernel.MAX_REP or kv_kernel.library() is None:
            return False
        if self._kernel_ok is None:
            self._kernel_ok = kv_kernel.supported(self.head_dim, *self._side(0, 0))
        return self._kernel_ok

    def _native_plain(self, rep: int) -> bool:
        """Whether the kernel also attends the unquantized sink and residual rows (bf16 or float32 caches)."""
        if self.dtype not in (torch.bfloat16, torch.float32) or not self._native(rep):
            return False
        if self._plain_ok is None:
            rows = torch.zeros(1, 1, 1, self.head_dim, dtype=self.dtype)
            self._plain_ok = kv_kernel.supported(self.head_dim, kv_kernel.plain_side(rows), kv_kernel.plain_side(rows))
        return self._plain_ok

    def _side(self, p: int, layer: int) -> tuple:
        sides = self._sides.get((p, layer))
        if sides is None:
            page = self.pages[p][layer]
            sides = tuple(self._make_side(c, *page[i : i + 3])
                          for c, i in ((self.key_codec, 0), (self.value_codec, 3)))
            self._sides[(p, layer)] = sides
        return sides

    @staticmethod
    def _make_side(c: Codec, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> kv_kernel.Side:
        heads = codes.shape[0] * codes.shape[1]
        side = kv_kernel.Side(codes.data_ptr(), scale.data_ptr(), 0 if zero is None else zero.data_ptr(),
                              codes.numel() // heads, scale.numel() // heads, c.bits, c.group, int(c.per_channel))
        side._keep = (codes, scale, zero)  # the pointers stay valid as long as the descriptor lives
        return side


def codecs(kv_format: str, head_dim: int) -> tuple[Codec, Codec, int]:
    """(key codec, value codec, residual window) of a quantized format (see the table above)."""
    fmt = check_kv_format(kv_format)
    if fmt == "int8":
        return Codec(8, head_dim, symmetric=True), Codec(8, head_dim, symmetric=True), 0
    def kivi(key_bits: int, key_group: int, value_bits: int, value_group: int, residual: int):
        """Keys per channel over `key_group` tokens, values per token over `value_group` channels, both in
        the integer kernel's interleaved tiles."""
        return (Codec(key_bits, key_group, per_channel=True, tile=KEY_TILE),
                Codec(value_bits, min(value_group, head_dim), tile=VALUE_TILE, scale_tile=SCALE_TILE), residual)

    if fmt == "int4":
        return kivi(4, INT4_KEY_GROUP, 4, INT4_VALUE_GROUP, INT4_RESIDUAL)
    if fmt == "int2":
        return kivi(2, INT2_KEY_GROUP, 2, INT2_VALUE_GROUP, INT2_RESIDUAL)
    if fmt == "k4v2":
        return kivi(4, INT4_KEY_GROUP, 2, INT2_VALUE_GROUP, INT4_RESIDUAL)
    raise ConfigError(f"{fmt!r} is not a quantized KV format")


def make_kv_cache(kv_format: str | None, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                  batch_size: int = 1, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> KVCache:
    """A KV cache in `kv_format` (see KV_FORMATS; "bf16" and None: the model's own dtype)."""
    fmt = check_kv_format(kv_format)
    args = (num_layers, num_kv_heads, head_dim, max_tokens, batch_size, dtype, device)
    if fmt == "bf16":
        return KVCache(*args)
    return QuantizedKVCache(*codecs(fmt, head_dim), *args, kv_format=fmt, sink=SINK_TOKENS)


def bytes_per_token(kv_format: str | None, num_layers: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype = torch.bfloat16) -> float:
    """Cache bytes per position in the long run ("bf16": in `dtype`; int2's residual window left out)."""
    fmt = check_kv_format(kv_format)
    if fmt == "bf16":
        per_head = 2 * head_dim * torch.finfo(dtype).bits / 8
    else:
        per_head = sum(c.bytes_per_token(head_dim) for c in codecs(fmt, head_dim)[:2])
    return per_head * num_layers * num_kv_heads
