"""A small C kernel for decode attention over a quantized KV cache, built on first use.

PyTorch has no CPU op that reads 2-, 4- or 8-bit K/V codes and attends in one pass: dequantizing
a chunk with tensor ops writes and re-reads float32 copies (~8 passes over 4-byte values per 2-bit
code), which at 160K tokens costs tens of seconds per token. This kernel reads each code once: per
block of 64 tokens it scores the keys row by row (per-channel key scales are folded into the query
once per key group), takes exp against the running max, then adds the dequantized value rows into
the query heads' accumulators (online softmax, merged across blocks, threads and pages by
log-sum-exp). The arithmetic is float32 in 16-wide GCC vectors, so it costs 2 x n_rep x head_dim
multiply-adds per position and KV head whatever the format: on the 2-core build machine that is
~70 ns per position and KV head per thread, which int8 codes match with memory reads but 2-bit codes
do not (docs/benchmarks.md, "Long context: KV cache formats"). One specialisation per head_dim (64, 128,
256) and zen-eco format keeps every loop bound and shift a constant.

It is built on first use by `native.build` (system C compiler, OpenMP threads following
torch.get_num_threads()). Without a compiler (or with ZEN_ECO_NATIVE=0 or ZEN_ECO_NATIVE_KV=0, or for
tensors not on the CPU) `kv_quant` uses its chunked PyTorch path instead: the same numbers, slower.

Layouts (one per side, K or V; `heads` = batch x KV heads, all contiguous):
  codes  (heads, capacity, dim * bits / 8): int8 codes, or 4-/2-bit codes packed by planes: byte i
         of a row holds column i + j * (dim / n) in bits [j * bits, (j + 1) * bits), n = 8 / bits
  scale, zero (float16): per token, (heads, capacity, dim / group) for groups of `group` columns;
         per channel, (heads, capacity / group, dim) for groups of `group` tokens. zero NULL: symmetric.
  value = code * scale + zero
  Plain rows (bits 16: bfloat16, 32: float32; scale and zero NULL) are the cache's unquantized first
  tokens and residual window, attended by the same call so every merge happens here.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import torch

from . import native

MAX_DIM, MAX_REP = 256, 16  # the kernel's stack buffers

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

/* GCC vector types: 16 floats (one AVX-512 register; two AVX2 ones). */
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

typedef struct {
    const void *codes;
    const _Float16 *scale;
    const _Float16 *zero;
    int64_t codes_head_stride;  /* bytes */
    int64_t scale_head_stride;  /* elements */
    int32_t bits, group, per_channel;
} side_t;

INLINE v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* exp(x) of 16 scores minus their max (x <= 0), and 0 below -87: 2^n * p(r), r = x - n ln 2 in
   [-ln2/2, ln2/2], p a degree-6 Taylor polynomial; relative error < 2e-7. */
INLINE v16 exp16(v16 x) {
    const i32x16 keep = x >= splat(-87.0f);
    x = (v16)(((i32x16)x & keep) | ((i32x16)splat(-87.0f) & ~keep));
    const i32x16 ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x16);  /* round(): x <= 0 */
    const v16 n = __builtin_convertvector(ni, v16);
    const v16 r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    v16 p = splat(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return (v16)((i32x16)(p * (v16)((ni + 127) << 23)) & keep);
}

static inline float hsum(v16 v) {
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
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
    int64_t group;                 /* per channel: the token group whose scales are loaded */
    v16 sc[NC], zr[NC];            /* per channel: that group's scale and zero rows */
} reader_t;

INLINE void reader_init(reader_t *rd, const side_t *s, int64_t h) {
    rd->codes = (const uint8_t *)s->codes + h * s->codes_head_stride;
    rd->scale = s->scale + h * s->scale_head_stride;
    rd->zero = s->zero ? s->zero + h * s->scale_head_stride : 0;
    rd->group = -1;
}

/* Row t dequantized into out[dim / 16]. The format arguments are compile-time constants in every
   specialisation below, so the loops unroll and the shifts are immediates. */
INLINE void read_row(reader_t *rd, int64_t t, v16 *out, const int dim, const int bits, const int per_channel,
                     const int group, const int has_zero) {
    const int nc = dim / 16;
    const uint8_t *row = rd->codes + t * (dim * bits / 8);
    if (bits >= 16) {  /* plain rows (the unquantized sink and residual window) */
        for (int c = 0; c < nc; c++) out[c] = codes16(row, bits, nc, c);
    } else if (per_channel) {
        const int64_t g = t / group;
        if (g != rd->group) {
            rd->group = g;
            for (int c = 0; c < nc; c++) {
                rd->sc[c] = load16h(rd->scale + g * dim + 16 * c);
                rd->zr[c] = has_zero ? load16h(rd->zero + g * dim + 16 * c) : splat(0.0f);
            }
        }
        for (int c = 0; c < nc; c++) out[c] = codes16(row, bits, nc, c) * rd->sc[c] + rd->zr[c];
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
                        const int kpc, const int kgroup, const int kzero, const int vbits, const int vpc,
                        const int vgroup, const int vzero) {
    const int nc = dim / 16, nr = (n_rep + 3) & ~3;
    v16 qv[MAX_REP][NC], qs[MAX_REP][NC], acc[MAX_REP][NC], row[NC], vbuf[BLOCK][NC];
    float s[MAX_REP][BLOCK], bias[MAX_REP], mr[MAX_REP], lr[MAX_REP];
#ifdef __AVX512F__
    v16 part[MAX_REP][BLOCK], biasv[MAX_REP];  /* per query and token: a score's 16 partial sums */
    for (int r = 0; r < MAX_REP; r++) biasv[r] = splat(0.0f);
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
    int64_t kgroup_loaded = -1;
    for (int64_t b0 = t0; b0 < t1; b0 += BLOCK) {
        const int n = (int)(t1 - b0 < BLOCK ? t1 - b0 : BLOCK);
        for (int t = 0; t < n; t++) {
            const int64_t tok = b0 + t;
            prefetch_row(kr.codes + tok * (dim * kbits / 8), dim * kbits / 8);
            if (kpc) {  /* per-channel keys: q . (code * sc + zr) = (q * sc) . code + q . zr, folded per group */
                const int64_t g = tok / kgroup;
                if (g != kgroup_loaded) {
                    kgroup_loaded = g;
                    for (int r = 0; r < nr; r++) {
                        v16 zsum = splat(0.0f);
                        for (int c = 0; c < nc; c++) {
                            const v16 sc = load16h(kr.scale + g * dim + 16 * c);
                            qs[r][c] = qv[r][c] * sc;
                            if (kzero) zsum += qv[r][c] * load16h(kr.zero + g * dim + 16 * c);
                        }
                        bias[r] = hsum(zsum);
#ifdef __AVX512F__
                        biasv[r] = splat(0.0f);
                        biasv[r][0] = bias[r];
#endif
                    }
                }
                const uint8_t *codes = kr.codes + tok * (dim * kbits / 8);
                for (int c = 0; c < nc; c++) row[c] = codes16(codes, kbits, nc, c);
            } else {
                read_row(&kr, tok, row, dim, kbits, 0, kgroup, kzero);
            }
            for (int r0 = 0; r0 < nr; r0 += 4) {
                v16 a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
                const v16 (*w)[NC] = kpc ? qs : qv;
                for (int c = 0; c < nc; c += 2) {  /* 8 independent FMA chains: 4 queries x even/odd chunks */
                    a0 += w[r0][c] * row[c], b0 += w[r0][c + 1] * row[c + 1];
                    a1 += w[r0 + 1][c] * row[c], b1 += w[r0 + 1][c + 1] * row[c + 1];
                    a2 += w[r0 + 2][c] * row[c], b2 += w[r0 + 2][c + 1] * row[c + 1];
                    a3 += w[r0 + 3][c] * row[c], b3 += w[r0 + 3][c + 1] * row[c + 1];
                }
#ifdef __AVX512F__  /* the lanes are summed 16 tokens at a time below; the bias rides in lane 0 */
                part[r0][t] = a0 + b0 + biasv[r0], part[r0 + 1][t] = a1 + b1 + biasv[r0 + 1];
                part[r0 + 2][t] = a2 + b2 + biasv[r0 + 2], part[r0 + 3][t] = a3 + b3 + biasv[r0 + 3];
#else
                s[r0][t] = hsum(a0 + b0) + (kpc ? bias[r0] : 0.0f);
                s[r0 + 1][t] = hsum(a1 + b1) + (kpc ? bias[r0 + 1] : 0.0f);
                s[r0 + 2][t] = hsum(a2 + b2) + (kpc ? bias[r0 + 2] : 0.0f);
                s[r0 + 3][t] = hsum(a3 + b3) + (kpc ? bias[r0 + 3] : 0.0f);
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
            v16 mv = splat(mr[r]);
            for (int t = 0; t < BLOCK; t += 16) {
                v16 x;
                memcpy(&x, &s[r][t], 64);
                const i32x16 more = x > mv;
                mv = (v16)(((i32x16)x & more) | ((i32x16)mv & ~more));
            }
            float mb = mv[0];
            for (int i = 1; i < 16; i++) mb = mv[i] > mb ? mv[i] : mb;
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
            read_row(&vr, b0 + t, vbuf[t], dim, vbits, vpc, vgroup, vzero);
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

/* One function per (head_dim, format) that zen-eco uses, the format a constant in each; anything
   else is refused (the caller then uses its PyTorch path). */
typedef void (*range_fn)(int, const float *, const side_t *, const side_t *, int64_t, int64_t, int64_t, float *,
                         float *, float *);
#define SPECIAL(NAME, D, KB, KPC, KG, KZ, VB, VPC, VG, VZ)                                                  \
    static void NAME(int n_rep, const float *q, const side_t *k, const side_t *v, int64_t h, int64_t t0,       \
                     int64_t t1, float *m, float *l, float *acc) {                                             \
        attend_impl(n_rep, q, k, v, h, t0, t1, m, l, acc, D, KB, KPC, KG, KZ, VB, VPC, VG, VZ);               \
    }
#define FORMATS(D)                                                                                             \
    SPECIAL(int8_##D, D, 8, 0, D, 0, 8, 0, D, 0)                                                               \
    SPECIAL(int4_##D, D, 4, 1, 128, 1, 4, 0, 32, 1)                                                            \
    SPECIAL(int2_##D, D, 2, 1, 32, 1, 2, 0, 32, 1)                                                            \
    SPECIAL(k4v2_##D, D, 4, 1, 128, 1, 2, 0, 32, 1)                                                            \
    SPECIAL(bf16_##D, D, 16, 0, D, 0, 16, 0, D, 0)                                                             \
    SPECIAL(f32_##D, D, 32, 0, D, 0, 32, 0, D, 0)
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
        const int64_t a = t0 + part * span, b = a + span < t1 ? a + span : t1;
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
