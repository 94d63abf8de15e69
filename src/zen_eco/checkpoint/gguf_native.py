"""GGUF block decoding in C for loading: the hot loops of gguf_quants, with the same results.

Loading a 4B Q4_K_M file spent ~7 of its ~12 s in numpy unpacking nibbles, 6-bit scales and Q6_K
values (each a few passes over strided temporaries, on one core), and a Q8_0 file ~4 s copying its
codes out of 34-byte blocks. These functions do each format in one pass over its blocks, split
across threads, writing into arrays the caller allocates. They compute exactly what the numpy
functions in gguf_quants compute (the same float32 products of the float16 scale and the integer
sub-scale; tests/test_gguf_quants.py compares the two on random blocks); gguf_quants falls back to
numpy where this library cannot be built (no C compiler, ZEN_ECO_NATIVE=0).

Outputs per block (n blocks, arrays C-contiguous):
  q8_0:  codes int8 (n, 32), d float32 (n,)
  q6_k:  values int8 (n, 256) in [-32, 31], d * sc float32 (n, 16)
  q2_k:  values uint8 (n, 256) in [0, 3], d * sc and dmin * m float32 (n, 16)
  q3_k:  values int8 (n, 256) in [-4, 3], d * (sc - 32) float32 (n, 16)
  k4/k5: Q4_K / Q5_K: values uint8 (n, 256) (0..15 / 0..31), d * sc and dmin * m float32 (n, 8)
  q5:    Q5_0 / Q5_1 (high bits at byte `at`, nibbles after them): values uint8 (n, 32) in [0, 31]
  nib:   Q4_0 / Q4_1 (nibbles at byte `at`): values uint8 (n, 32), low nibbles then high
  (both with the blocks' d, and Q4_1 / Q5_1's m, float32 (n, 1))
The codes can go straight into an array the caller passes (rows of a fused q|k|v or gate|up matrix),
so that loading does not copy them again to join the parts.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np
import torch

from .. import native
from ..kquant_kernel import GGUF_BLOCKS_C

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float f16(const uint8_t *p) { _Float16 h; memcpy(&h, p, 2); return (float)h; }
""" + GGUF_BLOCKS_C + r"""

void zen_gguf_q8_0(const uint8_t *blocks, int64_t n, int8_t *codes, float *d, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *x = blocks + b * 34;
        d[b] = f16(x);
        memcpy(codes + b * 32, x + 2, 32);
    }
}

/* Q6_K (gguf_q6_k_block): the values (code - 32) and d * sc per 16. */
void zen_gguf_q6_k(const uint8_t *blocks, int64_t n, int8_t *q, float *d16, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *x = blocks + b * 210;
        const float d = f16(x + 208);
        for (int s = 0; s < 16; s++) d16[b * 16 + s] = d * (float)(int8_t)x[192 + s];
        uint8_t codes[256];
        gguf_q6_k_block(x, codes);
        for (int i = 0; i < 256; i++) q[b * 256 + i] = (int8_t)(codes[i] - 32);
    }
}

/* scales: 16 x (4-bit scale | 4-bit min) | qs: 64 | d, dmin: f16. Each half of 128 values reads its 32
   qs bytes four times, at shifts 0, 2, 4, 6: value 32j + l of half h is bits 2j, 2j + 1 of qs[32h + l]. */
void zen_gguf_q2_k(const uint8_t *blocks, int64_t n, uint8_t *q, float *d16, float *m16, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *x = blocks + b * 84;
        uint8_t *out = q + b * 256;
        const float d = f16(x + 80), dmin = f16(x + 82);
        for (int s = 0; s < 16; s++) {
            d16[b * 16 + s] = d * (float)(x[s] & 15);
            m16[b * 16 + s] = dmin * (float)(x[s] >> 4);
        }
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) out[128 * h + 32 * j + l] = (x[16 + 32 * h + l] >> (2 * j)) & 3;
    }
}

/* hmask: 32 | qs: 64 | scales: 12 | d: f16. Scale i: its low 4 bits from byte i % 8 of the first 8 (low
   nibbles for i < 8, high ones after), its top 2 from byte 8 + i % 4 at shift 2 * (i / 4); minus 32.
   Value 32g + l (g = 4h + j) is bits 2j, 2j + 1 of qs[32h + l], minus 4 where bit g of hmask[l] is clear. */
void zen_gguf_q3_k(const uint8_t *blocks, int64_t n, int8_t *q, float *d16, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *x = blocks + b * 110, *sc = x + 96;
        int8_t *out = q + b * 256;
        const float d = f16(x + 108);
        for (int i = 0; i < 16; i++) {
            const int low = i < 8 ? sc[i] & 15 : sc[i - 8] >> 4, high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
            d16[b * 16 + i] = d * (float)((low | (high << 4)) - 32);
        }
        for (int g = 0; g < 8; g++)
            for (int l = 0; l < 32; l++)
                out[32 * g + l] = (int8_t)(((x[32 + 32 * (g / 4) + l] >> (2 * (g % 4))) & 3) - (((x[l] >> g) & 1) ? 0 : 4));
    }
}

/* Q4_K / Q5_K (gguf_kquant_block). Outputs per sub-block (each pair optional, NULL): d1, m1 the float
   products d * sc, dmin * m; sc, mn the 6-bit values themselves. */
void zen_gguf_kquant(const uint8_t *blocks, int64_t n, int five, uint8_t *codes, float *d1, float *m1, uint8_t *sc,
                     uint8_t *mn, int nt) {
    const int size = five ? 176 : 144;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *x = blocks + b * size;
        const float d = f16(x), dmin = f16(x + 2);
        uint8_t s[8], m[8];
        gguf_kquant_block(x, five, codes + b * 256, s, m);
        for (int j = 0; j < 8; j++) {
            if (d1) d1[b * 8 + j] = d * (float)s[j], m1[b * 8 + j] = dmin * (float)m[j];
            if (sc) sc[b * 8 + j] = s[j], mn[b * 8 + j] = m[j];
        }
    }
}

/* 32-value blocks of `size` bytes with 16 bytes of nibbles at byte `at` (values i and i + 16 in byte i),
   and (high >= 0) 32 fifth bits at byte `high`, little-endian; d, m (where not NULL): the float16 at
   bytes 0 and 2 (Q4_0 / Q5_0's d; Q4_1 / Q5_1's d and m) as float32. */
void zen_gguf_nibbles(const uint8_t *blocks, int64_t n, int size, int at, int high, uint8_t *values, float *d,
                      float *m, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *x = blocks + b * size;
        uint8_t *o = values + b * 32;
        if (d) d[b] = f16(x);
        if (m) m[b] = f16(x + 2);
        uint32_t h = 0;
        if (high >= 0) memcpy(&h, x + high, 4);
        for (int i = 0; i < 16; i++) {
            o[i] = (x[at + i] & 15) | ((h >> i & 1) << 4);
            o[i + 16] = (x[at + i] >> 4) | ((h >> (i + 16) & 1) << 4);
        }
    }
}
"""


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled decoders, or None where they cannot be built (gguf_quants then uses numpy)."""
    lib = native.build("gguf_decode", C_SOURCE)
    if lib is None:
        return None
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name, args in (("zen_gguf_q8_0", [p, i64, p, p, i]), ("zen_gguf_q6_k", [p, i64, p, p, i]),
                       ("zen_gguf_q2_k", [p, i64, p, p, p, i]), ("zen_gguf_q3_k", [p, i64, p, p, i]),
                       ("zen_gguf_kquant", [p, i64, i, p, p, p, p, p, i]), ("zen_gguf_nibbles", [p, i64, i, i, i, p, p, p, i])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, args
    return lib


def usable(blocks: np.ndarray, type_size: int) -> bool:
    """Whether the C decoders take `blocks`: built here, and (n, type_size) contiguous bytes."""
    return (blocks.dtype == np.uint8 and blocks.ndim == 2 and blocks.shape[1] == type_size
            and blocks.flags.c_contiguous and library() is not None)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _out(given: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """`given` (a C-contiguous array the caller wants the values in: e.g. rows of a fused matrix) viewed
    as `shape`, or a new array."""
    if given is None:
        return np.empty(shape, dtype)
    if given.dtype != np.dtype(dtype) or given.size != int(np.prod(shape)) or not given.flags.c_contiguous:
        raise ValueError(f"output array {given.dtype} {given.shape} does not hold {shape} {np.dtype(dtype)}")
    return given.reshape(shape)


def q8_0(blocks: np.ndarray, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    codes, d = _out(codes, (n, 32), np.int8), np.empty((n, 1), np.float32)
    library().zen_gguf_q8_0(_ptr(blocks), n, _ptr(codes), _ptr(d), torch.get_num_threads())
    return codes, d


def q6_k(blocks: np.ndarray, q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    q, d16 = _out(q, (n, 16, 16), np.int8), np.empty((n, 16), np.float32)
    library().zen_gguf_q6_k(_ptr(blocks), n, _ptr(q), _ptr(d16), torch.get_num_threads())
    return q, d16


def q2_k(blocks: np.ndarray, q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    q, d16, m16 = _out(q, (n, 16, 16), np.uint8), np.empty((n, 16), np.float32), np.empty((n, 16), np.float32)
    library().zen_gguf_q2_k(_ptr(blocks), n, _ptr(q), _ptr(d16), _ptr(m16), torch.get_num_threads())
    return q, d16, m16


def q3_k(blocks: np.ndarray, q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    q, d16 = _out(q, (n, 16, 16), np.int8), np.empty((n, 16), np.float32)
    library().zen_gguf_q3_k(_ptr(blocks), n, _ptr(q), _ptr(d16), torch.get_num_threads())
    return q, d16


def k_quant(blocks: np.ndarray, five: bool, codes: np.ndarray | None = None,
            raw: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, d * sc, dmin * m) per sub-block; raw: (codes, sc, m) as stored (uint8)."""
    n = blocks.shape[0]
    codes = _out(codes, (n, 8, 32), np.uint8)
    a, b = (np.empty((n, 8), np.uint8 if raw else np.float32) for _ in range(2))
    floats, ints = ((0, 0), (_ptr(a), _ptr(b))) if raw else ((_ptr(a), _ptr(b)), (0, 0))
    library().zen_gguf_kquant(_ptr(blocks), n, int(five), _ptr(codes), *floats, *ints, torch.get_num_threads())
    return codes, a, b


def nibbles(blocks: np.ndarray, at: int, high: int = -1, values: np.ndarray | None = None,
            scales: int = 0) -> tuple[np.ndarray, ...]:
    """(values, and the first `scales` (0, 1 or 2) float16 fields of each block as float32 (n, 1))."""
    n = blocks.shape[0]
    values = _out(values, (n, 32), np.uint8)
    fields = [np.empty((n, 1), np.float32) for _ in range(scales)]
    d, m = (fields + [None, None])[:2]
    library().zen_gguf_nibbles(_ptr(blocks), n, blocks.shape[1], at, high, _ptr(values), None if d is None else _ptr(d),
                               None if m is None else _ptr(m), torch.get_num_threads())
    return (values, *fields)
