"""A small C kernel for decode attention over a quantized KV cache, built on first use.

PyTorch has no CPU op that reads 2-, 4- or 8-bit K/V codes and attends in one pass: dequantizing
a chunk with tensor ops writes and re-reads float32 copies (~8 passes over 4-byte values per 2-bit
code), which at 160K tokens costs tens of seconds per token. This kernel reads each code once and
keeps the online softmax (running max, sum and output per query, merged across blocks, threads and
pages by log-sum-exp). Three ways in, one per kind of format:

- Plain bf16/float32 rows (the cache's unquantized first tokens and residual window; a bf16 cache in
  the one-call decode step): per block of 64 tokens, keys scored in float32 16-wide GCC vectors
  (partial sums reduced 16 tokens at a time), then the value rows added into the query heads'
  accumulators: 2 x n_rep x head_dim multiply-adds per position and KV head. With AVX512-BF16, bf16
  rows go through bf16 dot products instead (the query split into bf16 high and low parts, the softmax
  weights rounded to bf16): closer to float32 attention than bf16 SDPA is (tests/test_kv_quant.py).
- int8 rows (one scale per row), in integers: the query rounded to int8 per 4 channels and dotted by
  VNNI with each key row (the lanes summed 16 rows at a time); the values as below, 4 rows interleaved
  in registers. Against float attention over the same codes this adds about half the error the int8
  codes do (tests/test_kv_quant.py).
- The KIVI formats (int4, k4v2, int2: per-channel keys, per-token values), in integers: per key group,
  each query times the group's channel scales is rounded to int8 (one scale per 32 channels) and dotted
  with the 4-/2-bit codes by VNNI (`vpdpbusd`: 4 byte products per 32-bit lane), 16 tokens per
  instruction; per block of 64 positions (aligned, so that the threads' split does not change the
  result), exp(score - block max) times each token's value scale is rounded to uint8 per (query, value
  group) and dotted with the value codes, 4 tokens per lane. The codes are stored interleaved for this
  (kv_quant.Codec.store), the value scales group-major per 32 tokens. The rounding adds little error
  next to the codes' own (docs/benchmarks.md, "Integer attention over quantized KV"); kv_quant's
  PyTorch path computes the same numbers. Without AVX512-VNNI the same integer arithmetic runs on
  plain vectors.

One specialisation per head_dim (64, 128, 256) and zen-eco format keeps every loop bound and shift a
constant. It is built on first use by `native.build` (system C compiler, OpenMP threads following
torch.get_num_threads(); ~10 s with AVX-512, ~30 s without). Without a compiler (or with
ZEN_ECO_NATIVE=0 or ZEN_ECO_NATIVE_KV=0, or for tensors not on the CPU) `kv_quant` uses its chunked
PyTorch path instead: the same numbers, slower.

Layouts (one per side, K or V; `heads` = batch x KV heads, all contiguous):
  codes  (heads, capacity, dim * bits / 8): int8 codes, or 4-/2-bit codes packed by planes: byte i
         of a row holds column i + j * (dim / n) in bits [j * bits, (j + 1) * bits), n = 8 / bits;
         for the KIVI formats the planes run over a tile's interleaved codes (kv_quant.interleave)
  scale, zero (float16): per token, (heads, capacity, dim / group) for groups of `group` columns (the
         KIVI formats' values: each 32 tokens' rows group-major); per channel, (heads, capacity / group,
         dim) for groups of `group` tokens. zero NULL: symmetric.
  value = code * scale + zero
  Plain rows (bits 16: bfloat16, 32: float32; scale and zero NULL) are attended by the same call.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import torch

from . import native

MAX_DIM, MAX_REP = 256, 16  # the kernel's stack buffers

# One of K or V as the kernel reads it (the `Side` structure below); decode_kernel's C, which calls
# zen_kv_attend through a pointer, pastes the same definition.
SIDE_T = r"""
typedef struct {
    const void *codes;
    const _Float16 *scale;
    const _Float16 *zero;
    int64_t codes_head_stride;  /* bytes */
    int64_t scale_head_stride;  /* elements */
    int32_t bits, group, per_channel;
} side_t;
"""

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_DIM 256
#define MAX_REP 16
#define BLOCK 64  /* tokens scored before their values are read: scores stay in L1 */
#ifndef PREFETCH
#define PREFETCH 4096  /* bytes ahead that code rows are prefetched */
#endif
#define NC (MAX_DIM / 16)
#define INLINE static inline __attribute__((always_inline))

/* GCC vector types (v16, i32x16, splat and exp16: native.VEC16). */
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

""" + SIDE_T + r"""

""" + native.VEC16 + r"""

static inline float hsum(v16 v) {
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* The largest of 16 lanes, by halves (a tree: a scalar chain of 15 maxima would cost its latency). */
static inline float hmax(v16 v) {
#ifdef __AVX512F__
    __m512 x;
    memcpy(&x, &v, 64);
    return _mm512_reduce_max_ps(x);
#else
    float m = v[0];
    for (int i = 1; i < 16; i++) m = v[i] > m ? v[i] : m;
    return m;
#endif
}

INLINE v16 vmax(v16 a, v16 b) {
    const i32x16 more = b > a;
    return (v16)(((i32x16)b & more) | ((i32x16)a & ~more));
}

/* The largest of 64 scores and `floor` (BLOCK = VBLOCK = 64). */
INLINE float max64(const float *s, float floor) {
    v16 m = splat(floor);
    for (int t = 0; t < 64; t += 16) {
        v16 x;
        memcpy(&x, s + t, 64);
        m = vmax(m, x);
    }
    return hmax(m);
}

/* exp(x) for one x <= 0 (the online softmax's corrections and merges, once per block): exp16's lane 0,
   so scalar and vector exponentials are the same polynomial. */
static inline float exp_neg(float x) { return exp16(splat(x))[0]; }

/* Columns [16c, 16c + 16) of a code row as floats. Packed rows are planes of n = dim * bits / 8
   bytes' worth of columns: column i + j * n sits in byte i, bits [j * bits, (j + 1) * bits). */
INLINE v16 codes16(const uint8_t *row, const int bits, const int nc, const int c) {
    if (bits == 32) {  /* plain float32 rows */
        v16 x;
        memcpy(&x, row + 64 * c, 64);
        return x;
    }
    if (bits == 16) {  /* plain bfloat16 rows: the top half of a float32 */
        u16x16 h;
        memcpy(&h, row + 32 * c, 32);
        return (v16)(__builtin_convertvector(h, i32x16) << 16);
    }
    if (bits == 8) {
        u8x16 b;  /* signed bytes: zero-extend b ^ 0x80 and subtract 128 (GCC vectorizes only this form) */
        memcpy(&b, row + 16 * c, 16);
        return __builtin_convertvector(__builtin_convertvector(b ^ (uint8_t)0x80, i32x16) - 128, v16);
    }
    const int per_plane = nc * bits / 8, plane = c / per_plane, i0 = 16 * (c % per_plane);
    u8x16 b;
    memcpy(&b, row + i0, 16);
    b = (b >> (uint8_t)(plane * bits)) & (uint8_t)((1 << bits) - 1);
    return __builtin_convertvector(__builtin_convertvector(b, i32x16), v16);
}

INLINE v16 load16h(const _Float16 *p) {
#ifdef __AVX512F__
    const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    v16 out;
    memcpy(&out, &x, 64);
    return out;
#else
    v16 out;
    for (int i = 0; i < 16; i++) out[i] = (float)p[i];
    return out;
#endif
}

typedef struct {
    const uint8_t *codes;
    const _Float16 *scale, *zero;
} reader_t;

INLINE void reader_init(reader_t *rd, const side_t *s, int64_t h) {
    rd->codes = (const uint8_t *)s->codes + h * s->codes_head_stride;
    rd->scale = s->scale + h * s->scale_head_stride;
    rd->zero = s->zero ? s->zero + h * s->scale_head_stride : 0;
}

/* Row t of a per-token format dequantized into out[dim / 16]. The format arguments are compile-time
   constants in every specialisation below, so the loops unroll and the shifts are immediates. */
INLINE void read_row(reader_t *rd, int64_t t, v16 *out, const int dim, const int bits, const int group,
                     const int has_zero) {
    const int nc = dim / 16;
    const uint8_t *row = rd->codes + t * (dim * bits / 8);
    if (bits >= 16) {  /* plain rows (the unquantized sink and residual window) */
        for (int c = 0; c < nc; c++) out[c] = codes16(row, bits, nc, c);
    } else {
        const int ng = dim / group;
        const _Float16 *sc = rd->scale + t * ng, *zr = rd->zero + t * ng;
        for (int c = 0; c < nc; c++) {
            const int j = c / (group / 16);
            out[c] = codes16(row, bits, nc, c) * (float)sc[j] + (has_zero ? (float)zr[j] : 0.0f);
        }
    }
}

""" + native.TRANSPOSE_SUM16 + r"""

/* A code row's bytes PREFETCH ahead, towards L2: each task reads one sequential stream per side. */
INLINE void prefetch_row(const uint8_t *row, const int bytes) {
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch(row + PREFETCH + o, 0, 2);
}

/* Fold (m2, l2, acc2) into (m, l, acc): the log-sum-exp merge of two partial softmaxes. */
static void merge(int n_rep, int dim, float *m, float *l, float *acc, const float *m2, const float *l2,
                  const float *acc2) {
    for (int r = 0; r < n_rep; r++) {
        if (l2[r] == 0.0f) continue;
        const float mm = m[r] > m2[r] ? m[r] : m2[r];
        const float a = l[r] == 0.0f ? 0.0f : exp_neg(m[r] - mm), b = exp_neg(m2[r] - mm);
        for (int d = 0; d < dim; d++) acc[r * dim + d] = acc[r * dim + d] * a + acc2[r * dim + d] * b;
        l[r] = l[r] * a + l2[r] * b;
        m[r] = mm;
    }
}

/* Attention of head h's n_rep queries over tokens [t0, t1): unnormalised (m, l, acc). Queries go in
   fours (padded with zeros): each loaded code vector feeds four FMAs. */
INLINE void attend_impl(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,
                        int64_t t1, float *m, float *l, float *acc_out, const int dim, const int kbits,
                        const int kgroup, const int kzero, const int vbits, const int vgroup, const int vzero) {
    const int nc = dim / 16, nr = (n_rep + 3) & ~3;
    v16 qv[MAX_REP][NC], acc[MAX_REP][NC], row[NC], vbuf[BLOCK][NC];
    float s[MAX_REP][BLOCK], mr[MAX_REP], lr[MAX_REP];
#ifdef __AVX512F__
    v16 part[MAX_REP][BLOCK];  /* per query and token: a score's 16 partial sums */
#endif
    reader_t kr, vr;
    reader_init(&kr, k, h);
    reader_init(&vr, v, h);
    for (int r = 0; r < nr; r++) {
        mr[r] = -__builtin_inff();
        lr[r] = 0.0f;
        for (int c = 0; c < nc; c++) {
            if (r < n_rep) memcpy(&qv[r][c], q + r * dim + 16 * c, 64);
            else qv[r][c] = splat(0.0f);
            acc[r][c] = splat(0.0f);
        }
    }
    for (int64_t b0 = t0; b0 < t1; b0 += BLOCK) {
        const int n = (int)(t1 - b0 < BLOCK ? t1 - b0 : BLOCK);
        for (int t = 0; t < n; t++) {
            const int64_t tok = b0 + t;
            prefetch_row(kr.codes + tok * (dim * kbits / 8), dim * kbits / 8);
            read_row(&kr, tok, row, dim, kbits, kgroup, kzero);
            for (int r0 = 0; r0 < nr; r0 += 4) {
                v16 a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
                for (int c = 0; c < nc; c += 2) {  /* 8 independent FMA chains: 4 queries x even/odd chunks */
                    a0 += qv[r0][c] * row[c], b0 += qv[r0][c + 1] * row[c + 1];
                    a1 += qv[r0 + 1][c] * row[c], b1 += qv[r0 + 1][c + 1] * row[c + 1];
                    a2 += qv[r0 + 2][c] * row[c], b2 += qv[r0 + 2][c + 1] * row[c + 1];
                    a3 += qv[r0 + 3][c] * row[c], b3 += qv[r0 + 3][c + 1] * row[c + 1];
                }
#ifdef __AVX512F__  /* the lanes are summed 16 tokens at a time below */
                part[r0][t] = a0 + b0, part[r0 + 1][t] = a1 + b1, part[r0 + 2][t] = a2 + b2, part[r0 + 3][t] = a3 + b3;
#else
                s[r0][t] = hsum(a0 + b0), s[r0 + 1][t] = hsum(a1 + b1);
                s[r0 + 2][t] = hsum(a2 + b2), s[r0 + 3][t] = hsum(a3 + b3);
#endif
            }
        }
#ifdef __AVX512F__
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < n; t += 16) {
                for (int i = n - t; i < 16; i++) part[r][t + i] = splat(0.0f);  /* past the range: overwritten below */
                _mm512_storeu_ps(&s[r][t], transpose_sum16((const __m512 *)&part[r][t]));
            }
#endif
        for (int r = 0; r < nr; r++) {  /* scores -> exp(score - running max), in vectors of 16 */
            for (int t = n; t < BLOCK; t++) s[r][t] = -__builtin_inff();
            const float mb = max64(s[r], mr[r]);
            const float corr = lr[r] == 0.0f ? 0.0f : exp_neg(mr[r] - mb);
            v16 sum = splat(0.0f);
            for (int t = 0; t < BLOCK; t += 16) {
                v16 x;
                memcpy(&x, &s[r][t], 64);
                x = exp16(x - mb);
                memcpy(&s[r][t], &x, 64);
                sum += x;
            }
            for (int c = 0; c < nc; c++) acc[r][c] *= corr;
            lr[r] = lr[r] * corr + hsum(sum);
            mr[r] = mb;
        }
        for (int t = 0; t < n; t++) {
            prefetch_row(vr.codes + (b0 + t) * (dim * vbits / 8), dim * vbits / 8);
            read_row(&vr, b0 + t, vbuf[t], dim, vbits, vgroup, vzero);
        }
        for (int r0 = 0; r0 < nr; r0 += 4) {
            for (int c = 0; c < nc; c += 2) {  /* 8 independent FMA chains: 2 chunks x 4 queries */
                v16 a0 = acc[r0][c], a1 = acc[r0 + 1][c], a2 = acc[r0 + 2][c], a3 = acc[r0 + 3][c];
                v16 b0 = acc[r0][c + 1], b1 = acc[r0 + 1][c + 1], b2 = acc[r0 + 2][c + 1], b3 = acc[r0 + 3][c + 1];
                for (int t = 0; t < n; t++) {
                    const v16 x = vbuf[t][c], y = vbuf[t][c + 1];
                    const float p0 = s[r0][t], p1 = s[r0 + 1][t], p2 = s[r0 + 2][t], p3 = s[r0 + 3][t];
                    a0 += p0 * x, a1 += p1 * x, a2 += p2 * x, a3 += p3 * x;
                    b0 += p0 * y, b1 += p1 * y, b2 += p2 * y, b3 += p3 * y;
                }
                acc[r0][c] = a0, acc[r0 + 1][c] = a1, acc[r0 + 2][c] = a2, acc[r0 + 3][c] = a3;
                acc[r0][c + 1] = b0, acc[r0 + 1][c + 1] = b1, acc[r0 + 2][c + 1] = b2, acc[r0 + 3][c + 1] = b3;
            }
        }
    }
    for (int r = 0; r < n_rep; r++) {
        m[r] = mr[r];
        l[r] = lr[r];
        memcpy(acc_out + r * dim, &acc[r][0], sizeof(float) * dim);
    }
}

/* ---- Integer attention over the KIVI formats' codes (per-channel keys, per-token values).

   Keys, tiles of 16 tokens: once per key group, each query times the group's channel scales is
   rounded to int8 per block of 32 channels (scale amax / 127); a tile's codes, unpacked plane by
   plane, hold one token's 4 channels per 32-bit lane, so one VNNI dot product (uint8 codes x int8
   query, 4 products per lane) advances 16 tokens' scores by 4 channels. score = sum over blocks of
   scale * int32 sum, plus q . min.
   Values, blocks of 64 positions aligned to multiples of 64: p = exp(score - block max); per query and
   group of value channels, p * scale rounded to uint8 (scale max / 255; the 16 maxima of 4 queries x 4
   groups from one transposed reduction); a value tile's codes hold 4 tokens' codes of one channel per lane,
   dotted with those 4 tokens' weights. The block's output (int32 * weight scale) joins the running
   softmax by log-sum-exp; the sums of p and of p * min stay per-lane vectors until the end.
   kv_quant's PyTorch path (_key_scores, _merge_blocks) computes the same numbers. */

typedef uint8_t u8x64 __attribute__((vector_size(64)));
#define VBLOCK 64  /* kv_quant.VALUE_BLOCK */
#define QBLOCK 32  /* kv_quant.QUERY_BLOCK */
#define STILE 32   /* kv_quant.SCALE_TILE */
#define AHEAD 2    /* blocks ahead that key tiles and value tiles are prefetched (one block: 4 KB ahead, slower) */

/* 64 integer codes as 16 32-bit lanes (vq), and the operations the integer attention needs. */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* unrolled where the shift counts then become constants (elsewhere unrolling costs minutes of compiling) */
#define UNROLL4 _Pragma("GCC unroll 4")
#define UNROLL8 _Pragma("GCC unroll 8")
#define UNROLL16 _Pragma("GCC unroll 16")
typedef __m512i vq;
INLINE vq vq_zero(void) { return _mm512_setzero_si512(); }
INLINE vq vq_set1(int32_t w) { return _mm512_set1_epi32(w); }
INLINE vq vq_add(vq a, vq b) { return _mm512_add_epi32(a, b); }
/* acc + the sums of 4 adjacent byte products u * s (u unsigned, s signed) per lane */
INLINE vq vq_dot(vq acc, vq u, vq s) { return _mm512_dpbusd_epi32(acc, u, s); }
/* vq_dot(acc, u, vq_set1(*s)) as one instruction (the broadcast folded into the dot product's load;
   GCC keeps them apart) */
INLINE vq vq_dot_set1(vq acc, vq u, const int32_t *s) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*s));
    return acc;
}
INLINE v16 vq_float(vq a) {
    const __m512 f = _mm512_cvtepi32_ps(a);
    v16 out;
    memcpy(&out, &f, 64);
    return out;
}
/* bits [shift, shift + bits) of 64 bytes (a 16-bit shift: the mask drops what crossed from the next byte) */
INLINE vq vq_codes(const uint8_t *p, const int shift, const int bits) {
    const vq x = _mm512_loadu_si512(p);
    return bits == 8 ? x : _mm512_and_si512(_mm512_srli_epi16(x, shift), _mm512_set1_epi8((char)((1 << bits) - 1)));
}
#else
#define UNROLL4
#define UNROLL8
#define UNROLL16
typedef i32x16 vq;
INLINE vq vq_zero(void) { return (vq){0}; }
INLINE vq vq_set1(int32_t w) { return (vq){w, w, w, w, w, w, w, w, w, w, w, w, w, w, w, w}; }
INLINE vq vq_add(vq a, vq b) { return a + b; }
INLINE vq vq_dot(vq acc, vq u, vq s);
INLINE vq vq_dot_set1(vq acc, vq u, const int32_t *s) { return vq_dot(acc, u, vq_set1(*s)); }
INLINE vq vq_dot(vq acc, vq u, vq s) {  /* bytes by shifts: unsigned from u, sign-extended from s */
    const vq m = vq_set1(0xff);
    return acc + (u & m) * ((s << 24) >> 24) + ((u >> 8) & m) * ((s << 16) >> 24) + ((u >> 16) & m) * ((s << 8) >> 24) +
           ((u >> 24) & m) * (s >> 24);
}
INLINE v16 vq_float(vq a) { return __builtin_convertvector(a, v16); }
INLINE vq vq_codes(const uint8_t *p, const int shift, const int bits) {
    u8x64 x;
    memcpy(&x, p, 64);
    if (bits < 8) x = (x >> (uint8_t)shift) & (uint8_t)((1 << bits) - 1);
    return (vq)x;
}
#endif

/* Unpacked vector j (64 codes) of a tile packed by planes into `packed` bytes. */
INLINE vq tile_codes(const uint8_t *tile, const int j, const int bits, const int packed) {
    const int per_plane = packed / 64;
    return vq_codes(tile + 64 * (j % per_plane), (j / per_plane) * bits, bits);
}

/* x rounded to the nearest integer (ties to even, as torch.round) as 16 int32 lanes, stored as bytes. */
INLINE void round_to_bytes(v16 x, void *out) {
#ifdef __AVX512F__
    __m512 f;
    memcpy(&f, &x, 64);
    _mm_storeu_si128((__m128i *)out, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(f)));
#else
    uint8_t *o = (uint8_t *)out;
    for (int k = 0; k < 16; k++) o[k] = (uint8_t)(int32_t)__builtin_rintf(x[k]);
#endif
}

/* Lane i: the largest of the 16 lanes of v[i] (as transpose_sum16, with maxima). */
INLINE v16 transpose_max16(const v16 *v) {
    v16 w[8], y[4], z[2];
    for (int i = 0; i < 8; i++)  /* lanes 0-7: v[2i]'s halves' maxima; 8-15: v[2i + 1]'s */
        w[i] = vmax(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                    __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    for (int i = 0; i < 4; i++)  /* quarters: v[4i], v[4i + 1], v[4i + 2], v[4i + 3] */
        y[i] = vmax(__builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                    __builtin_shufflevector(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    for (int i = 0; i < 2; i++)  /* pairs of lanes: v[8i] .. v[8i + 7] */
        z[i] = vmax(__builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
                    __builtin_shufflevector(y[2 * i], y[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
    return vmax(__builtin_shufflevector(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                __builtin_shufflevector(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}

/* A block of VBLOCK scores s[r][t] (positions outside [first, last) set to -inf here) joined to the running
   online-softmax state of nr queries: mb[r] the block max, f[r] = exp(mb - new running max); the running
   max mr and, when it moves, the per-lane sums lv, the outputs acc (nc vectors) and the min terms zacc (ngv
   vectors) rescaled. Both corrections of up to 8 queries come from one exponential. */
INLINE void block_join(const int nr, const int nc, const int ngv, const int first, const int last, float s[][VBLOCK],
                       float *mr, v16 *lv, v16 acc[][NC], v16 zacc[][MAX_DIM / 16], float *mb, float *f) {
    for (int r = 0; r < nr; r++) {
        for (int t = 0; t < first; t++) s[r][t] = -__builtin_inff();
        for (int t = last; t < VBLOCK; t++) s[r][t] = -__builtin_inff();
        mb[r] = max64(s[r], -__builtin_inff());
    }
    for (int r0 = 0; r0 < nr; r0 += 8) {  /* both corrections of 8 queries in one exponential */
        v16 x = splat(0.0f);
        const int n8 = nr - r0 < 8 ? nr - r0 : 8;
        for (int i = 0; i < n8; i++) {
            const float m_new = mr[r0 + i] > mb[r0 + i] ? mr[r0 + i] : mb[r0 + i];
            x[i] = mb[r0 + i] - m_new, x[8 + i] = mr[r0 + i] - m_new;  /* corr: 0 while mr is -inf */
            mr[r0 + i] = m_new;
        }
        x = exp16(x);
        for (int i = 0; i < n8; i++) {
            const float corr = x[8 + i];
            f[r0 + i] = x[i];
            if (corr != 1.0f) {
                lv[r0 + i] *= corr;
                for (int c = 0; c < nc; c++) acc[r0 + i][c] *= corr;
                for (int gi = 0; gi < ngv; gi++) zacc[r0 + i][gi] *= corr;
            }
        }
    }
}

/* A block of VBLOCK positions' softmax step, shared by the integer paths: scores s[r][t] of positions
   [first, last) against the block max, joined to the running state (block_join; per-lane sums lv of p
   and zacc of p * min, reduced once at the end), and the
   uint8 value weights w8[r][gi][t] = p * scale rounded against their largest (per query and value group;
   scf zeroed outside the range), whose scale times exp(block max - running max) goes to wscale[r][gi].
   The maxima of up to 16 (query, group) pairs come out of one transposed reduction. */
INLINE void block_weights(const int nr, const int nc, const int ngv, const int has_zero, const int first,
                          const int last, float s[][VBLOCK], float scf[][VBLOCK], float zrf[][VBLOCK], float *mr,
                          v16 *lv, v16 acc[][NC], v16 zacc[][MAX_DIM / 16], uint8_t w8[][MAX_DIM / 16][VBLOCK],
                          float wscale[][MAX_DIM / 16]) {
    float mb[MAX_REP], f[MAX_REP];
    block_join(nr, nc, ngv, first, last, s, mr, lv, acc, zacc, mb, f);
    /* p, the running sums, and each (query, group)'s largest p * scale (lanes) */
    v16 p[MAX_REP][VBLOCK / 16], wmax[MAX_REP * MAX_DIM / 16];
    for (int r = 0; r < nr; r++) {
        const v16 fr = splat(f[r]);
        for (int t = 0; t < VBLOCK / 16; t++) {
            memcpy(&p[r][t], &s[r][16 * t], 64);
            p[r][t] = exp16(p[r][t] - mb[r]);
            lv[r] += fr * p[r][t];
        }
        for (int gi = 0; gi < ngv; gi++) {
            v16 zs = splat(0.0f), mx = splat(0.0f);
            for (int t = 0; t < VBLOCK / 16; t++) {
                v16 sc, zr;
                memcpy(&sc, &scf[gi][16 * t], 64);
                if (has_zero) memcpy(&zr, &zrf[gi][16 * t], 64), zs += p[r][t] * zr;
                mx = vmax(mx, p[r][t] * sc);
            }
            wmax[r * ngv + gi] = mx;
            if (has_zero) zacc[r][gi] += fr * zs;
        }
    }
    const int pairs = nr * ngv;
    for (int i0 = 0; i0 < pairs; i0 += 16) {
        v16 m16;
        if (pairs - i0 >= 16) m16 = transpose_max16(wmax + i0);
        else for (int i = 0; i < 16; i++) m16[i] = i0 + i < pairs ? hmax(wmax[i0 + i]) : 0.0f;
        const i32x16 pos = m16 > 0.0f;
        const v16 inv = (v16)((i32x16)(255.0f / m16) & pos);
        for (int i = 0; i < 16 && i0 + i < pairs; i++) {
            const int r = (i0 + i) / ngv, gi = (i0 + i) % ngv;
            wscale[r][gi] = f[r] * (m16[i] / 255.0f);
            const v16 k = splat(inv[i]);
            for (int t = 0; t < VBLOCK / 16; t++) {
                v16 sc;
                memcpy(&sc, &scf[gi][16 * t], 64);
                round_to_bytes(p[r][t] * sc * k, &w8[r][gi][16 * t]);
            }
        }
    }
}

INLINE void attend_int_impl(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,
                            int64_t t1, float *m, float *l, float *acc_out, const int dim, const int kbits,
                            const int kgroup, const int vbits, const int vgroup) {
    const int nc = dim / 16, nr = (n_rep + 3) & ~3, nqb = dim / QBLOCK, ngv = dim / vgroup;
    const int ktile = 16 * dim * kbits / 8, vtile = 4 * dim * vbits / 8;  /* packed bytes */
    v16 acc[MAX_REP][NC];
    float s[MAX_REP][VBLOCK] __attribute__((aligned(64)));
    float mr[MAX_REP], bias[MAX_REP], qscale[MAX_REP][MAX_DIM / QBLOCK];
    int32_t q8[MAX_REP][MAX_DIM / 4] __attribute__((aligned(64)));  /* the rounded query, 4 channels a word */
    float scf[MAX_DIM / 16][VBLOCK] __attribute__((aligned(64))), zrf[MAX_DIM / 16][VBLOCK] __attribute__((aligned(64)));
    uint8_t w8[MAX_REP][MAX_DIM / 16][VBLOCK] __attribute__((aligned(64)));  /* uint8 value weights */
    float wscale[MAX_REP][MAX_DIM / 16];
    v16 lv[MAX_REP], zacc[MAX_REP][MAX_DIM / 16];  /* sums of p and of p * min, lanes summed at the end */
    const uint8_t *kcodes = (const uint8_t *)k->codes + h * k->codes_head_stride;
    const uint8_t *vcodes = (const uint8_t *)v->codes + h * v->codes_head_stride;
    const _Float16 *ksc = k->scale + h * k->scale_head_stride, *kzr = k->zero + h * k->scale_head_stride;
    const _Float16 *vsc = v->scale + h * v->scale_head_stride, *vzr = v->zero + h * v->scale_head_stride;
    for (int r = 0; r < nr; r++) {
        mr[r] = -__builtin_inff(), lv[r] = splat(0.0f);
        for (int c = 0; c < nc; c++) acc[r][c] = splat(0.0f);
        for (int gi = 0; gi < ngv; gi++) zacc[r][gi] = splat(0.0f);
    }
    int64_t kgroup_loaded = -1;
    for (int64_t bs = t0 / VBLOCK * VBLOCK; bs < t1; bs += VBLOCK) {
        const int64_t lo = bs > t0 ? bs : t0, hi = bs + VBLOCK < t1 ? bs + VBLOCK : t1;
        const int first = (int)(lo - bs), last = (int)(hi - bs);
        /* keys: the block's tiles of 16 */
        for (int64_t ts = lo / 16 * 16; ts < hi; ts += 16) {
            const int64_t g = ts / kgroup;
            if (g != kgroup_loaded) {  /* the group's query: q * scale, int8 per QBLOCK channels; q . min */
                kgroup_loaded = g;
                for (int r = 0; r < nr; r++) {
                    v16 qs[NC], zsum = splat(0.0f);
                    for (int c = 0; c < nc; c++) {
                        v16 x = splat(0.0f);
                        if (r < n_rep) memcpy(&x, q + r * dim + 16 * c, 64);
                        zsum += x * load16h(kzr + g * dim + 16 * c);
                        qs[c] = x * load16h(ksc + g * dim + 16 * c);
                    }
                    bias[r] = hsum(zsum);
                    for (int b = 0; b < nqb; b++) {
                        v16 amax = splat(0.0f);
                        for (int c = b * QBLOCK / 16; c < (b + 1) * QBLOCK / 16; c++) {
                            const v16 a = (v16)((i32x16)qs[c] & 0x7fffffff);
                            amax = vmax(amax, a);
                        }
                        const float mx = hmax(amax);
                        const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
                        qscale[r][b] = mx / 127.0f;
                        for (int c = b * QBLOCK / 16; c < (b + 1) * QBLOCK / 16; c++)
                            round_to_bytes(qs[c] * inv, (int8_t *)q8[r] + 16 * c);
                    }
                }
            }
            const uint8_t *tile = kcodes + ts * (dim * kbits / 8);
            for (int o = 0; o < ktile; o += 64) __builtin_prefetch(tile + AHEAD * VBLOCK * (dim * kbits / 8) + o, 0, 2);
            const int off = (int)(ts - bs);  /* 0, 16, 32, 48 */
            for (int r0 = 0; r0 < nr; r0 += 4) {
                v16 s0 = splat(bias[r0]), s1 = splat(bias[r0 + 1]), s2 = splat(bias[r0 + 2]), s3 = splat(bias[r0 + 3]);
UNROLL4
                for (int b = 0; b < nqb; b += 2) {  /* two blocks of 8 words of 4 channels: 8 independent sums */
                    vq a0 = vq_zero(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
UNROLL8
                    for (int i = 0; i < QBLOCK / 4; i++) {
                        const int j = b * QBLOCK / 4 + i, jn = j + QBLOCK / 4;
                        const vq x = tile_codes(tile, j, kbits, ktile), y = tile_codes(tile, jn, kbits, ktile);
                        a0 = vq_dot_set1(a0, x, &q8[r0][j]), c0 = vq_dot_set1(c0, y, &q8[r0][jn]);
                        a1 = vq_dot_set1(a1, x, &q8[r0 + 1][j]), c1 = vq_dot_set1(c1, y, &q8[r0 + 1][jn]);
                        a2 = vq_dot_set1(a2, x, &q8[r0 + 2][j]), c2 = vq_dot_set1(c2, y, &q8[r0 + 2][jn]);
                        a3 = vq_dot_set1(a3, x, &q8[r0 + 3][j]), c3 = vq_dot_set1(c3, y, &q8[r0 + 3][jn]);
                    }
                    s0 += vq_float(a0) * qscale[r0][b] + vq_float(c0) * qscale[r0][b + 1];
                    s1 += vq_float(a1) * qscale[r0 + 1][b] + vq_float(c1) * qscale[r0 + 1][b + 1];
                    s2 += vq_float(a2) * qscale[r0 + 2][b] + vq_float(c2) * qscale[r0 + 2][b + 1];
                    s3 += vq_float(a3) * qscale[r0 + 3][b] + vq_float(c3) * qscale[r0 + 3][b + 1];
                }
                memcpy(&s[r0][off], &s0, 64), memcpy(&s[r0 + 1][off], &s1, 64);
                memcpy(&s[r0 + 2][off], &s2, 64), memcpy(&s[r0 + 3][off], &s3, 64);
            }
        }
        /* the block's value scales and minimums by group (stored group-major per STILE tokens; zero
           outside [lo, hi)) */
        for (int t = 0; t < VBLOCK; t += 16) {
            const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
            const i32x16 in = (lane + t >= first) & (lane + t < last);
            const int64_t at = (bs + t) / STILE * STILE * ngv + (bs + t) % STILE;
            for (int gi = 0; gi < ngv; gi++) {
                const v16 sc = load16h(vsc + at + gi * STILE), zr = load16h(vzr + at + gi * STILE);
                const v16 scm = (v16)((i32x16)sc & in), zrm = (v16)((i32x16)zr & in);
                memcpy(&scf[gi][t], &scm, 64), memcpy(&zrf[gi][t], &zrm, 64);
            }
        }
        block_weights(nr, nc, ngv, 1, first, last, s, scf, zrf, mr, lv, acc, zacc, w8, wscale);
        /* values: per chunk of 16 channels, the block's tiles of 4 tokens */
        const uint8_t *vb = vcodes + bs * (dim * vbits / 8);
        for (int o = 0; o < 16 * vtile; o += 64) __builtin_prefetch(vb + AHEAD * VBLOCK * (dim * vbits / 8) + o, 0, 2);
        const int q0 = first / 4, q1 = (last + 3) / 4;
        for (int r0 = 0; r0 < nr; r0 += 4)
UNROLL8
            for (int c = 0; c < nc; c += 2) {  /* two chunks of one value group (vgroup >= 32): each weight
                                                  broadcast serves 2 dot products */
                const int gi = c * 16 / vgroup;
                const int32_t *w0 = (const int32_t *)w8[r0][gi], *w1 = (const int32_t *)w8[r0 + 1][gi];
                const int32_t *w2 = (const int32_t *)w8[r0 + 2][gi], *w3 = (const int32_t *)w8[r0 + 3][gi];
                vq a0 = vq_zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
                for (int qd = q0; qd < q1; qd++) {
                    const vq x = tile_codes(vb + qd * vtile, c, vbits, vtile);
                    const vq y = tile_codes(vb + qd * vtile, c + 1, vbits, vtile);
                    const vq u0 = vq_set1(w0[qd]), u1 = vq_set1(w1[qd]), u2 = vq_set1(w2[qd]), u3 = vq_set1(w3[qd]);
                    a0 = vq_dot(a0, u0, x), b0 = vq_dot(b0, u0, y);
                    a1 = vq_dot(a1, u1, x), b1 = vq_dot(b1, u1, y);
                    a2 = vq_dot(a2, u2, x), b2 = vq_dot(b2, u2, y);
                    a3 = vq_dot(a3, u3, x), b3 = vq_dot(b3, u3, y);
                }
                acc[r0][c] += vq_float(a0) * wscale[r0][gi], acc[r0][c + 1] += vq_float(b0) * wscale[r0][gi];
                acc[r0 + 1][c] += vq_float(a1) * wscale[r0 + 1][gi], acc[r0 + 1][c + 1] += vq_float(b1) * wscale[r0 + 1][gi];
                acc[r0 + 2][c] += vq_float(a2) * wscale[r0 + 2][gi], acc[r0 + 2][c + 1] += vq_float(b2) * wscale[r0 + 2][gi];
                acc[r0 + 3][c] += vq_float(a3) * wscale[r0 + 3][gi], acc[r0 + 3][c + 1] += vq_float(b3) * wscale[r0 + 3][gi];
            }
    }
    for (int r = 0; r < n_rep; r++) {
        m[r] = mr[r];
        l[r] = hsum(lv[r]);
        for (int c = 0; c < nc; c++) acc[r][c] += hsum(zacc[r][c * 16 / vgroup]);
        memcpy(acc_out + r * dim, &acc[r][0], sizeof(float) * dim);
    }
}


/* ---- Integer attention over int8 rows (the int8 format: symmetric per-token codes, one scale per row,
   stored row by row).

   Keys: each query rounded to int8 per 4 channels (one float scale per 32-bit lane: the dot products'
   lanes are a row's channel quads), dotted by VNNI with the row's codes as unsigned bytes (code XOR 0x80
   = code + 128; the sums start at -128 x the lane's query sum), the lanes scaled and summed 16 rows at a
   time, times the row's scale. Values: as the KIVI formats' (block_weights), the 4 rows of a tile
   interleaved in registers (byte, then 16-bit unpacks within 128-bit lanes) so that a lane holds one
   channel of 4 rows; that leaves the channels of each 64-byte half permuted, undone once at the end.
   kv_quant's PyTorch path (_row_key_scores, _merge_blocks) computes the same numbers. */

static const uint8_t ZERO_ROW[2 * MAX_DIM] __attribute__((aligned(64)));  /* stands in for rows out of the range */

INLINE vq vq_load(const void *p) {
    vq x;
    memcpy(&x, p, 64);
    return x;
}
INLINE vq vq_xor80(vq x) { return (vq)((u8x64)x ^ (uint8_t)0x80); }
/* 4 rows' 64 bytes -> 4 vectors whose lane 4L + i holds channel 16L + 4k + i of the rows (vector k) */
INLINE void interleave4(vq r0, vq r1, vq r2, vq r3, vq *out) {
    const u8x64 a = __builtin_shufflevector((u8x64)r0, (u8x64)r1, 0, 64, 1, 65, 2, 66, 3, 67, 4, 68, 5, 69, 6, 70, 7, 71, 16, 80, 17, 81, 18, 82, 19, 83, 20, 84, 21, 85, 22, 86, 23, 87, 32, 96, 33, 97, 34, 98, 35, 99, 36, 100, 37, 101, 38, 102, 39, 103, 48, 112, 49, 113, 50, 114, 51, 115, 52, 116, 53, 117, 54, 118, 55, 119);
    const u8x64 b = __builtin_shufflevector((u8x64)r2, (u8x64)r3, 0, 64, 1, 65, 2, 66, 3, 67, 4, 68, 5, 69, 6, 70, 7, 71, 16, 80, 17, 81, 18, 82, 19, 83, 20, 84, 21, 85, 22, 86, 23, 87, 32, 96, 33, 97, 34, 98, 35, 99, 36, 100, 37, 101, 38, 102, 39, 103, 48, 112, 49, 113, 50, 114, 51, 115, 52, 116, 53, 117, 54, 118, 55, 119);
    const u8x64 c = __builtin_shufflevector((u8x64)r0, (u8x64)r1, 8, 72, 9, 73, 10, 74, 11, 75, 12, 76, 13, 77, 14, 78, 15, 79, 24, 88, 25, 89, 26, 90, 27, 91, 28, 92, 29, 93, 30, 94, 31, 95, 40, 104, 41, 105, 42, 106, 43, 107, 44, 108, 45, 109, 46, 110, 47, 111, 56, 120, 57, 121, 58, 122, 59, 123, 60, 124, 61, 125, 62, 126, 63, 127);
    const u8x64 d = __builtin_shufflevector((u8x64)r2, (u8x64)r3, 8, 72, 9, 73, 10, 74, 11, 75, 12, 76, 13, 77, 14, 78, 15, 79, 24, 88, 25, 89, 26, 90, 27, 91, 28, 92, 29, 93, 30, 94, 31, 95, 40, 104, 41, 105, 42, 106, 43, 107, 44, 108, 45, 109, 46, 110, 47, 111, 56, 120, 57, 121, 58, 122, 59, 123, 60, 124, 61, 125, 62, 126, 63, 127);
    out[0] = (vq)__builtin_shufflevector(a, b, 0, 1, 64, 65, 2, 3, 66, 67, 4, 5, 68, 69, 6, 7, 70, 71, 16, 17, 80, 81, 18, 19, 82, 83, 20, 21, 84, 85, 22, 23, 86, 87, 32, 33, 96, 97, 34, 35, 98, 99, 36, 37, 100, 101, 38, 39, 102, 103, 48, 49, 112, 113, 50, 51, 114, 115, 52, 53, 116, 117, 54, 55, 118, 119);
    out[1] = (vq)__builtin_shufflevector(a, b, 8, 9, 72, 73, 10, 11, 74, 75, 12, 13, 76, 77, 14, 15, 78, 79, 24, 25, 88, 89, 26, 27, 90, 91, 28, 29, 92, 93, 30, 31, 94, 95, 40, 41, 104, 105, 42, 43, 106, 107, 44, 45, 108, 109, 46, 47, 110, 111, 56, 57, 120, 121, 58, 59, 122, 123, 60, 61, 124, 125, 62, 63, 126, 127);
    out[2] = (vq)__builtin_shufflevector(c, d, 0, 1, 64, 65, 2, 3, 66, 67, 4, 5, 68, 69, 6, 7, 70, 71, 16, 17, 80, 81, 18, 19, 82, 83, 20, 21, 84, 85, 22, 23, 86, 87, 32, 33, 96, 97, 34, 35, 98, 99, 36, 37, 100, 101, 38, 39, 102, 103, 48, 49, 112, 113, 50, 51, 114, 115, 52, 53, 116, 117, 54, 55, 118, 119);
    out[3] = (vq)__builtin_shufflevector(c, d, 8, 9, 72, 73, 10, 11, 74, 75, 12, 13, 76, 77, 14, 15, 78, 79, 24, 25, 88, 89, 26, 27, 90, 91, 28, 29, 92, 93, 30, 31, 94, 95, 40, 41, 104, 105, 42, 43, 106, 107, 44, 45, 108, 109, 46, 47, 110, 111, 56, 57, 120, 121, 58, 59, 122, 123, 60, 61, 124, 125, 62, 63, 126, 127);
}

/* 16 scales from p (float16), 0 for positions outside [a, b) (nothing read there) */
INLINE v16 load16h_in(const _Float16 *p, int64_t at, int64_t a, int64_t b) {
    if (at >= a && at + 16 <= b) return load16h(p + at);
    v16 x = splat(0.0f);
    for (int i = 0; i < 16; i++)
        if (at + i >= a && at + i < b) x[i] = (float)p[at + i];
    return x;
}

/* The running state out of a path whose value accumulators (acc: NC vectors a query) hold channels as
   in-lane unpacks of `per`-way interleaved rows leave them: in each run of `per` vectors (16 * per
   channels), lane 4 L + i of the run's vector j is channel 4 * per * L + 4 j + i. */
INLINE void finish_permuted(int n_rep, int dim, const int per, const float *mr, const v16 *lv, const float *acc,
                            float *m, float *l, float *acc_out) {
    for (int r = 0; r < n_rep; r++) {
        m[r] = mr[r];
        l[r] = hsum(lv[r]);
        const float *pa = acc + r * NC * 16;
        for (int g = 0; g < dim / (16 * per); g++)
            for (int j = 0; j < per; j++)
                for (int L = 0; L < 4; L++)
                    for (int i = 0; i < 4; i++) acc_out[r * dim + 16 * per * g + 4 * per * L + 4 * j + i] = pa[16 * (per * g + j) + 4 * L + i];
    }
}

INLINE void attend_i8_impl(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,
                           int64_t t1, float *m, float *l, float *acc_out, const int dim) {
    const int nc = dim / 16, nh = dim / 64, nr = (n_rep + 3) & ~3;
    v16 acc[MAX_REP][NC], lv[MAX_REP], zacc[MAX_REP][MAX_DIM / 16], qsv[MAX_REP][MAX_DIM / 64];
    v16 part[MAX_REP][16];  /* per query and row of a tile of 16: its score's lanes */
    vq q8[MAX_REP][MAX_DIM / 64], qz[MAX_REP][MAX_DIM / 64];
    float s[MAX_REP][VBLOCK] __attribute__((aligned(64))), scf[1][VBLOCK] __attribute__((aligned(64)));
    float mr[MAX_REP], wscale[MAX_REP][MAX_DIM / 16];
    uint8_t w8[MAX_REP][MAX_DIM / 16][VBLOCK] __attribute__((aligned(64)));
    const uint8_t *kcodes = (const uint8_t *)k->codes + h * k->codes_head_stride;
    const uint8_t *vcodes = (const uint8_t *)v->codes + h * v->codes_head_stride;
    const _Float16 *ksc = k->scale + h * k->scale_head_stride, *vsc = v->scale + h * v->scale_head_stride;
    for (int r = 0; r < nr; r++) {
        mr[r] = -__builtin_inff(), lv[r] = splat(0.0f);
        for (int c = 0; c < nc; c++) acc[r][c] = splat(0.0f), zacc[r][c] = splat(0.0f);
        for (int hh = 0; hh < nh; hh++) {  /* the query: int8 per 4 channels */
            int8_t b8[64] __attribute__((aligned(64)));
            i32x16 z;
            for (int lane = 0; lane < 16; lane++) {
                const float *x = q + r * dim + 64 * hh + 4 * lane;
                float amax = 0.0f;
                for (int i = 0; i < 4 && r < n_rep; i++) amax = __builtin_fabsf(x[i]) > amax ? __builtin_fabsf(x[i]) : amax;
                const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
                int32_t sum = 0;
                for (int i = 0; i < 4; i++) {
                    b8[4 * lane + i] = r < n_rep ? (int8_t)__builtin_rintf(x[i] * inv) : 0;
                    sum += b8[4 * lane + i];
                }
                qsv[r][hh][lane] = amax / 127.0f;
                z[lane] = -128 * sum;
            }
            memcpy(&q8[r][hh], b8, 64);
            memcpy(&qz[r][hh], &z, 64);
        }
    }
    for (int64_t bs = t0 / VBLOCK * VBLOCK; bs < t1; bs += VBLOCK) {
        const int64_t lo = bs > t0 ? bs : t0, hi = bs + VBLOCK < t1 ? bs + VBLOCK : t1;
        const int first = (int)(lo - bs), last = (int)(hi - bs);
        /* keys: per tile of 16 rows, each row against every query, the lanes summed together */
        for (int64_t ts = lo / 16 * 16; ts < hi; ts += 16) {
            for (int i = 0; i < 16; i++) {
                const int64_t t = ts + i;
                if (t < lo || t >= hi) {
                    for (int r = 0; r < nr; r++) part[r][i] = splat(0.0f);
                    continue;
                }
                const uint8_t *row = kcodes + t * dim;
                prefetch_row(row, dim);
                vq x[MAX_DIM / 64];
                for (int hh = 0; hh < nh; hh++) x[hh] = vq_xor80(vq_load(row + 64 * hh));
                for (int r = 0; r < nr; r++) {
                    v16 sum = vq_float(vq_dot(qz[r][0], x[0], q8[r][0])) * qsv[r][0];
                    for (int hh = 1; hh < nh; hh++) sum += vq_float(vq_dot(qz[r][hh], x[hh], q8[r][hh])) * qsv[r][hh];
                    part[r][i] = sum;
                }
            }
            const v16 ks = load16h_in(ksc, ts, lo, hi);
            for (int r = 0; r < nr; r++) {
#ifdef __AVX512F__
                const __m512 t16 = transpose_sum16((const __m512 *)part[r]);
                v16 sc;
                memcpy(&sc, &t16, 64);
#else
                v16 sc;
                for (int i = 0; i < 16; i++) sc[i] = hsum(part[r][i]);
#endif
                sc *= ks;
                memcpy(&s[r][ts - bs], &sc, 64);
            }
        }
        for (int t = 0; t < VBLOCK; t += 16) {
            const v16 sc = load16h_in(vsc, bs + t, lo, hi);
            memcpy(&scf[0][t], &sc, 64);
        }
        block_weights(nr, nc, 1, 0, first, last, s, scf, scf, mr, lv, acc, zacc, w8, wscale);
        /* values: per 64-byte half, the block's tiles of 4 rows interleaved, against 4 queries */
        for (int o = 0; o < VBLOCK * dim; o += 64) __builtin_prefetch(vcodes + (bs + AHEAD * VBLOCK) * dim + o, 0, 2);
        const int q0 = first / 4, q1 = (last + 3) / 4;
        for (int r0 = 0; r0 < nr; r0 += 4)
            for (int hh = 0; hh < nh; hh++) {
                const int32_t *w0 = (const int32_t *)w8[r0][0], *w1 = (const int32_t *)w8[r0 + 1][0];
                const int32_t *w2 = (const int32_t *)w8[r0 + 2][0], *w3 = (const int32_t *)w8[r0 + 3][0];
                vq a[4][4];
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) a[i][j] = vq_zero();
                for (int qd = q0; qd < q1; qd++) {
                    const int64_t t = bs + 4 * qd;
                    vq x[4], rows[4];
                    for (int i = 0; i < 4; i++)  /* rows before lo are inside the page (weight 0); past hi, zeros */
                        rows[i] = vq_load((t + i < hi ? vcodes + (t + i) * dim : ZERO_ROW) + 64 * hh);
                    interleave4(rows[0], rows[1], rows[2], rows[3], x);
                    const vq u0 = vq_set1(w0[qd]), u1 = vq_set1(w1[qd]), u2 = vq_set1(w2[qd]), u3 = vq_set1(w3[qd]);
                    for (int j = 0; j < 4; j++) {
                        a[0][j] = vq_dot(a[0][j], u0, x[j]), a[1][j] = vq_dot(a[1][j], u1, x[j]);
                        a[2][j] = vq_dot(a[2][j], u2, x[j]), a[3][j] = vq_dot(a[3][j], u3, x[j]);
                    }
                }
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) acc[r0 + i][4 * hh + j] += vq_float(a[i][j]) * wscale[r0 + i][0];
            }
    }
    finish_permuted(n_rep, dim, 4, mr, lv, (const float *)acc, m, l, acc_out);
}


#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* ---- Plain bfloat16 rows by AVX512-BF16 dot products (vdpbf16ps: two bfloat16 products per float
   lane, exact products, float sums).

   Keys: each query split into bfloat16 high and low parts (q = hi + lo to ~16 significant bits), both
   dotted with a row (lanes: channel pairs), the lanes summed 16 rows at a time. Values: the block's
   softmax weights (times exp(block max - running max)) rounded to bfloat16 in pairs of rows and dotted
   with the 2 rows interleaved by 16-bit words (unpacks within 128-bit lanes: the channels come out
   permuted, undone once at the end). The block's largest weight is exactly representable; the others
   carry bfloat16's relative rounding (2^-9), as bfloat16 attention's probabilities do. */
#define BF16_DIM_OK(D) ((D) % 64 == 0)

INLINE void attend_bf16_impl(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,
                             int64_t t1, float *m, float *l, float *acc_out, const int dim) {
    const int nj = dim / 32, nr = (n_rep + 3) & ~3;  /* nj: 64-byte vectors (32 channels) a row */
    v16 acc[MAX_REP][NC];
    __m512 part[MAX_REP][16];
    __m512bh qhi[MAX_REP][MAX_DIM / 32], qlo[MAX_REP][MAX_DIM / 32];
    float s[MAX_REP][VBLOCK] __attribute__((aligned(64))), mr[MAX_REP];
    uint16_t w16[MAX_REP][VBLOCK] __attribute__((aligned(64)));  /* bfloat16 weights */
    v16 lv[MAX_REP];
    const uint8_t *kcodes = (const uint8_t *)k->codes + h * k->codes_head_stride;
    const uint8_t *vcodes = (const uint8_t *)v->codes + h * v->codes_head_stride;
    const int row = 2 * dim;
    for (int r = 0; r < nr; r++) {
        mr[r] = -__builtin_inff(), lv[r] = splat(0.0f);
        for (int c = 0; c < dim / 16; c++) acc[r][c] = splat(0.0f);
        for (int j = 0; j < nj; j++) {
            __m512 a = _mm512_setzero_ps(), b = a;
            if (r < n_rep) a = _mm512_loadu_ps(q + r * dim + 32 * j), b = _mm512_loadu_ps(q + r * dim + 32 * j + 16);
            qhi[r][j] = _mm512_cvtne2ps_pbh(b, a);
            const __m512 ra = _mm512_sub_ps(a, _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256((__m512i)qhi[r][j])));
            const __m512 rb = _mm512_sub_ps(b, _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64((__m512i)qhi[r][j], 1)));
            qlo[r][j] = _mm512_cvtne2ps_pbh(rb, ra);
        }
    }
    for (int64_t bs = t0 / VBLOCK * VBLOCK; bs < t1; bs += VBLOCK) {
        const int64_t lo = bs > t0 ? bs : t0, hi = bs + VBLOCK < t1 ? bs + VBLOCK : t1;
        const int first = (int)(lo - bs), last = (int)(hi - bs);
        for (int64_t ts = lo / 16 * 16; ts < hi; ts += 16) {
            for (int i = 0; i < 16; i++) {
                const int64_t t = ts + i;
                if (t < lo || t >= hi) {
                    for (int r = 0; r < nr; r++) part[r][i] = _mm512_setzero_ps();
                    continue;
                }
                const uint8_t *kr = kcodes + t * row;
                prefetch_row(kr, row);
                __m512bh x[MAX_DIM / 32];
                for (int j = 0; j < nj; j++) x[j] = (__m512bh)_mm512_loadu_si512(kr + 64 * j);
                for (int r = 0; r < nr; r++) {
                    __m512 a = _mm512_setzero_ps(), b = a;
                    for (int j = 0; j < nj; j++) a = _mm512_dpbf16_ps(a, qhi[r][j], x[j]), b = _mm512_dpbf16_ps(b, qlo[r][j], x[j]);
                    part[r][i] = _mm512_add_ps(a, b);
                }
            }
            for (int r = 0; r < nr; r++) _mm512_storeu_ps(&s[r][ts - bs], transpose_sum16(part[r]));
        }
        /* the block's softmax step: weights p * exp(block max - running max), so the block adds straight in */
        float mb[MAX_REP], f[MAX_REP];
        block_join(nr, dim / 16, 0, first, last, s, mr, lv, acc, 0, mb, f);
        for (int r = 0; r < nr; r++) {
            for (int t = 0; t < VBLOCK; t += 32) {
                v16 a, b;
                memcpy(&a, &s[r][t], 64), memcpy(&b, &s[r][t + 16], 64);
                a = exp16(a - mb[r]) * f[r], b = exp16(b - mb[r]) * f[r];
                lv[r] += a + b;
                __m512 fa, fb;
                memcpy(&fa, &a, 64), memcpy(&fb, &b, 64);
                _mm512_storeu_si512(&w16[r][t], (__m512i)_mm512_cvtne2ps_pbh(fb, fa));
            }
        }
        /* values: pairs of rows (zero rows outside the range: never 0 x garbage), 32 channels at a time */
        const int q0 = first / 2, q1 = (last + 1) / 2;
        for (int r0 = 0; r0 < nr; r0 += 4)
            for (int j0 = 0; j0 < nj; j0 += 2) {
                const int32_t *w0 = (const int32_t *)w16[r0], *w1 = (const int32_t *)w16[r0 + 1];
                const int32_t *w2 = (const int32_t *)w16[r0 + 2], *w3 = (const int32_t *)w16[r0 + 3];
                __m512 a[4][4];
                for (int i = 0; i < 4; i++)
                    for (int c = 0; c < 4; c++) a[i][c] = _mm512_setzero_ps();
                for (int qd = q0; qd < q1; qd++) {
                    const int64_t t = bs + 2 * qd;
                    const uint8_t *ra = t >= lo && t < hi ? vcodes + t * row : ZERO_ROW;
                    const uint8_t *rb = t + 1 >= lo && t + 1 < hi ? vcodes + (t + 1) * row : ZERO_ROW;
                    __m512bh x[4];
                    for (int jj = 0; jj < 2; jj++) {
                        const __m512i A = _mm512_loadu_si512(ra + 64 * (j0 + jj)), B = _mm512_loadu_si512(rb + 64 * (j0 + jj));
                        x[2 * jj] = (__m512bh)_mm512_unpacklo_epi16(A, B), x[2 * jj + 1] = (__m512bh)_mm512_unpackhi_epi16(A, B);
                    }
                    const __m512bh u0 = (__m512bh)_mm512_set1_epi32(w0[qd]), u1 = (__m512bh)_mm512_set1_epi32(w1[qd]);
                    const __m512bh u2 = (__m512bh)_mm512_set1_epi32(w2[qd]), u3 = (__m512bh)_mm512_set1_epi32(w3[qd]);
                    for (int c = 0; c < 4; c++) {
                        a[0][c] = _mm512_dpbf16_ps(a[0][c], u0, x[c]), a[1][c] = _mm512_dpbf16_ps(a[1][c], u1, x[c]);
                        a[2][c] = _mm512_dpbf16_ps(a[2][c], u2, x[c]), a[3][c] = _mm512_dpbf16_ps(a[3][c], u3, x[c]);
                    }
                }
                for (int i = 0; i < 4; i++)
                    for (int c = 0; c < 4; c++) acc[r0 + i][2 * j0 + c] += (v16)a[i][c];
            }
    }
    finish_permuted(n_rep, dim, 2, mr, lv, (const float *)acc, m, l, acc_out);
}
#define SPECIAL_BF16(NAME, D)                                                                                  \
    static void NAME(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,       \
                     int64_t t1, float *m, float *l, float *acc) {                                             \
        attend_bf16_impl(n_rep, q, k, v, h, t0, t1, m, l, acc, D);                                             \
    }
#else
#define SPECIAL_BF16(NAME, D) SPECIAL(NAME, D, 16, D, 0, 16, D, 0)
#endif

/* One function per (head_dim, format) that zen-eco uses, the format a constant in each; anything
   else is refused (the caller then uses its PyTorch path). */
typedef void (*range_fn)(int, const float *, const side_t *, const side_t *, int64_t, int64_t, int64_t, float *,
                         float *, float *);
#define SPECIAL(NAME, D, KB, KG, KZ, VB, VG, VZ)                                                              \
    static void NAME(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,       \
                     int64_t t1, float *m, float *l, float *acc) {                                             \
        attend_impl(n_rep, q, k, v, h, t0, t1, m, l, acc, D, KB, KG, KZ, VB, VG, VZ);                         \
    }
#define SPECIAL_INT(NAME, D, KB, KG, VB, VG)                                                                   \
    static void NAME(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,       \
                     int64_t t1, float *m, float *l, float *acc) {                                             \
        attend_int_impl(n_rep, q, k, v, h, t0, t1, m, l, acc, D, KB, KG, VB, VG);                              \
    }
#define SPECIAL_I8(NAME, D)                                                                                    \
    static void NAME(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,       \
                     int64_t t1, float *m, float *l, float *acc) {                                             \
        attend_i8_impl(n_rep, q, k, v, h, t0, t1, m, l, acc, D);                                               \
    }
#define FORMATS(D)                                                                                             \
    SPECIAL_I8(int8_##D, D)                                                                                    \
    SPECIAL_INT(int4_##D, D, 4, 128, 4, 32)                                                                    \
    SPECIAL_INT(int2_##D, D, 2, 32, 2, 32)                                                                     \
    SPECIAL_INT(k4v2_##D, D, 4, 128, 2, 32)                                                                    \
    SPECIAL_BF16(bf16_##D, D)                                                                                  \
    SPECIAL(f32_##D, D, 32, D, 0, 32, D, 0)
FORMATS(64)
FORMATS(128)
FORMATS(256)

static range_fn pick(int dim, const side_t *k, const side_t *v) {
    const int kz = k->zero != 0, vz = v->zero != 0;
#define MATCH(D, KB, KPC, KG, KZ, VB, VPC, VG, VZ)                                                            \
    (dim == D && k->bits == KB && k->per_channel == KPC && k->group == KG && kz == KZ && v->bits == VB &&       \
     v->per_channel == VPC && v->group == VG && vz == VZ)
#define TRY(D)                                                                                                 \
    if (MATCH(D, 8, 0, D, 0, 8, 0, D, 0)) return int8_##D;                                                     \
    if (MATCH(D, 4, 1, 128, 1, 4, 0, 32, 1)) return int4_##D;                                                  \
    if (MATCH(D, 2, 1, 32, 1, 2, 0, 32, 1)) return int2_##D;                                                  \
    if (MATCH(D, 4, 1, 128, 1, 2, 0, 32, 1)) return k4v2_##D;                                                  \
    if (MATCH(D, 16, 0, D, 0, 16, 0, D, 0)) return bf16_##D;                                                   \
    if (MATCH(D, 32, 0, D, 0, 32, 0, D, 0)) return f32_##D;
    TRY(64) TRY(128) TRY(256)
    return 0;
}

int zen_kv_supported(int dim, const side_t *k, const side_t *v) { return pick(dim, k, v) != 0; }

/* Where task `part` of a range split in `span`s starts: on a multiple of VBLOCK, so that no value block
   (whose weights share a scale) is split between tasks and the result does not depend on the threads. */
static int64_t cut(int64_t t0, int64_t t1, int64_t span, int part, int splits) {
    const int64_t x = (t0 + part * span) / VBLOCK * VBLOCK;
    return part == 0 ? t0 : part == splits ? t1 : x < t0 ? t0 : x > t1 ? t1 : x;
}

/* q: (heads, n_rep, dim) float, already scaled. m, l: (heads, n_rep), acc: (heads, n_rep, dim): the
   running online-softmax state, merged with tokens [t0, t1) of every head. dim must be a multiple
   of 16 and of 16 * 8 / bits, per-token groups multiples of 16. Returns 0, or -1 when the shapes do
   not fit (callers check first) or memory runs out. */
int zen_kv_attend(int heads, int n_rep, int dim, int64_t t0, int64_t t1, const float *q, const side_t *k,
                  const side_t *v, float *m, float *l, float *acc, int n_threads) {
    const range_fn fn = pick(dim, k, v);
    if (t1 <= t0) return 0;
    if (!fn || n_rep > MAX_REP) return -1;
    int splits = (2 * n_threads + heads - 1) / heads;  /* enough tasks for every thread, even for few heads */
    const int64_t most = (t1 - t0 + 1023) / 1024;
    if (splits > most) splits = (int)most;
    if (splits < 1) splits = 1;
    const int tasks = heads * splits, per = n_rep * (dim + 2);
    float *scratch = (float *)malloc(sizeof(float) * (size_t)tasks * per);
    if (!scratch) return -1;
    const int64_t span = (t1 - t0 + splits - 1) / splits;
    #pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int task = 0; task < tasks; task++) {
        const int h = task / splits, part = task % splits;
        const int64_t a = cut(t0, t1, span, part, splits), b = cut(t0, t1, span, part + 1, splits);
        float *sm = scratch + (size_t)task * per, *sl = sm + n_rep, *sa = sl + n_rep;
        if (a >= b) { for (int r = 0; r < n_rep; r++) { sm[r] = -__builtin_inff(); sl[r] = 0.0f; } continue; }
        fn(n_rep, q + (size_t)h * n_rep * dim, k, v, h, a, b, sm, sl, sa);
    }
    for (int task = 0; task < tasks; task++) {
        const int h = task / splits;
        const float *sm = scratch + (size_t)task * per, *sl = sm + n_rep, *sa = sl + n_rep;
        merge(n_rep, dim, m + h * n_rep, l + h * n_rep, acc + (size_t)h * n_rep * dim, sm, sl, sa);
    }
    free(scratch);
    return 0;
}
"""


class Side(ctypes.Structure):
    """One of K or V as the kernel reads it (see the module docstring for the layouts)."""

    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("codes_head_stride", ctypes.c_int64), ("scale_head_stride", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("group", ctypes.c_int32), ("per_channel", ctypes.c_int32)]


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (then callers use PyTorch ops)."""
    if os.environ.get("ZEN_ECO_NATIVE_KV", "1") == "0":
        return None
    lib = native.build("kv_attend", C_SOURCE)
    if lib is None:
        return None
    lib.zen_kv_supported.restype = ctypes.c_int
    lib.zen_kv_supported.argtypes = [ctypes.c_int, ctypes.POINTER(Side), ctypes.POINTER(Side)]
    fn = lib.zen_kv_attend
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.POINTER(Side), ctypes.POINTER(Side), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int]
    return lib


def plain_side(x: torch.Tensor) -> Side:
    """A descriptor of unquantized rows x (batch, heads, tokens, dim), bfloat16 or float32, contiguous."""
    if x.dtype not in (torch.bfloat16, torch.float32) or not x.is_contiguous():
        raise ValueError(f"plain rows must be contiguous bfloat16 or float32, not {x.dtype}")
    heads = x.shape[0] * x.shape[1]
    side = Side(x.data_ptr(), 0, 0, x.numel() // heads * x.element_size(), 0, 8 * x.element_size(), x.shape[-1], 0)
    side._keep = x
    return side


def supported(dim: int, k: Side, v: Side) -> bool:
    """Whether the kernel has a specialisation for this head_dim and pair of formats."""
    lib = library()
    return lib is not None and bool(lib.zen_kv_supported(dim, ctypes.byref(k), ctypes.byref(v)))


def attend(q: torch.Tensor, k: Side, v: Side, t0: int, t1: int, m: torch.Tensor, l: torch.Tensor,
           acc: torch.Tensor) -> None:
    """Merge tokens [t0, t1) of one page into the online-softmax state, in place.
    q: (heads, n_rep, dim) float32 contiguous, scaled; m, l: (heads, n_rep); acc: (heads, n_rep, dim)."""
    heads, n_rep, dim = q.shape
    rc = library().zen_kv_attend(heads, n_rep, dim, t0, t1, q.data_ptr(), ctypes.byref(k), ctypes.byref(v),
                                 m.data_ptr(), l.data_ptr(), acc.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"kv attention kernel failed for heads={heads} n_rep={n_rep} dim={dim}")
