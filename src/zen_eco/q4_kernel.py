"""A C kernel for y = x W^T with 4-bit group-quantized (or 8-bit per-row) W and few rows of x (decode), built on first use.

At batch 1 a step reads every weight once, so its speed is the memory bandwidth if the arithmetic
keeps up. PyTorch's packed CPU kernel (`_weight_int4pack_mm_for_cpu`) reaches ~60% of it on two
AVX2 cores; this one gets close to all of it by doing the inner products in integers, as llama.cpp
does: each row of x is quantized per block of 32 columns to int16 (one float scale per block: a
rounding of 2^-16 of the block's largest |x|, finer than bf16's 2^-9 relative), then per block of
32 weights 16 bytes of codes are widened to int16 and multiplied-and-added pairwise into int32 lanes
(`vpmaddwd`). Eight blocks' sums are reduced side by side into one vector, converted to float and
scaled together (each block by its group's scale: group sizes 32, 64, 128 run the same loop). The
minimum term needs only the float sum of x over each block: w = code * scale + zero gives
    sum_c x_c w_c = scale * sum_c code_c x_c + zero * sum_c x_c.
Rows of W are split across OpenMP threads; a tile of up to 4 rows of x shares each unpacked block.
One row of x (decode, AVX-512 VNNI) takes a cheaper loop: x rounded to 15 bits and split into two
int8 planes (x = 128 h + l), so the codes stay bytes and `vpdpbusd` takes 64 of them per instruction
(four instructions per 64 bytes of codes where widening to int16 took four per 32).

Layout (`pack`): codes (N, K / 2) uint8 where, in each block of 32 columns, byte j holds column j in
its low nibble and column j + 16 in its high nibble (blocks in order, or in panels of 8: `paneled`);
scale_zero (N, 2, K / group padded with zeros to a multiple of 8) float16: a row's scales, then its zeros,
so each row is two sequential streams. The float16 scales are exact for GGUF Q4_0/Q4_1 (stored in float16)
and for `quant.quantize_int4`, which rounds its scales to float16 before computing codes.

`matmul_int8` is the same scheme for int8 codes with one float32 scale per row (`Int8Linear`), and
`matmul_int8_blocks` for int8 codes with float16 scales (and offsets) per block (GGUF's Q8_0, Q5_0, ...).
On AVX2 without AVX-512 VNNI, prompts of all three (from `word_rows()` rows) take tiles of 2 rows of W x 4 of
x with x in bytes per block of 32, as llama.cpp rounds it (`words_linear`); there rows of 4-bit codes in groups
of 32, 64 or 128 (`paneled`) and all int8 codes (`pack_int8`) are kept in panels of 8 blocks, and 1-3 rows of x
(decode) read them with x in bytes too, each block's sum in one lane of a vector (`panel_linear`,
`panel8_linear`).

Without AVX2 the C code falls back to plain loops (same integer math, compiler-vectorized).
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import lru_cache

import numpy as np
import torch

from . import native, prompt_gemm

BLOCK = 32  # columns per quantized block of x and per unpacked block of codes
GEMM_MIN_ROWS = 8  # rows of x from which a call takes the prompt GEMM (prompt_gemm) where it is built: the row kernel's
# time grows per row, the GEMM's per 16 rows (benchmarks/prompt_rows.py, 2 threads: level at ~8 for int4, int8
# and Q4_K, ~12 for Q6_K)

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(ZEN_NO_VNNI)
#define ZEN_VNNI 1  /* 512-bit int16 dot products (vpdpwssd): two blocks of 32 per instruction pair */
#endif
/* Or'd into an int4 call's group size G by the caller: scale_zero holds each row's scales only, and every
   group's zero is -8 (5-bit codes: -16) times its scale: GGUF's Q4_0 and Q5_0, w = d (q - 8) or d (q - 16),
   whose zeros are then not read (a plane of float16 less: 18 bytes per 32 weights read instead of 20). */
#define Q4_MID_ZERO 0x10000
INLINE int q4_planes(int G) { return G & Q4_MID_ZERO ? 1 : 2; }  /* float16 planes of a row's scale_zero */
INLINE float q4_mid(const uint8_t *high) { return high ? -16.0f : -8.0f; }  /* the zero per unit of scale */
#ifndef PREFETCH
#define PREFETCH 4096  /* bytes ahead that the code stream is prefetched: more reads in flight from DRAM */
#endif

/* The decode loops read four rows of W side by side; prefetching PREFETCH bytes past a row's position
   lands in rows being read already (rows of 1-4 KB). So they prefetch the same column of the next
   groups of four rows: whole groups, at least PREFETCH bytes ahead. */
INLINE int64_t group_ahead(int64_t row_bytes) {
    const int64_t group = 4 * row_bytes;
    return group * ((PREFETCH + group - 1) / group);
}

/* A side stream of a row (its scales, offsets or fifth bits) read at `at`: the line `rows` rows ahead
   (`stride` elements a row) prefetched with the codes' group (group_ahead). Left to the hardware these
   small reads beside the code stream stalled the decode loops (int4: 15 -> 21 GB/s at one thread). */
INLINE void prefetch_side(const void *at, int64_t rows, int64_t stride_bytes) {
    __builtin_prefetch((const char *)at + rows * stride_bytes, 0, 2);
}

INLINE float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }

INLINE int x_stride(int K) { return ((K / 32 + 1) & ~1) * 32; }

INLINE int pair_slot(int b, int c) {  /* where column c of block b goes in the paired order */
    return (b >> 1) * 64 + (c >> 4) * 32 + (b & 1) * 16 + (c & 15);
}

/* The order of x's columns in xq, one per kind of inner loop. X_PAIRS: each two blocks b, b + 1 stored
   as [b 0..15, b+1 0..15, b 16..31, b+1 16..31] (the AVX-512 int4 loop's order: the low and the high
   nibbles of two blocks' codes each make one vector). X_EVEN_ODD: per 64 columns the even ones, then
   the odd ones (the AVX-512 int8 decode loop's order). */
enum { X_PLAIN = 0, X_PAIRS = 1, X_EVEN_ODD = 2 };

INLINE int x_slot(int layout, int b, int c) {
    if (layout == X_PAIRS) return pair_slot(b, c);
    const int col = b * 32 + c;  /* X_EVEN_ODD: per 64 columns, the even ones, then the odd ones */
    return layout == X_EVEN_ODD ? (col & ~63) + ((col & 1) << 5) + ((col & 63) >> 1) : col;
}

/* Columns at .. at + 31 of x, float32 or bfloat16, as floats. */
INLINE void load_block(const void *x, int x_bf16, int64_t at, float *xr) {
    for (int i = 0; i < 32; i++) xr[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[at + i]) : ((const float *)x)[at + i];
}

/* A block of 32 values rounded to integers against its largest |x| -> qmax (the int16 of the prompt
   loops: 32767; the one-row loop's 15-bit planes: 16383): q[i] = round(xr[i] / d); returns d, and where
   `sum` is given the block's float sum. Every loop that rounds x does it here, so their integer sums agree. */
INLINE float round_block(const float *xr, float qmax, int32_t *q, float *sum) {
    float amax = 0.0f, total = 0.0f;
    for (int i = 0; i < 32; i++) { const float a = fabsf(xr[i]); amax = a > amax ? a : amax; total += xr[i]; }
    if (sum) *sum = total;
    const float d = amax / qmax, id = d > 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < 32; i++) q[i] = (int32_t)lrintf(xr[i] * id);
    return d;
}

/* The float sums of a block's first and last 16 values (for weights with an offset per 16 columns). */
INLINE void half_sums(const float *xr, float *first, float *last) {
    float half[2] = {0.0f, 0.0f};
    for (int i = 0; i < 32; i++) half[i / 16] += xr[i];
    *first = half[0], *last = half[1];
}

/* x (M, K), float32 or bfloat16 -> xq (M, KP) int16 in `layout` order with one scale per block of 32
   columns, xd (M, nbp), and the blocks' float sums xs (M, nbp) (and, where xh is given, the sums of their
   first and last 16 columns, xh (2, M, nbp)); KP = K rounded up to an even number of blocks, nbp = K / 32
   rounded up to a multiple of 16; the padding is left as it is (zeros, from the caller). */
void zen_q4_quantize_x(int M, int K, const void *x, int x_bf16, int layout, int16_t *xq, float *xd, float *xs,
                       float *xh) {
    const int nbp = (K / 32 + 15) & ~15, KP = x_stride(K);
    for (int64_t m = 0; m < M; m++) {
        for (int b = 0; b < K / 32; b++) {
            float xr[32];
            int32_t q[32];
            load_block(x, x_bf16, m * K + b * 32, xr);
            xd[m * nbp + b] = round_block(xr, 32767.0f, q, xs + m * nbp + b);
            if (xh) half_sums(xr, xh + m * nbp + b, xh + (M + m) * nbp + b);
            int16_t *row = xq + m * KP;
            for (int i = 0; i < 32; i++) row[x_slot(layout, b, i)] = (int16_t)q[i];
        }
    }
}

INLINE float f16(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { exp = 113; while (!(man & 1024)) { man <<= 1; exp--; } bits = sign | (exp << 23) | ((man & 1023) << 13); }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f; __builtin_memcpy(&f, &bits, 4); return f;
#endif
}

/* 5-bit weights (GGUF's Q5 types) add a plane of each code's fifth bit to the int4 layout: per row, per
   four blocks of 32 columns, 16 bytes: a 64-bit mask whose bit p is that of column p % 16 of block
   4q + p / 16 (the columns in the low nibbles), then one for columns 16 + p % 16 (the high nibbles), in
   the order a 64-byte read of four blocks' codes has them. The 16 bits of block b's low (half 0) or high
   (half 1) columns: */
INLINE uint32_t high_bits16(const uint8_t *high, int b, int half) {
    uint64_t m;
    __builtin_memcpy(&m, high + (b / 4) * 16 + half * 8, 8);
    return (uint32_t)(m >> (16 * (b % 4))) & 0xFFFF;
}

INLINE int high_stride(int K) { return (K / 32 + 3) / 4 * 16; }  /* bytes of one row's fifth bits */

/* Where byte j of block b's codes (column j in the low nibble, 16 + j in the high) sits in a row of packed
   codes. panels 0: the int4 layout, 16 bytes a block (byte 16 b + j). panels 1: the K-quant layout
   (kquant_kernel), per 16 blocks (the last 8 or 16) a panel whose 4-byte words are transposed: word w of
   block i at word w n + i (n blocks in the panel), so a 64-byte read holds one word of 16 blocks, lane i
   block i, and the decode loop sums a whole block in one lane. */
INLINE int64_t code_pos(int panels, int K, int b, int j) {
    if (!panels) return (int64_t)b * 16 + j;
    const int p0 = b / 16 * 16, n = K / 32 - p0 < 16 ? K / 32 - p0 : 16;
    return (int64_t)p0 * 16 + ((j / 4) * n + b - p0) * 4 + j % 4;
}

/* On AVX2 without AVX-512 VNNI, rows of 4-bit codes (no fifth bits) in groups of 32, 64 or 128 columns, and
   every row of int8 codes, are stored in panels of 8 blocks (`pack`'s `paneled`, `pack_int8`): 128 bytes each
   (int8: 256; a short last panel as many bytes a block as the others), their 4-byte words transposed, word w of
   block i of L at byte 4 (w L + i), so that a 32-byte read holds one word of 8 blocks (lane i: block i) and the
   decode loops (panel_tile, panel8_tile) sum each block in one lane, with no transpose, as kquant_kernel's AVX2
   loop does. Where this is built, `paneled` says whether int4 rows are. */
#if defined(__AVX2__) && !defined(ZEN_VNNI)
#define Q4_PANELS 1
#endif
INLINE int q4_paneled(int G, const uint8_t *high) {
#ifdef Q4_PANELS
    return !high && (G == 32 || G == 64 || G == 128);
#else
    (void)G, (void)high;
    return 0;
#endif
}

/* Byte j of block b in a paneled row of `words` 4-byte words a block (int4: 4, int8: 8). */
INLINE int64_t panel_pos(int K, int words, int b, int j) {
    const int L = K / 32 - b / 8 * 8 < 8 ? K / 32 - b / 8 * 8 : 8;  /* blocks in b's panel */
    return (int64_t)(b / 8) * 32 * words + ((j / 4) * L + b % 8) * 4 + j % 4;
}

/* Byte j of block b's codes (column j in the low nibble, 16 + j in the high) in a row of the int4 layout,
   in panels (paneled) or 16 bytes a block in order. */
INLINE int64_t q4_pos(int paneled, int K, int b, int j) {
    return paneled ? panel_pos(K, 4, b, j) : (int64_t)b * 16 + j;
}

/* Where column c of block b is in a row of int8 codes: in panels where this is built, else in order. */
INLINE int64_t q8_pos(int K, int b, int c) {
#ifdef Q4_PANELS
    return panel_pos(K, 8, b, c);
#else
    (void)K;
    return (int64_t)b * 32 + c;
#endif
}

int zen_q4_panels(int G, int five) { return q4_paneled(G, five ? (const uint8_t *)&G : 0); }

int zen_q8_panels(void) {
#ifdef Q4_PANELS
    return 1;
#else
    return 0;
#endif
}

/* int8 codes (N, K) in column order -> dst in the order this build's loops read (q8_pos). */
void zen_q8_pack(int64_t N, int K, const int8_t *codes, int8_t *dst, int n_threads) {
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int b = 0; b < K / 32; b++)
            for (int c = 0; c < 32; c += 4)
                __builtin_memcpy(dst + n * K + q8_pos(K, b, c), codes + n * K + b * 32 + c, 4);
}

#ifdef __AVX2__
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* v[0..3] as a 4 x 4 matrix of 32-bit words within each 128-bit lane, transposed in place: word i of v[w]
   -> word w of v[i]. */
INLINE void transpose4_epi32(__m256i *v) {
    const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    v[0] = _mm256_unpacklo_epi64(t0, t2), v[1] = _mm256_unpackhi_epi64(t0, t2);
    v[2] = _mm256_unpacklo_epi64(t1, t3), v[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Codes of 8 blocks read as words (lo[w], hi[w]: lane i holds word w of block i, the columns in the low and
   in the high nibbles, as bytes) -> dst, 32 bytes a block in column order. lo and hi are transposed in place. */
INLINE void words8_to_blocks(__m256i *lo, __m256i *hi, uint8_t *dst) {
    transpose4_epi32(lo), transpose4_epi32(hi);  /* per 128-bit lane L: lo[i], hi[i] hold block 4 L + i */
    for (int i = 0; i < 4; i++) {
        _mm_storeu_si128((__m128i *)(dst + i * 32), _mm256_castsi256_si128(lo[i]));
        _mm_storeu_si128((__m128i *)(dst + i * 32 + 16), _mm256_castsi256_si128(hi[i]));
        _mm_storeu_si128((__m128i *)(dst + (4 + i) * 32), _mm256_extracti128_si256(lo[i], 1));
        _mm_storeu_si128((__m128i *)(dst + (4 + i) * 32 + 16), _mm256_extracti128_si256(hi[i], 1));
    }
}

/* The 8 lanes of each of v[0..7] summed: lane i of the result is the total of v[i]. */
INLINE __m256i transpose_sum(const __m256i *v) {
    __m256i s01 = _mm256_hadd_epi32(v[0], v[1]), s23 = _mm256_hadd_epi32(v[2], v[3]);
    __m256i s45 = _mm256_hadd_epi32(v[4], v[5]), s67 = _mm256_hadd_epi32(v[6], v[7]);
    __m256i a = _mm256_hadd_epi32(s01, s23), b = _mm256_hadd_epi32(s45, s67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* Integer dot product of block b's 32 codes with R rows of xq: p[r] holds 8 partial int32 sums. */
INLINE __m256i add_high16(__m256i c, uint32_t bits) {  /* + 16 in the lanes whose bit is set */
    const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, -32768);
    const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)bits), sel), sel);
    return _mm256_add_epi16(c, _mm256_and_si256(set, _mm256_set1_epi16(16)));
}

INLINE void block_dot(int R, int KP, int b, const uint8_t *codes, const uint8_t *high, const int16_t *xq, __m256i *p) {
    const __m256i low = _mm256_set1_epi16(15);
    if ((b & 3) == 0) __builtin_prefetch(codes + b * 16 + PREFETCH, 0, 2);
    __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + b * 16)));
    __m256i c0 = _mm256_and_si256(raw, low), c1 = _mm256_srli_epi16(raw, 4);
    if (high) c0 = add_high16(c0, high_bits16(high, b, 0)), c1 = add_high16(c1, high_bits16(high, b, 1));
    for (int r = 0; r < R; r++) {
        const int16_t *q = xq + (int64_t)r * KP + b * 32;
        p[r] = _mm256_add_epi32(_mm256_madd_epi16(c0, _mm256_loadu_si256((const __m256i *)q)),
                                _mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i *)(q + 16))));
    }
}

/* The float16 values of groups g0, g0 + 1, .. spread over 8 blocks of 32 columns: lane i holds the
   value of block i's group (G = 32: 8 groups; 64: 4, each twice; 128: 2, each four times). */
INLINE __m256 per_block(const uint16_t *v, int g0, const int G) {
    if (G == 32) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + g0)));
    if (G == 64) {
        __m256 x = _mm256_cvtph_ps(_mm_loadl_epi64((const __m128i *)(v + g0)));
        return _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    }
    int32_t two;
    __builtin_memcpy(&two, v + g0, 4);
    __m256 x = _mm256_cvtph_ps(_mm_cvtsi32_si128(two));
    return _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
#endif

#ifdef ZEN_VNNI
/* The float16 values of the groups of blocks b0 .. b0 + n - 1 (n <= 16), spread per block: lane i holds
   block b0 + i's group's value, lanes from n on 0. b0 is a multiple of 16 blocks. */
INLINE __m512 per_block16(const uint16_t *v, int b0, int n, const int G) {
    if (G % 32 == 0 && 512 % G == 0) {
        const int per = G / 32, ng = (n + per - 1) / per;  /* blocks per group; groups needed */
        const __m512 x = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << ng) - 1), v + b0 / per));
        if (per == 1) return x;
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 y = _mm512_permutexvar_ps(_mm512_srli_epi32(iota, __builtin_ctz(per)), x);
        return _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1), y);
    }
    float f[16];
    for (int i = 0; i < 16; i++) f[i] = i < n ? f16(v[(b0 + i) * 32 / G]) : 0.0f;
    return _mm512_loadu_ps(f);
}

/* Lanes 0-7 of the result hold lane p of s, lanes 8-15 lane p + 1: the scales of a pair of blocks laid
   over the pair's int32 sums. */
INLINE __m512 pair_scale(__m512 s, int p) {
    const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(_mm512_add_epi32(base, _mm512_set1_epi32(p)), s);
}

INLINE float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }

/* Lanes 4i .. 4i + 3 hold, for i = 0 .. 3: a[p], b[p], a[p + 1], b[p + 1]: the scales of the first and
   the last 16 columns of blocks p, p + 1 over the decode loop's sums (4 columns a lane). */
INLINE __m512 half_scale4(__m512 a, __m512 b, int p) {
    const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 16, 16, 16, 16, 1, 1, 1, 1, 17, 17, 17, 17);
    return _mm512_permutex2var_ps(a, _mm512_add_epi32(base, _mm512_set1_epi32(p)), b);
}

/* Lanes 0-7 hold a[p], 8-15 b[p]: block p's two halves over sums of 2 columns a lane. */
INLINE __m512 half_scale8(__m512 a, __m512 b, int p) {
    const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
    return _mm512_permutex2var_ps(a, _mm512_add_epi32(base, _mm512_set1_epi32(p)), b);
}
#endif

/* One row's int8 block scales (zen_q8b_linear): a, the scale per block of 32 or of its first 16 columns;
   b, of its last 16 (NULL: as a); z, the offsets per block or of its first 16 columns (NULL: none); zb,
   the last 16 columns' offsets (NULL: as z). All NULL: no block scales. */
typedef struct { const uint16_t *a, *b, *z, *zb; } bscale_t;

/* Values of one row's block scales: `nbs` per plane, a plane each for the scale, (flags & 1) the second
   half's scale, (flags & 2) the offset, (flags & 4) the second half's offset. */
INLINE int64_t block_stride(int flags, int nbs) {
    return (int64_t)(1 + (flags & 1) + ((flags >> 1) & 1) + ((flags >> 2) & 1)) * nbs;
}

INLINE bscale_t block_planes(const uint16_t *row, int flags, int nbs) {
    bscale_t s = {row, 0, 0, 0};
    if (row && (flags & 1)) s.b = row + nbs;
    if (row && (flags & 2)) s.z = row + block_stride(flags & 1, nbs);  /* after the scale plane(s) */
    if (row && (flags & 2) && (flags & 4)) s.zb = s.z + nbs;
    return s;
}

/* out[r] = (x_r . w_n) for rows r < R (R <= 4) of x and one row n of W. Always inlined with constant
   R and G (see zen_q4_linear): as a called function its accumulators live in memory, ~8x slower.
   xq rows are KP apart (x_stride), in the paired order where ZEN_VNNI; xd, xs rows nbx apart. */
INLINE void row_tile(int R, int K, int G, const uint8_t *codes, const uint8_t *high, const uint16_t *scale,
                     const uint16_t *zero, const int16_t *xq, const float *xd, const float *xs, float *out) {
    const float mid = q4_mid(high);  /* zero NULL (Q4_MID_ZERO): every group's zero is mid x its scale */
    const int nb = K / 32, nbx = (nb + 15) & ~15, KP = x_stride(K);
#if defined(ZEN_VNNI)
    const __m512i low = _mm512_set1_epi16(15);
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int n16 = nb - b0 < 16 ? nb - b0 : 16;
        /* per block: scale * dot(codes, xq) * xd + zero * xs; the zero terms of 16 blocks in one FMA */
        const __m512 s = per_block16(scale, b0, n16, G);
        const __m512 z = zero ? per_block16(zero, b0, n16, G) : _mm512_mul_ps(s, _mm512_set1_ps(mid));
        __m512 cs[4];
        for (int r = 0; r < R; r++) {
            cs[r] = _mm512_mul_ps(s, _mm512_loadu_ps(xd + (int64_t)r * nbx + b0));
            acc[r] = _mm512_fmadd_ps(z, _mm512_loadu_ps(xs + (int64_t)r * nbx + b0), acc[r]);
        }
        for (int p = 0; p < n16; p += 2) {  /* blocks b, b + 1: 32 bytes of codes, low nibbles then high */
            const int b = b0 + p;
            if ((b & 3) == 0) __builtin_prefetch(codes + b * 16 + PREFETCH, 0, 2);
            const __m256i raw = p + 1 < n16 ? _mm256_loadu_si256((const __m256i *)(codes + b * 16))
                                            : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(codes + b * 16)));
            const __m512i w = _mm512_cvtepu8_epi16(raw);
            __m512i c0 = _mm512_and_si512(w, low), c1 = _mm512_srli_epi16(w, 4);
            if (high) {  /* b is even: blocks b, b + 1 are bits 16 (b % 4) .. + 32 of their four's masks */
                const __mmask32 h0 = high_bits16(high, b, 0) | (p + 1 < n16 ? high_bits16(high, b + 1, 0) << 16 : 0);
                const __mmask32 h1 = high_bits16(high, b, 1) | (p + 1 < n16 ? high_bits16(high, b + 1, 1) << 16 : 0);
                c0 = _mm512_mask_add_epi16(c0, h0, c0, _mm512_set1_epi16(16));
                c1 = _mm512_mask_add_epi16(c1, h1, c1, _mm512_set1_epi16(16));
            }
            for (int r = 0; r < R; r++) {
                const int16_t *q = xq + (int64_t)r * KP + b * 32;
                __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), c0, _mm512_loadu_si512(q));
                d = _mm512_dpwssd_epi32(d, c1, _mm512_loadu_si512(q + 32));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), pair_scale(cs[r], p), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum16(acc[r]);
#elif defined(__AVX2__)
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 8) {  /* 8 blocks at a time: their sums side by side in one vector */
        const int n8 = nb - b0 < 8 ? nb - b0 : 8;
        __m256i p[4][8];
        for (int j = 0; j < 8; j++) {
            __m256i pj[4];
            if (j < n8) block_dot(R, KP, b0 + j, codes, high, xq, pj);
            else for (int r = 0; r < R; r++) pj[r] = _mm256_setzero_si256();
            for (int r = 0; r < R; r++) p[r][j] = pj[r];
        }
        /* scale, zero (per group) rows are padded with zeros to whole eights, xd, xs to sixteens */
        const __m256 s = per_block(scale, b0 * 32 / G, G);
        const __m256 z = zero ? per_block(zero, b0 * 32 / G, G) : _mm256_mul_ps(s, _mm256_set1_ps(mid));
        for (int r = 0; r < R; r++) {
            __m256 dots = _mm256_cvtepi32_ps(transpose_sum(p[r]));
            acc[r] = _mm256_fmadd_ps(dots, _mm256_mul_ps(s, _mm256_loadu_ps(xd + (int64_t)r * nbx + b0)), acc[r]);
            acc[r] = _mm256_fmadd_ps(z, _mm256_loadu_ps(xs + (int64_t)r * nbx + b0), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        out[r] = 0.0f;
        for (int b = 0; b < nb; b++) {
            const int16_t *q = xq + (int64_t)r * KP + b * 32;
            int32_t dot = 0;
            const uint32_t h0 = high ? high_bits16(high, b, 0) : 0, h1 = high ? high_bits16(high, b, 1) : 0;
            for (int j = 0; j < 16; j++)
                dot += ((codes[b * 16 + j] & 15) + 16 * (h0 >> j & 1)) * q[j] + ((codes[b * 16 + j] >> 4) + 16 * (h1 >> j & 1)) * q[j + 16];
            const int g = b * 32 / G;
            const float z = zero ? f16(zero[g]) : mid * f16(scale[g]);
            out[r] += (float)dot * xd[(int64_t)r * nbx + b] * f16(scale[g]) + z * xs[(int64_t)r * nbx + b];
        }
    }
#endif
}

#ifdef ZEN_VNNI
/* x (1, K) -> the int8 planes the one-row int4 loop reads. x is rounded to int16 per block of 32 with
   max |x| -> 16383 (15 bits: a step of 2^-14 of the block's largest |x|) and split as x = 128 h + l,
   l in [0, 128), h in [-128, 128), both bytes that vpdpbusd takes as its signed operand. Per four blocks
   256 bytes, in the order a 64-byte read of codes has them (code_pos with `panels`; int4: 16 bytes a block,
   low nibbles columns 0-15, high nibbles 16-31): l of the columns in the low nibbles of those 64 bytes,
   their h, then l and h of the columns in the high nibbles. xd, xs as zen_q4_quantize_x (xs may be NULL);
   the padding to whole fours of blocks stays zero. Where xh is given, the sums of each block's first 16 columns go to xh[b] and of its last 16 to xh[nbx + b]
   (nbx: K / 32 rounded up to 16), of x as rounded (xd times the integers' sum): kquant_kernel's offsets
   then multiply the same x as its codes do, and Q6_K's -32 * scale * x cancels exactly against the
   codes' part (with the float sums, the rounding error of x came back 32-fold: twice the error). */
static void quantize_planes(int K, int panels, const void *x, int x_bf16, int8_t *xp, float *xd, float *xs, float *xh) {
    const int nbx = (K / 32 + 15) & ~15;
    for (int b = 0; b < K / 32; b++) {
        float xr[32];
        int32_t q[32];
        load_block(x, x_bf16, b * 32, xr);
        xd[b] = round_block(xr, 16383.0f, q, xs ? xs + b : 0);
        if (xh) {
            int32_t half[2] = {0, 0};
            for (int i = 0; i < 32; i++) half[i / 16] += q[i];
            xh[b] = xd[b] * (float)half[0], xh[nbx + b] = xd[b] * (float)half[1];
        }
        for (int w = 0; w < 4; w++) {  /* a word (4 bytes) of codes stays together in every layout */
            const int64_t pos = code_pos(panels, K, b, 4 * w);
            int8_t *at = xp + pos / 64 * 256 + pos % 64;
            for (int i = 0; i < 4; i++)
                for (int half = 0; half < 2; half++) {
                    const int32_t v = q[16 * half + 4 * w + i];
                    at[128 * half + i] = (int8_t)(v & 127);
                    at[128 * half + 64 + i] = (int8_t)(v >> 7);  /* arithmetic shift: floor(v / 128) */
                }
        }
    }
}

/* Lanes 4i .. 4i + 3 of the result hold lane p + i of s: four blocks' scales over their int32 sums. */
INLINE __m512 quad_scale(__m512 s, int p) {
    const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(_mm512_add_epi32(base, _mm512_set1_epi32(p)), s);
}

/* One row of x (quantize_planes) against rows 0 .. nrows - 1 (nrows <= 4) of W (int4), scale_zero rows
   `planes ngp` apart (planes 1: Q4_MID_ZERO): out[j] = x . w_j. Each 64 bytes of a row's codes (four blocks)
   give their low and high nibbles as unsigned bytes, and four vpdpbusd (nibbles times l and times h) give each
   block's sum in four int32 lanes as l + 128 h: half the instructions of widening the codes to int16. Four independent
   accumulators keep the latencies overlapped, and each loaded piece of x serves four rows. */
INLINE void row4_tile(int K, int nrows, const int G, const uint8_t *codes, const uint8_t *high, const uint16_t *scale_zero,
                      int ngp, int planes, const int8_t *xp, const float *xd, const float *xs, float *out) {
    const __m512 mid = _mm512_set1_ps(q4_mid(high));
    const int nb = K / 32;
    const int64_t ahead = group_ahead(K / 2), rows_ahead = ahead / (K / 2);
    const __m512i low = _mm512_set1_epi8(15);
    const uint8_t *row[4], *hrow[4];
    const uint16_t *sz[4];
    for (int j = 0; j < 4; j++) {  /* missing rows repeat row 0 (valid memory); their results are dropped */
        row[j] = codes + (int64_t)(j < nrows ? j : 0) * (K / 2);
        hrow[j] = high ? high + (int64_t)(j < nrows ? j : 0) * high_stride(K) : 0;
        sz[j] = scale_zero + (int64_t)(j < nrows ? j : 0) * planes * ngp;
    }
    __m512 acc[4];
    for (int j = 0; j < 4; j++) acc[j] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int n16 = nb - b0 < 16 ? nb - b0 : 16;
        /* per block: scale * dot(codes, x) * xd + zero * xs; the zero terms of 16 blocks in one FMA */
        const __m512 xdv = _mm512_loadu_ps(xd + b0), xsv = _mm512_loadu_ps(xs + b0);
        __m512 cs[4];
        for (int j = 0; j < 4; j++) {
            prefetch_side(sz[j] + b0 * 32 / G, rows_ahead, 2 * planes * ngp);
            if (planes == 2) prefetch_side(sz[j] + ngp + b0 * 32 / G, rows_ahead, 2 * planes * ngp);
            if (high) prefetch_side(hrow[j] + b0 * 4, rows_ahead, high_stride(K));
            const __m512 s = per_block16(sz[j], b0, n16, G);
            cs[j] = _mm512_mul_ps(s, xdv);
            const __m512 z = planes == 2 ? per_block16(sz[j] + ngp, b0, n16, G) : _mm512_mul_ps(s, mid);
            acc[j] = _mm512_fmadd_ps(z, xsv, acc[j]);
        }
        for (int p = 0; p < n16; p += 4) {
            const int b = b0 + p;
            const int8_t *x4 = xp + (int64_t)(b / 4) * 256;
            const __m512i l0 = _mm512_loadu_si512(x4), h0 = _mm512_loadu_si512(x4 + 64);
            const __m512i l1 = _mm512_loadu_si512(x4 + 128), h1 = _mm512_loadu_si512(x4 + 192);
            const __mmask64 m = p + 4 <= n16 ? ~0ull : (1ull << (16 * (n16 - p))) - 1;  /* a tail of 1-3 blocks */
            for (int j = 0; j < 4; j++) {
                const uint8_t *c = row[j] + b * 16;
                __builtin_prefetch(c + ahead, 0, 2);
                const __m512i w = _mm512_maskz_loadu_epi8(m, c);
                __m512i c0 = _mm512_and_si512(w, low), c1 = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
                if (high) {  /* the fifth bits: + 16 where set (padding blocks' bits are 0) */
                    uint64_t h[2];
                    __builtin_memcpy(h, hrow[j] + (b / 4) * 16, 16);
                    c0 = _mm512_mask_add_epi8(c0, (__mmask64)h[0], c0, _mm512_set1_epi8(16));
                    c1 = _mm512_mask_add_epi8(c1, (__mmask64)h[1], c1, _mm512_set1_epi8(16));
                }
                __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, l0);
                __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, h0);
                lo = _mm512_dpbusd_epi32(lo, c1, l1);
                hi = _mm512_dpbusd_epi32(hi, c1, h1);
                const __m512i d = _mm512_add_epi32(lo, _mm512_slli_epi32(hi, 7));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), quad_scale(cs[j], p), acc[j]);
            }
        }
    }
    for (int j = 0; j < nrows; j++) out[j] = hsum16(acc[j]);
}
#endif

INLINE uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u; __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* x (M, K), float32 or bfloat16, rounded to int16 per block of 32 (zen_q4_quantize_x), in buffers this
   allocates, and (halves: for offsets per 16 columns) the half-block sums: 1, or 0 when memory runs out. */
typedef struct { int16_t *xq; float *dsum, *xd, *xs, *xh; } qx_t;  /* xh: the half-block sums (2, M, nbx) or NULL */

static void free_x(qx_t *q) { free(q->xq); free(q->dsum); }

static int prepare_x(int M, int K, const void *x, int x_bf16, int layout, int halves, qx_t *q) {
    const int nbx = (K / 32 + 15) & ~15;
    q->xq = calloc((size_t)M * x_stride(K) + 32, sizeof(int16_t));
    q->dsum = calloc((size_t)(halves ? 4 : 2) * M * nbx, sizeof(float));
    if (!q->xq || !q->dsum) { free_x(q); return 0; }
    q->xd = q->dsum, q->xs = q->dsum + (int64_t)M * nbx, q->xh = halves ? q->dsum + (int64_t)2 * M * nbx : 0;
    zen_q4_quantize_x(M, K, x, x_bf16, layout, q->xq, q->xd, q->xs, q->xh);
    return 1;
}

INLINE void store(void *y, int y_bf16, int64_t i, float v) {
    if (y_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* Row n of an int8 weight against R rows of xq: out[r] = x_r . w_n, w_n = K codes times one float
   scale (bs.a NULL) or times float16 block scales (bs: the row's planes, bscale_t). AVX-512 VNNI and plain C
   (AVX2 builds keep int8 rows in panels: panel8_linear). xa, xb: the half-block
   sums of x (read where bs.zb gives offsets per 16 columns). */
INLINE void row_tile8(int R, int K, const int8_t *codes, float scale, bscale_t bs, const int16_t *xq,
                      const float *xd, const float *xs, const float *xa, const float *xb, float *out) {
    const int nb = K / 32, nbx = (nb + 15) & ~15, KP = x_stride(K);
#if defined(ZEN_VNNI)
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int n16 = nb - b0 < 16 ? nb - b0 : 16;
        const __m512 sa = bs.a ? per_block16(bs.a, b0, n16, 32) : _mm512_set1_ps(1.0f);
        const __m512 sb = bs.b ? per_block16(bs.b, b0, n16, 32) : sa;
        __m512 ca[4], cb[4];
        for (int r = 0; r < R; r++) {
            const __m512 xdv = _mm512_loadu_ps(xd + (int64_t)r * nbx + b0);
            ca[r] = _mm512_mul_ps(sa, xdv);
            cb[r] = _mm512_mul_ps(sb, xdv);
            if (bs.zb) {  /* an offset per 16 columns: each against its half's sum */
                acc[r] = _mm512_fmadd_ps(per_block16(bs.z, b0, n16, 32), _mm512_loadu_ps(xa + (int64_t)r * nbx + b0), acc[r]);
                acc[r] = _mm512_fmadd_ps(per_block16(bs.zb, b0, n16, 32), _mm512_loadu_ps(xb + (int64_t)r * nbx + b0), acc[r]);
            } else if (bs.z) {
                acc[r] = _mm512_fmadd_ps(per_block16(bs.z, b0, n16, 32), _mm512_loadu_ps(xs + (int64_t)r * nbx + b0), acc[r]);
            }
        }
        for (int p = 0; p < n16; p += 2) {  /* blocks b, b + 1: each 32 codes widened to one vector */
            const int b = b0 + p;  /* even: one prefetch per 64 bytes of codes */
            __builtin_prefetch(codes + b * 32 + PREFETCH, 0, 2);
            const __m512i wa = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(codes + b * 32)));
            const __m512i wb = p + 1 < n16 ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(codes + b * 32 + 32)))
                                           : _mm512_setzero_si512();
            for (int r = 0; r < R; r++) {
                const int16_t *q = xq + (int64_t)r * KP + b * 32;
                /* lanes 0-7: columns 0-15 of the block, 8-15: columns 16-31 */
                const __m512i da = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wa, _mm512_loadu_si512(q));
                const __m512i db = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wb, _mm512_loadu_si512(q + 32));
                if (bs.b) {  /* a scale per 16 columns: each half its own */
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(da), half_scale8(ca[r], cb[r], p), acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(db), half_scale8(ca[r], cb[r], p + 1), acc[r]);
                } else {  /* halves added: lanes 0-7 block b's sum, 8-15 block b + 1's */
                    const __m512i d = _mm512_add_epi32(_mm512_shuffle_i64x2(da, db, 0x44), _mm512_shuffle_i64x2(da, db, 0xEE));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), pair_scale(ca[r], p), acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum16(acc[r]) * scale;
#else
    for (int r = 0; r < R; r++) {
        float total = 0.0f;
        for (int b = 0; b < nb; b++) {
            int32_t dot[2] = {0, 0};
            for (int j = 0; j < 32; j++) dot[j / 16] += codes[b * 32 + j] * xq[(int64_t)r * KP + b * 32 + j];
            const float sa = bs.a ? f16(bs.a[b]) : 1.0f, sb = bs.b ? f16(bs.b[b]) : sa;
            total += ((float)dot[0] * sa + (float)dot[1] * sb) * xd[(int64_t)r * nbx + b];
            if (bs.zb) total += f16(bs.z[b]) * xa[(int64_t)r * nbx + b] + f16(bs.zb[b]) * xb[(int64_t)r * nbx + b];
            else if (bs.z) total += f16(bs.z[b]) * xs[(int64_t)r * nbx + b];
        }
        out[r] = total * scale;
    }
#endif
}

#ifdef ZEN_VNNI
/* One row of x (in X_EVEN_ODD order) against rows n .. n + nrows - 1 (nrows <= 4) of W: out[j] = x . w_{n+j}.
   At one row of x this is the decode case; four independent accumulators keep the FMA and dot-product
   latencies overlapped and each loaded block of x serves four rows. Each 64 bytes of codes are read as
   32 int16 words: the low bytes sign-extended by a shift pair and the high bytes by one shift are the
   even and the odd columns, multiplied with x's even and odd halves (no byte-widening shuffles).
   bs: row n's block scales (bscale_t), the next rows' `stride` values further on. */
INLINE void row4_tile8(int K, int nrows, const int8_t *codes, const float *scale, bscale_t bs, int64_t stride,
                       const int16_t *xq, const float *xd, const float *xs, const float *xa, const float *xb,
                       float *out) {
    const int nb = K / 32;
    const int64_t ahead = group_ahead(K), rows_ahead = ahead / K;
    const int8_t *row[4];
    bscale_t bsr[4];
    for (int j = 0; j < 4; j++) {  /* missing rows repeat row 0 (valid memory); their results are dropped */
        const int64_t i = j < nrows ? j : 0;
        row[j] = codes + i * K;
        bsr[j].a = bs.a ? bs.a + i * stride : 0;
        bsr[j].b = bs.b ? bs.b + i * stride : 0;
        bsr[j].z = bs.z ? bs.z + i * stride : 0;
        bsr[j].zb = bs.zb ? bs.zb + i * stride : 0;
    }
    __m512 acc[4];
    for (int j = 0; j < 4; j++) acc[j] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int n16 = nb - b0 < 16 ? nb - b0 : 16;
        const __m512 xdv = _mm512_loadu_ps(xd + b0), xsv = _mm512_loadu_ps(xs + b0);
        __m512 ca[4], cb[4];
        for (int j = 0; j < 4; j++) {
            const uint16_t *planes[4] = {bsr[j].a, bsr[j].b, bsr[j].z, bsr[j].zb};
            for (int i = 0; i < 4; i++)
                if (planes[i]) prefetch_side(planes[i] + b0, rows_ahead, 2 * stride);
            ca[j] = bs.a ? _mm512_mul_ps(per_block16(bsr[j].a, b0, n16, 32), xdv) : xdv;
            cb[j] = bs.b ? _mm512_mul_ps(per_block16(bsr[j].b, b0, n16, 32), xdv) : ca[j];
            if (bs.zb) {  /* an offset per 16 columns: each against its half's sum */
                acc[j] = _mm512_fmadd_ps(per_block16(bsr[j].z, b0, n16, 32), _mm512_loadu_ps(xa + b0), acc[j]);
                acc[j] = _mm512_fmadd_ps(per_block16(bsr[j].zb, b0, n16, 32), _mm512_loadu_ps(xb + b0), acc[j]);
            } else if (bs.z) {
                acc[j] = _mm512_fmadd_ps(per_block16(bsr[j].z, b0, n16, 32), xsv, acc[j]);
            }
        }
        for (int p = 0; p < n16; p += 2) {
            const int b = b0 + p;
            const __m512i xe = _mm512_loadu_si512(xq + b * 32), xo = _mm512_loadu_si512(xq + b * 32 + 32);
            for (int j = 0; j < 4; j++) {
                const int8_t *c = row[j] + b * 32;
                __builtin_prefetch(c + ahead, 0, 2);
                /* a lone last block: its 32 bytes only (x's padding block is zeros) */
                const __m512i w = p + 1 < n16 ? _mm512_loadu_si512(c) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, c);
                __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 8), xe);
                d = _mm512_dpwssd_epi32(d, _mm512_srai_epi16(w, 8), xo);
                /* lane l: columns 4l .. 4l + 3 of the two blocks: 0-3 block b's first 16, 4-7 its last 16, 8-15 b + 1 */
                const __m512 sc = bs.b ? half_scale4(ca[j], cb[j], p) : pair_scale(ca[j], p);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[j]);
            }
        }
    }
    for (int j = 0; j < nrows; j++) out[j] = hsum16(acc[j]) * (scale ? scale[j] : 1.0f);
}
#endif

#if defined(__AVX2__) && !defined(ZEN_VNNI)
/* Prompts on AVX2 without AVX-512 VNNI: int8 W (a scale per row or float16 scales and offsets per block or
   half block: Int8Linear, GGUF's Q8_0, Q5_0, Q5_1, Q3_K, Q2_K as int8 blocks) and int4 / int5 W (a scale and a
   zero per group: our INT4, Q4_0, Q4_1, Q5_0, Q5_1 as 5-bit codes). The int16 rows above take per block and
   row of x two vpmaddwd, an add and an eighth of a transpose of 8 blocks' sums (six vphaddd, two permutes):
   ~2.5x the instructions a K-quant row's 64 multiply-adds take in kquant_kernel's AVX2 loop. Here x is
   rounded to bytes per block of 32 (as that loop and llama.cpp round it) and both x and each row of W are
   read in the word order: per 8 blocks (256 columns) 8 words of 32 bytes, word v holding columns 4v .. 4v + 3
   of every block (lane i: block i), so a lane sums one block with no transpose. int8 codes: vpmaddubsw(|w|,
   sign(x, w)) (pairs at most 2 x 128 x 127, below 2^15), vpmaddwd against ones; 4- and 5-bit codes are
   unsigned bytes already, and two words' pair sums (2 x 2 x 31 x 127) are added before widening; with
   AVX-VNNI vpdpbusd instead. Rows of W are put in the word order per call, two at a time into a per-thread
   buffer (a few hundred instructions a row, against tens of thousands for its products with a chunk of x). */
#if defined(__AVXVNNI__)
#define WORDS_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define WORDS_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#endif
#define WORDS_MIN_ROWS 4  /* rows of x from which a call takes these tiles (below: the int16 rows) */
#define WORDS_X_BYTES (256 << 10)  /* rows of x a chunk holds: L2, while every row pair of W passes */

/* A row in the word order: 256 bytes per 8 blocks; a last group of 1-4 blocks takes 128 (four 32-byte
   vectors, vector u holding word 2u of its blocks in lanes 0-3 and word 2u + 1 in lanes 4-7), so that a K
   of 18 blocks (SmolLM2's 576) computes 20 blocks' products, not 24. */
INLINE int words_cols(int K) {
    const int nb = K / 32, rest = nb % 8;
    return nb / 8 * 256 + (rest == 0 ? 0 : rest <= 4 ? 128 : 256);
}

INLINE int64_t words_at(int K, int b, int c) {  /* column c of block b */
    const int64_t g = (int64_t)(b / 8) * 256;
    if (g + 256 > words_cols(K))  /* the short group */
        return g + (c / 8) * 32 + (c / 4 % 2) * 16 + (b % 8) * 4 + c % 4;
    return g + (c / 4) * 32 + (b % 8) * 4 + c % 4;
}

INLINE int words_full(int K) { return (K / 32 + 7) / 8 * 256; }  /* the word order without a short group */

/* x (M, K) -> xw (M, words_cols(K)) bytes in the word order (full: every group 256 bytes, words_full(K) a row;
   the padding zeros, from the caller), xd (M, nbx)
   block scales, xs (M, nbx) the blocks' sums and, where xh is given, those of their first and last 16 columns
   (xh (2, M, nbx): offsets per 16 columns); rows split across threads. The sums are of x as rounded (xd times
   the integers' sum, as llama.cpp's Q8_1 keeps them), so that offsets and zeros multiply the x the codes do:
   w = code * scale + zero times x as rounded exactly. With the float sums the error of int4's zero terms (about
   -8 scales) no longer cancels that of its codes': 1.5e-2 relative on random INT4 weights against 5e-3. */
static void quantize_words(int M, int K, const void *x, int x_bf16, int8_t *xw, float *xd, float *xs, float *xh,
                           int full, int n_threads) {
    const int nbx = (K / 32 + 15) & ~15, KW = full ? words_full(K) : words_cols(K);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / 32; b++) {
            float xr[32];
            int32_t q[32];
            const int64_t at = (int64_t)m * nbx + b;
            load_block(x, x_bf16, (int64_t)m * K + b * 32, xr);
            int32_t half[2] = {0, 0};
            xd[at] = round_block(xr, 127.0f, q, 0);
            for (int c = 0; c < 32; c++) {
                const int64_t pos = full ? (int64_t)(b / 8) * 256 + (c / 4) * 32 + (b % 8) * 4 + c % 4
                                         : words_at(K, b, c);
                xw[(int64_t)m * KW + pos] = (int8_t)q[c], half[c / 16] += q[c];
            }
            xs[at] = xd[at] * (float)(half[0] + half[1]);
            if (xh) xh[at] = xd[at] * (float)half[0], xh[(int64_t)M * nbx + at] = xd[at] * (float)half[1];
        }
}

/* A row of K byte codes in column order -> dst (words_cols(K) bytes) in the word order: per 8 blocks an
   8 x 8 transpose of 32-bit words; the padding blocks zero. */
INLINE void words_row(int K, const int8_t *codes, int8_t *dst) {
    const int nb = K / 32, KW = words_cols(K);
    for (int b0 = 0; b0 < nb; b0 += 8) {
        if ((int64_t)b0 / 8 * 256 + 256 > KW) {  /* the short last group: word by word */
            for (int b = b0; b < b0 + 4; b++)
                for (int c = 0; c < 32; c += 4) {
                    int32_t word = 0;
                    if (b < nb) __builtin_memcpy(&word, codes + (int64_t)b * 32 + c, 4);
                    __builtin_memcpy(dst + words_at(K, b, c), &word, 4);
                }
            break;
        }
        __m256i v[8];
        for (int i = 0; i < 8; i++)
            v[i] = b0 + i < nb ? _mm256_loadu_si256((const __m256i *)(codes + (int64_t)(b0 + i) * 32))
                               : _mm256_setzero_si256();
        transpose4_epi32(v), transpose4_epi32(v + 4);
        /* v[k] (k < 4) holds word k of blocks 0-3 in its low half and word 4 + k in its high; v[4 + k] blocks 4-7 */
        int8_t *o = dst + (int64_t)b0 / 8 * 256;
        for (int k = 0; k < 4; k++) {
            _mm256_storeu_si256((__m256i *)(o + 32 * k), _mm256_permute2x128_si256(v[k], v[4 + k], 0x20));
            _mm256_storeu_si256((__m256i *)(o + 32 * (k + 4)), _mm256_permute2x128_si256(v[k], v[4 + k], 0x31));
        }
    }
}

/* A row of the int4 layout (`pack`: byte j of a block holds columns j and 16 + j; `high`: fifth bits or NULL)
   -> its K codes in column order. */
INLINE void int4_row_bytes(int K, const uint8_t *packed, const uint8_t *high, int8_t *dst) {
    const __m128i low = _mm_set1_epi8(15), sixteen = _mm_set1_epi8(16);
    const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m128i bit = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    for (int b = 0; b < K / 32; b++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(packed + (int64_t)b * 16));
        __m128i c[2] = {_mm_and_si128(raw, low), _mm_and_si128(_mm_srli_epi16(raw, 4), low)};
        for (int h = 0; high && h < 2; h++) {  /* + 16 in the bytes whose bit is set */
            const __m128i bits = _mm_shuffle_epi8(_mm_set1_epi16((short)high_bits16(high, b, h)), spread);
            c[h] = _mm_add_epi8(c[h], _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(bits, bit), bit), sixteen));
        }
        _mm_storeu_si128((__m128i *)(dst + (int64_t)b * 32), c[0]);
        _mm_storeu_si128((__m128i *)(dst + (int64_t)b * 32 + 16), c[1]);
    }
}

/* A paneled int4 row (q4_pos) -> its K codes in column order. */
INLINE void panel_row_bytes(int K, const uint8_t *packed, int8_t *dst) {
    const int nb = K / 32;
    const __m256i low = _mm256_set1_epi8(15);
    for (int b = 0; b + 8 <= nb; b += 8) {
        __m256i lo[4], hi[4];
        for (int w = 0; w < 4; w++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(packed + (int64_t)b * 16 + 32 * w));
            lo[w] = _mm256_and_si256(v, low), hi[w] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
        words8_to_blocks(lo, hi, (uint8_t *)dst + (int64_t)b * 32);
    }
    for (int b = nb / 8 * 8; b < nb; b++)  /* the short last panel */
        for (int j = 0; j < 16; j++) {
            const uint8_t byte = packed[q4_pos(1, K, b, j)];
            dst[b * 32 + j] = (int8_t)(byte & 15), dst[b * 32 + 16 + j] = (int8_t)(byte >> 4);
        }
}

/* A row of int8 codes in panels (q8_pos) -> dst in the word order: whole panels are that order already; the
   short last one is copied word by word into the short group's places (words_at), its padding zero. */
INLINE void panel8_row_words(int K, const int8_t *codes, int8_t *dst) {
    const int nb = K / 32, b0 = nb / 8 * 8, KW = words_cols(K);
    __builtin_memcpy(dst, codes, (size_t)b0 * 32);
    if (b0 == nb) return;
    __builtin_memset(dst + (int64_t)b0 * 32, 0, KW - (int64_t)b0 * 32);
    for (int b = b0; b < nb; b++)
        for (int c = 0; c < 32; c += 4) __builtin_memcpy(dst + words_at(K, b, c), codes + q8_pos(K, b, c), 4);
}

/* Where the tiles' rows of W come from: int8 codes (N, K) with `planes` of block scales (`flags`, rows `stride`
   apart; NULL: a float scale per row, `row_scale`), or (G > 0) the int4 layout with its fifth bits (or NULL)
   and scale_zero (rows `stride` apart: the scales of the groups of G columns, then their zeros). */
typedef struct {
    const int8_t *codes;
    const uint8_t *packed, *high;
    const uint16_t *planes;
    const float *row_scale;
    int flags, G;
    int64_t stride;
    float mid;  /* int4 with Q4_MID_ZERO: the zeros are mid x the scales (no zero plane); else 0 */
} words_w_t;

/* Row `row` of w -> dst in the word order (tmp: K bytes of scratch for int4), and its scales' planes. */
INLINE bscale_t words_w_row(const words_w_t *w, int K, int64_t row, int8_t *dst, int8_t *tmp) {
    if (w->G) {
        const uint8_t *packed = w->packed + row * (K / 2);
        if (q4_paneled(w->G, w->high)) panel_row_bytes(K, packed, tmp);
        else int4_row_bytes(K, packed, w->high ? w->high + row * high_stride(K) : 0, tmp);
        words_row(K, tmp, dst);
        const uint16_t *sz = w->planes + row * w->stride;
        const bscale_t bs = {sz, 0, w->mid ? 0 : sz + w->stride / 2, 0};
        return bs;
    }
    panel8_row_words(K, w->codes + row * K, dst);
    return block_planes(w->planes ? w->planes + row * w->stride : 0, w->flags, (K / 32 + 7) & ~7);
}

/* acc[r] += the offset terms of the 8 blocks from b for rows r < RX of x: z (a vector of 8 blocks' offsets) times
   the blocks' sums of x (xs), or where zb is given (offsets per 16 columns) z and *zb times the sums of their
   first and last 16 columns (xa, xb); rows of x nbx apart. */
INLINE void add_offsets(const int RX, __m256 *acc, __m256 z, const __m256 *zb, const float *xs, const float *xa,
                        const float *xb, int nbx, int b) {
    for (int r = 0; r < RX; r++) {
        if (zb) {
            acc[r] = _mm256_fmadd_ps(z, _mm256_loadu_ps(xa + (int64_t)r * nbx + b), acc[r]);
            acc[r] = _mm256_fmadd_ps(*zb, _mm256_loadu_ps(xb + (int64_t)r * nbx + b), acc[r]);
        } else {
            acc[r] = _mm256_fmadd_ps(z, _mm256_loadu_ps(xs + (int64_t)r * nbx + b), acc[r]);
        }
    }
}

/* RW (<= 2) rows of W in the word order (w, KW bytes apart; bs[j] their scales, per G columns; all NULL: none)
   against RX (<= 4) rows of x (xw rows KW apart; xd, xs and the half sums xa, xb rows nbx apart):
   out[j * RX + r]. U: unsigned codes below 32 (int4 / int5). H: a scale per 16 columns (words 0-3 of a block
   are its first 16 columns, 4-7 its last 16), each half's sums scaled apart. */
INLINE void words_tile(const int RW, const int RX, const int G, const int U, const int H, int K, const int8_t *w,
                       const bscale_t *bs, float mid, const int8_t *xw, const float *xd, const float *xs,
                       const float *xa, const float *xb, float *out) {
    const int KW = words_cols(K), nbx = (K / 32 + 15) & ~15;
#ifndef WORDS_DPBUSD
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[2][4];
    for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) acc[j][r] = _mm256_setzero_ps();
    for (int o0 = 0; o0 < KW; o0 += 256) {
        const int b = o0 / 32;  /* scales and offsets are padded to whole eights, xd, xs, xa, xb to sixteens */
        const int L = o0 + 256 <= KW ? 256 : 128;  /* the group's bytes (words_cols) */
        for (int h = 0; h < (H ? 2 : 1); h++) {
            __m256i s[2][4];
            for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) s[j][r] = _mm256_setzero_si256();
            const int begin = o0 + L / 2 * h, end = H ? begin + L / 2 : o0 + L;
            if (U) {  /* two words at a time */
                for (int o = begin; o < end; o += 64) {
                    __m256i w0[2], w1[2];
                    for (int j = 0; j < RW; j++) {
                        w0[j] = _mm256_loadu_si256((const __m256i *)(w + (int64_t)j * KW + o));
                        w1[j] = _mm256_loadu_si256((const __m256i *)(w + (int64_t)j * KW + o + 32));
                    }
                    for (int r = 0; r < RX; r++) {
                        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xw + (int64_t)r * KW + o));
                        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xw + (int64_t)r * KW + o + 32));
                        for (int j = 0; j < RW; j++) {
#ifdef WORDS_DPBUSD
                            s[j][r] = WORDS_DPBUSD(WORDS_DPBUSD(s[j][r], w0[j], x0), w1[j], x1);
#else
                            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0[j], x0),
                                                               _mm256_maddubs_epi16(w1[j], x1));
                            s[j][r] = _mm256_add_epi32(s[j][r], _mm256_madd_epi16(p, ones));
#endif
                        }
                    }
                }
            } else {
                for (int o = begin; o < end; o += 32) {
                    __m256i wv[2], aw[2];
                    for (int j = 0; j < RW; j++)
                        wv[j] = _mm256_loadu_si256((const __m256i *)(w + (int64_t)j * KW + o)),
                        aw[j] = _mm256_abs_epi8(wv[j]);
                    for (int r = 0; r < RX; r++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xw + (int64_t)r * KW + o));
                        for (int j = 0; j < RW; j++) {
#ifdef WORDS_DPBUSD
                            s[j][r] = WORDS_DPBUSD(s[j][r], aw[j], _mm256_sign_epi8(xv, wv[j]));
#else
                            const __m256i p = _mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(xv, wv[j]));
                            s[j][r] = _mm256_add_epi32(s[j][r], _mm256_madd_epi16(p, ones));
#endif
                        }
                    }
                }
            }
            const __m256i short_lanes = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);  /* words 2u, 2u + 1 of 4 blocks */
            for (int j = 0; j < RW; j++) {
                const uint16_t *plane = h ? bs[j].b : bs[j].a;
                const __m256 scale = plane ? per_block(plane, b * 32 / G, G) : _mm256_set1_ps(1.0f);
                for (int r = 0; r < RX; r++) {
                    /* lane i: block i's */
                    const __m256 c = _mm256_mul_ps(scale, _mm256_loadu_ps(xd + (int64_t)r * nbx + b));
                    const __m256 cl = L == 256 ? c : _mm256_permutevar8x32_ps(c, short_lanes);
                    acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[j][r]), cl, acc[j][r]);
                }
            }
        }
        for (int j = 0; j < RW; j++) {
            if (!bs[j].z && !mid) continue;
            const __m256 z = bs[j].z ? per_block(bs[j].z, b * 32 / G, G)
                                     : _mm256_mul_ps(per_block(bs[j].a, b * 32 / G, G), _mm256_set1_ps(mid));
            const __m256 zb = bs[j].zb ? per_block(bs[j].zb, b, 32) : z;
            add_offsets(RX, acc[j], z, bs[j].zb ? &zb : 0, xs, xa, xb, nbx, b);
        }
    }
    for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) out[j * RX + r] = hsum(acc[j][r]);
}

/* y (M, N) = x W^T for M >= WORDS_MIN_ROWS rows and W from `w`; 1, or 0 when memory runs out. */
static int words_linear(int M, int N, int K, const void *x, int x_bf16, const words_w_t *w, void *y, int y_bf16,
                        int n_threads) {
    const int KW = words_cols(K), nbx = (K / 32 + 15) & ~15, G = w->G, H = !G && (w->flags & 1);
    const int halves = !G && (w->flags & 4);
    int8_t *xw = calloc((size_t)M * KW, 1);
    float *dsum = calloc((size_t)(halves ? 4 : 2) * M * nbx, sizeof(float));
    if (!xw || !dsum) { free(xw); free(dsum); return 0; }
    float *xd = dsum, *xs = dsum + (int64_t)M * nbx, *xh = halves ? dsum + (int64_t)2 * M * nbx : 0;
    quantize_words(M, K, x, x_bf16, xw, xd, xs, xh, 0, n_threads);
    const int chunk = WORDS_X_BYTES / KW > 4 ? WORDS_X_BYTES / KW / 4 * 4 : 4;
    int failed = 0;
    #pragma omp parallel num_threads(n_threads)
    {
        /* two rows in the word order, then int4's scratch (aligned_alloc wants a multiple of the alignment) */
        int8_t *wb = aligned_alloc(64, ((size_t)2 * KW + K + 63) & ~(size_t)63);
        if (!wb) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        for (int m1 = 0; m1 < M && !failed; m1 += chunk) {
            const int m2 = M - m1 < chunk ? M : m1 + chunk;
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n += 2) {
                const int rw = N - n < 2 ? 1 : 2;
                bscale_t bs[2];
                for (int j = 0; j < 2; j++)  /* a missing second row repeats the first */
                    bs[j] = words_w_row(w, K, n + (j < rw ? j : 0), wb + (int64_t)j * KW, wb + 2 * (int64_t)KW);
                for (int m0 = m1; m0 < m2; m0 += 4) {
                    float out[8];
                    const int R = m2 - m0 < 4 ? m2 - m0 : 4;
                    const int64_t at = (int64_t)m0 * nbx;
                    const float *xa = xh ? xh + at : 0, *xb = xh ? xh + (int64_t)M * nbx + at : 0;
                    /* constant tile shapes, group sizes and code kinds: unrolled loops, sums in registers */
                    #define WORDS_TILE(r_, g_, u_, h_) \
                        words_tile(2, r_, g_, u_, h_, K, wb, bs, w->mid, xw + (int64_t)m0 * KW, xd + at, xs + at, \
                                   xa, xb, out)
                    #define WORDS_TILES(g_, u_, h_) switch (R) { \
                        case 1: WORDS_TILE(1, g_, u_, h_); break; case 2: WORDS_TILE(2, g_, u_, h_); break; \
                        case 3: WORDS_TILE(3, g_, u_, h_); break; default: WORDS_TILE(4, g_, u_, h_); break; }
                    if (G == 32) { WORDS_TILES(32, 1, 0) }
                    else if (G == 64) { WORDS_TILES(64, 1, 0) }
                    else if (G) { WORDS_TILES(128, 1, 0) }
                    else if (H) { WORDS_TILES(32, 0, 1) }
                    else { WORDS_TILES(32, 0, 0) }
                    for (int j = 0; j < rw; j++) {
                        const float sn = w->row_scale ? w->row_scale[n + j] : 1.0f;
                        for (int r = 0; r < R; r++)
                            store(y, y_bf16, (int64_t)(m0 + r) * N + n + j, out[j * R + r] * sn);
                    }
                }
            }
        }
        free(wb);
    }
    free(xw);
    free(dsum);
    return !failed;
}

/* RW rows of a paneled int4 W (rows K / 2 bytes apart; sz: their scales, then (mid 0) their zeros, ngp values a
   plane, rows `stride` apart) against RX rows of x in the full word order (rows words_full(K) apart; xd, xs rows
   nbx apart): out[j * RX + r]. Per 32 bytes of codes (a word of 8 blocks) and row of x two vpmaddubsw, the low
   nibbles against x's word w, the high ones against its word 4 + w; a block's 4 words' 16-bit pair sums (at most
   4 x 2 x 2 x 15 x 127) are added, then one vpmaddwd against ones leaves each block's sum in its lane. A short
   last panel (L < 8 blocks) is read with a lane mask (x's padding is zeros). */
INLINE void panel_tile(const int RW, const int RX, const int G, int K, int rows_w, const uint8_t *codes,
                       const uint16_t *sz, int ngp, int64_t stride, float mid, const int8_t *xw, const float *xd,
                       const float *xs, float *out) {
    const int nb = K / 32, nbx = (nb + 15) & ~15, KX = words_full(K);
    const int64_t ahead = group_ahead(K / 2), rows_ahead = ahead / (K / 2);
    const __m256i low = _mm256_set1_epi8(15), iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#ifndef WORDS_DPBUSD
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    const uint8_t *row[4];
    const uint16_t *srow[4];
    for (int j = 0; j < RW; j++) {  /* missing rows repeat row 0 (valid memory); their results are dropped */
        row[j] = codes + (int64_t)(j < rows_w ? j : 0) * (K / 2);
        srow[j] = sz + (int64_t)(j < rows_w ? j : 0) * stride;
    }
    __m256 acc[4][3];
    for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) acc[j][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b += 8) {
        const int L = nb - b < 8 ? nb - b : 8;
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(L), iota);
        __m256i t[4][3];
        for (int w = 0; w < 4; w++) {
            __m256i xl[3], xh[3];
            for (int r = 0; r < RX; r++)
                xl[r] = _mm256_loadu_si256((const __m256i *)(xw + (int64_t)r * KX + b * 32 + 32 * w)),
                xh[r] = _mm256_loadu_si256((const __m256i *)(xw + (int64_t)r * KX + b * 32 + 32 * (4 + w)));
            for (int j = 0; j < RW; j++) {
                const uint8_t *at = row[j] + (int64_t)b * 16 + 4 * L * w;
                __builtin_prefetch(at + ahead, 0, 2);
                const __m256i v = L == 8 ? _mm256_loadu_si256((const __m256i *)at)
                                         : _mm256_maskload_epi32((const int *)at, lanes);
                const __m256i c0 = _mm256_and_si256(v, low), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int r = 0; r < RX; r++) {
#ifdef WORDS_DPBUSD
                    t[j][r] = WORDS_DPBUSD(WORDS_DPBUSD(w ? t[j][r] : _mm256_setzero_si256(), c0, xl[r]), c1, xh[r]);
#else
                    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(c0, xl[r]),
                                                       _mm256_maddubs_epi16(c1, xh[r]));
                    t[j][r] = w ? _mm256_add_epi16(t[j][r], p) : p;
#endif
                }
            }
        }
        for (int j = 0; j < RW; j++) {
            if ((b & 31) == 0) {  /* a line of a float16 plane: 32 groups, 32 or more blocks */
                prefetch_side(srow[j] + b * 32 / G, rows_ahead, 2 * stride);
                if (!mid) prefetch_side(srow[j] + ngp + b * 32 / G, rows_ahead, 2 * stride);
            }
            const __m256 s = per_block(srow[j], b * 32 / G, G);
            const __m256 z = mid ? _mm256_mul_ps(s, _mm256_set1_ps(mid)) : per_block(srow[j] + ngp, b * 32 / G, G);
            for (int r = 0; r < RX; r++) {
#ifdef WORDS_DPBUSD
                const __m256i sum = t[j][r];
#else
                const __m256i sum = _mm256_madd_epi16(t[j][r], ones);
#endif
                const __m256 c = _mm256_mul_ps(s, _mm256_loadu_ps(xd + (int64_t)r * nbx + b));
                acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), c, acc[j][r]);
                acc[j][r] = _mm256_fmadd_ps(z, _mm256_loadu_ps(xs + (int64_t)r * nbx + b), acc[j][r]);
            }
        }
    }
    for (int j = 0; j < rows_w; j++) for (int r = 0; r < RX; r++) out[j * RX + r] = hsum(acc[j][r]);
}

/* y (M, N) = x W^T for M < WORDS_MIN_ROWS rows of x (decode) and a paneled int4 W (scale_zero: `planes` planes of
   ngp values a row): x rounded to bytes in the full word order, tiles of 4 rows of W against one row of x, of 2
   against two or three. 1, or 0 when memory runs out. */
static int panel_linear(int M, int N, int K, int G, const void *x, int x_bf16, const uint8_t *codes,
                        const uint16_t *scale_zero, int planes, void *y, int y_bf16, int n_threads) {
    const int nbx = (K / 32 + 15) & ~15, ngp = (K / G + 7) & ~7, RW = M == 1 ? 4 : 2;
    int8_t *xw = calloc((size_t)M * words_full(K), 1);
    float *dsum = calloc((size_t)2 * M * nbx, sizeof(float));
    if (!xw || !dsum) { free(xw); free(dsum); return 0; }
    float *xd = dsum, *xs = dsum + (int64_t)M * nbx;
    quantize_words(M, K, x, x_bf16, xw, xd, xs, 0, 1, n_threads);
    const float mid = planes == 1 ? q4_mid(0) : 0.0f;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n += RW) {
        float out[12];
        const int rows = N - n < RW ? N - n : RW;
        const uint8_t *cn = codes + (int64_t)n * (K / 2);
        const uint16_t *sn = scale_zero + (int64_t)n * planes * ngp;
        /* constant tile shapes and group sizes: unrolled loops, sums in registers */
        #define PANEL_TILE(rw_, rx_, g_) \
            panel_tile(rw_, rx_, g_, K, rows, cn, sn, ngp, (int64_t)planes * ngp, mid, xw, xd, xs, out)
        #define PANEL_TILES(g_) \
            if (M == 1) PANEL_TILE(4, 1, g_); else if (M == 2) PANEL_TILE(2, 2, g_); else PANEL_TILE(2, 3, g_);
        if (G == 32) { PANEL_TILES(32) } else if (G == 64) { PANEL_TILES(64) } else { PANEL_TILES(128) }
        for (int j = 0; j < rows; j++)
            for (int r = 0; r < M; r++) store(y, y_bf16, (int64_t)r * N + n + j, out[j * M + r]);
    }
    free(xw);
    free(dsum);
    return 1;
}

/* RW rows of paneled int8 W (rows K bytes apart; bs[j]: row j's block scales, bscale_t, all NULL: none) against
   RX rows of x in the full word order (rows words_full(K) apart; xd, xs and the half sums xa, xb rows nbx apart):
   out[j * RX + r]. Per 32 bytes of codes (a word of 8 blocks) and row of x: vpmaddubsw(|w|, sign(x, w)) (pairs at
   most 2 x 128 x 127), vpmaddwd against ones and an add (or one vpdpbusd): each block's sum in its lane. H: a
   scale per 16 columns (words 0-3 of a block are its first 16 columns, 4-7 its last 16), each half summed apart;
   `side`: values between two rows' block scales (their prefetch). */
INLINE void panel8_tile(const int RW, const int RX, const int H, int K, int rows_w, const int8_t *codes,
                        const bscale_t *bs, int64_t side, const int8_t *xw, const float *xd, const float *xs,
                        const float *xa, const float *xb, float *out) {
    const int nb = K / 32, nbx = (nb + 15) & ~15, KX = words_full(K);
    const int64_t ahead = group_ahead(K), rows_ahead = ahead / K;
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#ifndef WORDS_DPBUSD
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    const int8_t *row[4];
    for (int j = 0; j < RW; j++) row[j] = codes + (int64_t)(j < rows_w ? j : 0) * K;  /* missing rows: row 0's */
    __m256 acc[4][3];
    for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) acc[j][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b += 8) {
        const int L = nb - b < 8 ? nb - b : 8;
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(L), iota);
        for (int h = 0; h < (H ? 2 : 1); h++) {
            __m256i t[4][3];
            for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) t[j][r] = _mm256_setzero_si256();
            for (int v = H ? 4 * h : 0; v < (H ? 4 * h + 4 : 8); v++) {
                __m256i xv[3];
                for (int r = 0; r < RX; r++)
                    xv[r] = _mm256_loadu_si256((const __m256i *)(xw + (int64_t)r * KX + b * 32 + 32 * v));
                for (int j = 0; j < RW; j++) {
                    const int8_t *at = row[j] + (int64_t)b * 32 + 4 * L * v;
                    if (v % 2 == 0) __builtin_prefetch(at + ahead, 0, 2);
                    const __m256i w = L == 8 ? _mm256_loadu_si256((const __m256i *)at)
                                             : _mm256_maskload_epi32((const int *)at, lanes);
                    const __m256i aw = _mm256_abs_epi8(w);
                    for (int r = 0; r < RX; r++) {
#ifdef WORDS_DPBUSD
                        t[j][r] = WORDS_DPBUSD(t[j][r], aw, _mm256_sign_epi8(xv[r], w));
#else
                        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[r], w));
                        t[j][r] = _mm256_add_epi32(t[j][r], _mm256_madd_epi16(p, ones));
#endif
                    }
                }
            }
            for (int j = 0; j < RW; j++) {
                const uint16_t *plane = h ? bs[j].b : bs[j].a;
                if (plane && (b & 31) == 0) prefetch_side(plane + b, rows_ahead, 2 * side);
                const __m256 scale = plane ? per_block(plane, b, 32) : _mm256_set1_ps(1.0f);
                for (int r = 0; r < RX; r++) {
                    const __m256 c = _mm256_mul_ps(scale, _mm256_loadu_ps(xd + (int64_t)r * nbx + b));
                    acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[j][r]), c, acc[j][r]);
                }
            }
        }
        for (int j = 0; j < RW; j++) {
            if (!bs[j].z) continue;
            if ((b & 31) == 0) prefetch_side(bs[j].z + b, rows_ahead, 2 * side);
            const __m256 z = per_block(bs[j].z, b, 32), zb = bs[j].zb ? per_block(bs[j].zb, b, 32) : z;
            add_offsets(RX, acc[j], z, bs[j].zb ? &zb : 0, xs, xa, xb, nbx, b);
        }
    }
    for (int j = 0; j < rows_w; j++) for (int r = 0; r < RX; r++) out[j * RX + r] = hsum(acc[j][r]);
}

/* y (M, N) = x W^T for M < WORDS_MIN_ROWS rows of x (decode) and paneled int8 W (a float scale per row, or block
   scales `bscale` with `flags`, rows `stride` values apart): tiles of 4 rows of W against one row of x, of 2
   against two or three. 1, or 0 when memory runs out. */
static int panel8_linear(int M, int N, int K, const void *x, int x_bf16, const int8_t *codes, const float *scale,
                         const uint16_t *bscale, int flags, int64_t stride, void *y, int y_bf16, int n_threads) {
    const int nbx = (K / 32 + 15) & ~15, nbs = (K / 32 + 7) & ~7, RW = M == 1 ? 4 : 2, H = (flags & 1) != 0;
    int8_t *xw = calloc((size_t)M * words_full(K), 1);
    float *dsum = calloc((size_t)4 * M * nbx, sizeof(float));
    if (!xw || !dsum) { free(xw); free(dsum); return 0; }
    float *xd = dsum, *xs = dsum + (int64_t)M * nbx, *xh = dsum + (int64_t)2 * M * nbx;
    quantize_words(M, K, x, x_bf16, xw, xd, xs, xh, 1, n_threads);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n += RW) {
        float out[12];
        const int rows = N - n < RW ? N - n : RW;
        bscale_t bs[4];
        for (int j = 0; j < RW; j++)  /* missing rows repeat the first */
            bs[j] = block_planes(bscale ? bscale + (int64_t)(n + (j < rows ? j : 0)) * stride : 0, flags, nbs);
        /* constant tile shapes: unrolled loops, sums in registers */
        #define PANEL8_TILE(rw_, rx_, h_) panel8_tile(rw_, rx_, h_, K, rows, codes + (int64_t)n * K, bs, stride, xw, \
                                                      xd, xs, xh, xh + (int64_t)M * nbx, out)
        #define PANEL8_TILES(h_) \
            if (M == 1) PANEL8_TILE(4, 1, h_); else if (M == 2) PANEL8_TILE(2, 2, h_); else PANEL8_TILE(2, 3, h_);
        if (H) { PANEL8_TILES(1) } else { PANEL8_TILES(0) }
        for (int j = 0; j < rows; j++) {
            const float sn = scale ? scale[n + j] : 1.0f;
            for (int r = 0; r < M; r++) store(y, y_bf16, (int64_t)r * N + n + j, out[j * M + r] * sn);
        }
    }
    free(xw);
    free(dsum);
    return 1;
}
#endif

/* y (M, N) = x (M, K) W^T for int8 W (N, K) with a float scale per row (scale) or float16 block scales
   (bscale, `planes` (N, planes, K / 32 rounded up to eights): see zen_q8b_linear); dtypes as zen_q4_linear. */
static int q8_linear(int M, int N, int K, const void *x, int x_bf16, const int8_t *codes, const float *scale,
                     const uint16_t *bscale, int flags, void *y, int y_bf16, int n_threads) {
    const int nbs = (K / 32 + 7) & ~7;
    const int64_t stride = block_stride(flags, nbs);  /* one row's block scales */
#if defined(__AVX2__) && !defined(ZEN_VNNI)
    if (M >= WORDS_MIN_ROWS) {  /* prompts: x in bytes, W in the word order */
        const words_w_t w = {codes, 0, 0, bscale, scale, flags, 0, stride, 0.0f};
        return words_linear(M, N, K, x, x_bf16, &w, y, y_bf16, n_threads) ? 0 : -1;
    }  /* decode: the panels against x in bytes */
    return panel8_linear(M, N, K, x, x_bf16, codes, scale, bscale, flags, stride, y, y_bf16, n_threads) ? 0 : -1;
#else  /* AVX-512 VNNI and plain C: x in 15-16 bits, W as stored */
    const int nbx = (K / 32 + 15) & ~15, KP = x_stride(K);
    qx_t qx;
#ifdef ZEN_VNNI
    if (M == 1) {  /* decode: four rows of W at a time */
        if (!prepare_x(1, K, x, x_bf16, X_EVEN_ODD, flags & 4, &qx)) return -1;
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int n = 0; n < N; n += 4) {
            float out[4];
            const int rows = N - n < 4 ? N - n : 4;
            const bscale_t bs = block_planes(bscale ? bscale + (int64_t)n * stride : 0, flags, nbs);
            row4_tile8(K, rows, codes + (int64_t)n * K, scale ? scale + n : 0, bs, stride, qx.xq, qx.xd, qx.xs, qx.xh,
                       qx.xh ? qx.xh + nbx : 0, out);
            for (int j = 0; j < rows; j++) store(y, y_bf16, n + j, out[j]);
        }
        free_x(&qx);
        return 0;
    }
#endif
    if (!prepare_x(M, K, x, x_bf16, X_PLAIN, flags & 4, &qx)) return -1;
    const int16_t *xq = qx.xq;
    const float *xd = qx.xd, *xs = qx.xs;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *cn = codes + (int64_t)n * K;
        const bscale_t bs = block_planes(bscale ? bscale + (int64_t)n * stride : 0, flags, nbs);
        for (int m0 = 0; m0 < M; m0 += 4) {
            float out[4];
            const int16_t *q = xq + (int64_t)m0 * KP;
            const float *d = xd + (int64_t)m0 * nbx, *s = xs + (int64_t)m0 * nbx;
            const float *ha = qx.xh ? qx.xh + (int64_t)m0 * nbx : 0, *hb = qx.xh ? qx.xh + (int64_t)(M + m0) * nbx : 0;
            int R = M - m0 < 4 ? M - m0 : 4;
            const float sn = scale ? scale[n] : 1.0f;
            switch (R) {
                case 1: row_tile8(1, K, cn, sn, bs, q, d, s, ha, hb, out); break;
                case 2: row_tile8(2, K, cn, sn, bs, q, d, s, ha, hb, out); break;
                case 3: row_tile8(3, K, cn, sn, bs, q, d, s, ha, hb, out); break;
                default: row_tile8(4, K, cn, sn, bs, q, d, s, ha, hb, out); break;
            }
            for (int r = 0; r < R; r++) store(y, y_bf16, (int64_t)(m0 + r) * N + n, out[r]);
        }
    }
    free_x(&qx);
    return 0;
#endif
}

/* Rows of x from which the int8 and int4 loops take the AVX2 prompt tiles (words_linear); 0 where they are not
   built. */
int zen_word_rows(void) {
#if defined(__AVX2__) && !defined(ZEN_VNNI)
    return WORDS_MIN_ROWS;
#else
    return 0;
#endif
}

int zen_q8_linear(int M, int N, int K, const void *x, int x_bf16, const int8_t *codes, const float *scale,
                  void *y, int y_bf16, int n_threads) {
    return q8_linear(M, N, K, x, x_bf16, codes, scale, 0, 0, y, y_bf16, n_threads);
}

/* int8 W with float16 block scales: per row `planes` streams of K / 32 (rounded up to eights) values:
   the scale of each block of 32 columns, or (flags & 1) of its first 16 columns followed by a plane for
   its last 16; then (flags & 2) a plane of offsets, w = code * scale + offset, or with (flags & 4) two:
   the first and the last 16 columns'. GGUF's Q8_0 and Q5_0 (a scale per 32), Q5_1 / Q5_K / Q4_x (with
   offsets), Q6_K / Q3_K (a scale per 16), Q2_K (a scale and an offset per 16). */
int zen_q8b_linear(int M, int N, int K, const void *x, int x_bf16, const int8_t *codes, const uint16_t *bscale,
                   int flags, void *y, int y_bf16, int n_threads) {
    return q8_linear(M, N, K, x, x_bf16, codes, 0, bscale, flags, y, y_bf16, n_threads);
}

/* 32 floats to out[0..32), float32 or (bf16) bfloat16 rounded to nearest even: a loop the compiler
   vectorizes. */
INLINE void store32(void *out, int bf16, int64_t at, const float *v) {
    if (bf16) for (int j = 0; j < 32; j++) ((uint16_t *)out)[at + j] = f32_to_bf16(v[j]);
    else for (int j = 0; j < 32; j++) ((float *)out)[at + j] = v[j];
}

/* The dense (N, K) weight, float32 or (out_bf16) bfloat16, for a prompt's GEMM: each value computed in
   float32 (code * scale exact, + offset rounded once) and rounded once to bfloat16; one pass over the
   codes, rows split across threads. int4: `zen_q4_linear`'s buffers; int8 blocks: `zen_q8b_linear`'s. */
void zen_q4_dequant(int N, int K, int G, const uint8_t *codes, const uint8_t *high, const uint16_t *scale_zero,
                    void *out, int out_bf16, int n_threads) {
    const int planes = q4_planes(G);
    G &= ~Q4_MID_ZERO;
    const int ngp = (K / G + 7) & ~7, paneled = q4_paneled(G, high);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *c = codes + (int64_t)n * (K / 2), *h = high ? high + (int64_t)n * high_stride(K) : 0;
        const uint16_t *sz = scale_zero + (int64_t)n * planes * ngp;
        for (int b = 0; b < K / 32; b++) {
            const float s = f16(sz[b * 32 / G]), z = planes == 2 ? f16(sz[ngp + b * 32 / G]) : q4_mid(high) * s;
            const uint32_t h0 = h ? high_bits16(h, b, 0) : 0, h1 = h ? high_bits16(h, b, 1) : 0;
            float v[32];
            for (int j = 0; j < 16; j++) {
                const uint8_t byte = c[q4_pos(paneled, K, b, j)];
                v[j] = (float)((byte & 15) + 16 * (h0 >> j & 1)) * s + z;
                v[j + 16] = (float)((byte >> 4) + 16 * (h1 >> j & 1)) * s + z;
            }
            store32(out, out_bf16, (int64_t)n * K + b * 32, v);
        }
    }
}

void zen_q8b_dequant(int N, int K, const int8_t *codes, const uint16_t *bscale, int flags, void *out, int out_bf16,
                     int n_threads) {
    const int nbs = (K / 32 + 7) & ~7;
    const int64_t stride = block_stride(flags, nbs);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const bscale_t bs = block_planes(bscale + (int64_t)n * stride, flags, nbs);
        const int8_t *c = codes + (int64_t)n * K;
        for (int b = 0; b < K / 32; b++) {
            const float sa = f16(bs.a[b]), sb = bs.b ? f16(bs.b[b]) : sa, z = bs.z ? f16(bs.z[b]) : 0.0f;
            const float zb = bs.zb ? f16(bs.zb[b]) : z;
            float v[32];
            for (int j = 0; j < 16; j++) {
                v[j] = (float)c[q8_pos(K, b, j)] * sa + z;
                v[j + 16] = (float)c[q8_pos(K, b, j + 16)] * sb + zb;
            }
            store32(out, out_bf16, (int64_t)n * K + b * 32, v);
        }
    }
}

#ifdef ZEN_VNNI
#define X_INT4 X_PAIRS  /* the order the int4 loops read x in */
#else
#define X_INT4 X_PLAIN
#endif

/* y (M, N) = x (M, K) W^T. x and y are float32, or bfloat16 where x_bf16 / y_bf16; scale_zero
   (N, 2, ngp) float16: each row's scales, then its zeros. Returns 0, or -1 when memory runs out. */
int zen_q4_linear(int M, int N, int K, int G, const void *x, int x_bf16, const uint8_t *codes, const uint8_t *high,
                  const uint16_t *scale_zero, void *y, int y_bf16, int n_threads) {
    const int planes = q4_planes(G);
    G &= ~Q4_MID_ZERO;
    const int ngp = (K / G + 7) & ~7, nbx = (K / 32 + 15) & ~15, KP = x_stride(K);
#ifdef ZEN_VNNI
    if (M == 1) {  /* decode: x as int8 planes, four rows of W at a time */
        int8_t *xp = calloc((size_t)(K / 32 + 3) / 4 * 256, 1);
        float *dsum = calloc((size_t)2 * nbx, sizeof(float));
        if (!xp || !dsum) { free(xp); free(dsum); return -1; }
        quantize_planes(K, 0, x, x_bf16, xp, dsum, dsum + nbx, 0);
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int n = 0; n < N; n += 4) {
            float out[4];
            const int rows = N - n < 4 ? N - n : 4;
            const uint8_t *cn = codes + (int64_t)n * (K / 2), *hn = high ? high + (int64_t)n * high_stride(K) : 0;
            const uint16_t *sn = scale_zero + (int64_t)n * planes * ngp;
            /* constant G: unrolled loops */
            if (G == 32) row4_tile(K, rows, 32, cn, hn, sn, ngp, planes, xp, dsum, dsum + nbx, out);
            else if (G == 64) row4_tile(K, rows, 64, cn, hn, sn, ngp, planes, xp, dsum, dsum + nbx, out);
            else if (G == 128) row4_tile(K, rows, 128, cn, hn, sn, ngp, planes, xp, dsum, dsum + nbx, out);
            else row4_tile(K, rows, G, cn, hn, sn, ngp, planes, xp, dsum, dsum + nbx, out);
            for (int j = 0; j < rows; j++) store(y, y_bf16, n + j, out[j]);
        }
        free(xp);
        free(dsum);
        return 0;
    }
#endif
#if defined(__AVX2__) && !defined(ZEN_VNNI)
    if (q4_paneled(G, high) && M < WORDS_MIN_ROWS)  /* decode: panels against x in bytes */
        return panel_linear(M, N, K, G, x, x_bf16, codes, scale_zero, planes, y, y_bf16, n_threads) ? 0 : -1;
    if (M >= WORDS_MIN_ROWS && (G == 32 || G == 64 || G == 128)) {  /* prompts: x in bytes, W in the word order */
        const words_w_t w = {0, codes, high, scale_zero, 0, 0, G, (int64_t)planes * ngp,
                             planes == 1 ? q4_mid(high) : 0.0f};
        return words_linear(M, N, K, x, x_bf16, &w, y, y_bf16, n_threads) ? 0 : -1;
    }
#endif
    qx_t qx;
    if (!prepare_x(M, K, x, x_bf16, X_INT4, 0, &qx)) return -1;
    const int16_t *xq = qx.xq;
    const float *xd = qx.xd, *xs = qx.xs;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *cn = codes + (int64_t)n * (K / 2), *hn = high ? high + (int64_t)n * high_stride(K) : 0;
        const uint16_t *sn = scale_zero + (int64_t)n * planes * ngp;  /* one stream per plane */
        const uint16_t *zn = planes == 2 ? sn + ngp : 0;
        for (int m0 = 0; m0 < M; m0 += 4) {
            float out[4];
            const int16_t *q = xq + (int64_t)m0 * KP;
            const float *d = xd + (int64_t)m0 * nbx, *s = xs + (int64_t)m0 * nbx;
            int R = M - m0 < 4 ? M - m0 : 4;
            /* constant R and G: unrolled loops, accumulators in registers */
            #define TILE(r_, g_) row_tile(r_, K, g_, cn, hn, sn, zn, q, d, s, out)
            #define TILES(g_) switch (R) { case 1: TILE(1, g_); break; case 2: TILE(2, g_); break; \
                                            case 3: TILE(3, g_); break; default: TILE(4, g_); break; }
            if (G == 32) { TILES(32) } else if (G == 64) { TILES(64) } else if (G == 128) { TILES(128) } else { TILES(G) }
            for (int r = 0; r < R; r++) store(y, y_bf16, (int64_t)(m0 + r) * N + n, out[r]);
        }
    }
    free_x(&qx);
    return 0;
}

/* codes (N, K) bytes -> packed (N, K / 2): per block of 32, byte i holds the low four bits of column i
   and, above them, of column i + 16 (see `pack`), at q4_pos(paneled, ...). */
void zen_q4_pack(int64_t N, int K, const uint8_t *codes, uint8_t *packed, int paneled, int n_threads) {
    const int nb = K / 32;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t b = 0; b < N * nb; b++) {
        const uint8_t *c = codes + b * 32;
        uint8_t *o = packed + b / nb * (K / 2);
        for (int i = 0; i < 16; i++) o[q4_pos(paneled, K, (int)(b % nb), i)] = (c[i] & 15) | (uint8_t)(c[i + 16] << 4);
    }
}

/* GGUF Q4_0 (ggml type 2: 18 bytes a block, d then 16 bytes of nibbles; w = d (q - 8)) or Q4_1 (type 3: 20 bytes,
   d, m, the nibbles; w = d q + m) blocks of an (N, K) matrix -> `pack`'s buffers for groups of 32 with no codes in
   between: ggml's nibbles are our layout already (byte j: column j low, 16 + j high), copied to q4_pos; d (and
   Q4_1's m) copied as float16 bits into scale_zero (N, planes, ngp: Q4_0 one plane, its zeros derived,
   Q4_MID_ZERO); the padding is left as the caller has it. */
void zen_q4_pack_blocks(int type, const uint8_t *blocks, int64_t N, int K, uint8_t *packed, uint16_t *scale_zero,
                        int n_threads) {
    const int nb = K / 32, q41 = type == 3, size = q41 ? 20 : 18, planes = q41 ? 2 : 1, ngp = (nb + 7) & ~7;
    const int paneled = q4_paneled(32, 0);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        uint8_t *row = packed + n * (K / 2);
        uint16_t *sz = scale_zero + n * planes * ngp;
        for (int b = 0; b < nb; b++) {
            const uint8_t *x = blocks + (n * nb + b) * size, *qs = x + (q41 ? 4 : 2);
            __builtin_memcpy(sz + b, x, 2);
            if (q41) __builtin_memcpy(sz + ngp + b, x + 2, 2);
            for (int w = 0; w < 4; w++) __builtin_memcpy(row + q4_pos(paneled, K, b, 4 * w), qs + 4 * w, 4);
        }
    }
}

/* GGUF Q8_0 blocks (ggml type 8: 34 bytes, d then 32 int8 codes) of an (N, K) matrix -> int8 codes in the order this
   build's loops read (q8_pos) and d's float16 bits as the block scales (N, K / 32 rounded up to eights: one plane,
   flags 0, as zen_q8b_linear reads them), in one pass; the padding is left as the caller has it. */
void zen_q8_pack_blocks(const uint8_t *blocks, int64_t N, int K, int8_t *codes, uint16_t *scales, int n_threads) {
    const int nb = K / 32, nbs = (nb + 7) & ~7;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int b = 0; b < nb; b++) {
            const uint8_t *x = blocks + (n * nb + b) * 34;
            __builtin_memcpy(scales + n * nbs + b, x, 2);
            for (int c = 0; c < 32; c += 4) __builtin_memcpy(codes + n * K + q8_pos(K, b, c), x + 2 + c, 4);
        }
}

/* codes (N, K) in [0, 31] -> their fifth bits, high_stride(K) bytes a row (see `pack_high`): per four blocks
   128 bits, bit 64 h + 16 j + c = column 16 h + c of block j of the four; missing blocks' bits 0. */
void zen_q4_pack_high(int64_t N, int K, const uint8_t *codes, uint8_t *high, int n_threads) {
    const int nb = K / 32, stride = high_stride(K);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < N; r++) {
        uint8_t *o = high + r * stride;
        __builtin_memset(o, 0, stride);
        for (int b = 0; b < nb; b++)
            for (int h = 0; h < 2; h++) {  /* 16 columns' bits: the little-endian 16-bit word 4 h + b % 4 */
                const uint8_t *c = codes + r * K + b * 32 + 16 * h;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
                const uint16_t m = _mm_test_epi8_mask(_mm_loadu_si128((const __m128i *)c), _mm_set1_epi8(16));
#else
                uint16_t m = 0;
                for (int i = 0; i < 16; i++) m |= (uint16_t)(((c[i] >> 4) & 1) << i);
#endif
                __builtin_memcpy(o + (b / 4) * 16 + 2 * (4 * h + b % 4), &m, 2);
            }
    }
}
"""


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built or ZEN_ECO_NATIVE_Q4=0 (then `Int4Linear`
    and `Int8Linear` use PyTorch's)."""
    if os.environ.get("ZEN_ECO_NATIVE_Q4", "1") == "0":
        return None
    from . import kquant_kernel  # its C uses this source's helpers (and the GEMM its); its Python, this library

    lib = native.build("q4_matmul", C_SOURCE + kquant_kernel.C_SOURCE + prompt_gemm.C_SOURCE)
    if lib is None:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.zen_q4_linear.restype = i
    lib.zen_q4_linear.argtypes = [i, i, i, i, p, i, p, p, p, p, i, i]
    lib.zen_q8_linear.restype = i
    lib.zen_q8_linear.argtypes = [i, i, i, p, i, p, p, p, i, i]
    lib.zen_q8b_linear.restype = i
    lib.zen_q8b_linear.argtypes = [i, i, i, p, i, p, p, i, p, i, i]
    lib.zen_gemm_available.restype = i
    lib.zen_gemm_available.argtypes = []
    lib.zen_word_rows.restype = i
    lib.zen_word_rows.argtypes = []
    lib.zen_q4_gemm.restype = i
    lib.zen_q4_gemm.argtypes = lib.zen_q4_linear.argtypes
    lib.zen_q8_gemm.restype = i
    lib.zen_q8_gemm.argtypes = lib.zen_q8_linear.argtypes
    lib.zen_q8b_gemm.restype = i
    lib.zen_q8b_gemm.argtypes = lib.zen_q8b_linear.argtypes
    lib.zen_q4_dequant.restype = None
    lib.zen_q4_dequant.argtypes = [i, i, i, p, p, p, p, i, i]
    lib.zen_q8b_dequant.restype = None
    lib.zen_q8b_dequant.argtypes = [i, i, p, p, i, p, i, i]
    lib.zen_q4_pack.restype = None
    lib.zen_q4_pack.argtypes = [ctypes.c_int64, i, p, p, i, i]
    lib.zen_q4_panels.restype = i
    lib.zen_q4_panels.argtypes = [i, i]
    lib.zen_q8_panels.restype = i
    lib.zen_q8_panels.argtypes = []
    lib.zen_q4_pack_blocks.restype = None
    lib.zen_q4_pack_blocks.argtypes = [i, p, ctypes.c_int64, i, p, p, i]
    lib.zen_q8_pack_blocks.restype = None
    lib.zen_q8_pack_blocks.argtypes = [p, ctypes.c_int64, i, p, p, i]
    lib.zen_q8_pack.restype = None
    lib.zen_q8_pack.argtypes = [ctypes.c_int64, i, p, p, i]
    lib.zen_q4_pack_high.restype = None
    lib.zen_q4_pack_high.argtypes = [ctypes.c_int64, i, p, p, i]
    lib.zen_kq_available.restype = i
    lib.zen_kq_available.argtypes = []
    lib.zen_kq_linear.restype = i
    lib.zen_kq_linear.argtypes = [i, i, i, i, p, i, p, p, p, p, p, i, i]
    lib.zen_kq_gemm.restype = i
    lib.zen_kq_gemm.argtypes = lib.zen_kq_linear.argtypes
    lib.zen_kq_pack.restype = None
    lib.zen_kq_pack.argtypes = [ctypes.c_int64, i, i, p, p, p, i]
    lib.zen_kq_pack_blocks.restype = None
    lib.zen_kq_pack_blocks.argtypes = [i, ctypes.c_int64, i, p, p, p, p, p, i]
    lib.zen_kq_dequant.restype = None
    lib.zen_kq_dequant.argtypes = [i, i, i, p, p, p, p, p, p, i, i]
    return lib


def available() -> bool:
    return library() is not None


def gemm_available() -> bool:
    """Whether the prompt GEMM (prompt_gemm: AVX-512 VNNI) is built here and not turned off (ZEN_ECO_GEMM=0):
    then calls from GEMM_MIN_ROWS rows take it, and layers keep prompts up to quant.GEMM_MAX_ROWS rows on it."""
    lib = library()
    return lib is not None and os.environ.get("ZEN_ECO_GEMM", "1") != "0" and bool(lib.zen_gemm_available())


def word_rows() -> int:
    """Rows of x from which the int8 and int4 kernels (`matmul`, `matmul_int8`, `matmul_int8_blocks`) take
    their AVX2 prompt tiles (x rounded to bytes per block of 32, W read in 8-block words; built where AVX2 is
    and AVX-512 VNNI is not), else 0."""
    lib = library()
    return int(lib.zen_word_rows()) if lib is not None else 0


def _entry(m: int, name: str, gemm: bool | None):
    """The C function for m rows: the prompt GEMM (`zen_*_gemm`) from GEMM_MIN_ROWS rows where it is built,
    else the row kernel (`zen_*_linear`). gemm: force one or the other (tests)."""
    lib = library()
    use = gemm if gemm is not None else m >= GEMM_MIN_ROWS and gemm_available()
    return getattr(lib, f"zen_{name}_gemm" if use else f"zen_{name}_linear")


def _packer(codes: torch.Tensor) -> ctypes.CDLL | None:
    """The library, where it is built and packs `codes` (contiguous uint8 on the CPU) in C; else None."""
    if codes.dtype == torch.uint8 and codes.is_contiguous() and codes.device.type == "cpu":
        return library()
    return None


def paneled(group: int, bits: int = 4) -> bool:
    """Whether this build keeps int4 rows of `bits`-bit codes in groups of `group` columns in panels of 8 blocks
    (AVX2 without AVX-512 VNNI: 4-bit codes in groups of 32, 64 or 128; see the C source's q4_pos): the
    decode loop then sums each block in one lane, as the K-quant loop does."""
    lib = library()
    return lib is not None and bool(lib.zen_q4_panels(group, bits == 5))


@lru_cache(maxsize=None)
def _panel_index(k: int, words: int = 4) -> torch.Tensor:
    """index[i]: where byte i of a row in block order (4 * words bytes a block: int4 4, int8 8) sits in a row in
    panels (the C source's panel_pos)."""
    nb, size = k // BLOCK, 4 * words
    b, j = torch.arange(nb).repeat_interleave(size), torch.arange(size).repeat(nb)
    lanes = (nb - b // 8 * 8).clamp(max=8)  # blocks in b's panel
    return b // 8 * 8 * size + ((j // 4) * lanes + b % 8) * 4 + j % 4


def int8_paneled() -> bool:
    """Whether this build's int8 kernels (`matmul_int8`, `matmul_int8_blocks`) read codes in panels of 8 blocks
    (AVX2 without AVX-512 VNNI), as `pack_int8` puts them."""
    lib = library()
    return lib is not None and bool(lib.zen_q8_panels())


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes in column order -> the order this build's int8 kernels read (the same tensor where that
    is column order)."""
    if not int8_paneled():
        return codes
    codes = codes.to("cpu", torch.int8).contiguous()
    out = native.huge_pages(torch.empty_like(codes))
    library().zen_q8_pack(codes.shape[0], codes.shape[1], codes.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def unpack_int8(codes: torch.Tensor) -> torch.Tensor:
    """Rows (..., K) of `pack_int8`'s codes back in column order."""
    return codes[..., _panel_index(codes.shape[-1], 8)] if int8_paneled() else codes


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
         bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) codes (their low four bits: 5-bit codes keep the fifth in `pack_high`), (N, K / group) scale and
    zero (w = code * scale + zero) -> the kernel's codes (N, K / 2) uint8 and scale_zero (N, 2, K / group
    rounded up to a multiple of 8) float16, the padding zeros. zero None: every zero is -8 (5-bit codes: -16)
    times its scale (GGUF's Q4_0 / Q5_0): scale_zero (N, 1, ...), the scales only (`group_arg`). The codes'
    bytes are in the order this build's loops read (`paneled(group, bits)`)."""
    n, k = codes.shape
    in_panels = paneled(k // scale.shape[1], bits)
    lib = library() if in_panels else _packer(codes)  # panels: always in C
    if lib is not None:
        codes = codes.to("cpu", torch.uint8).contiguous()
        packed = native.huge_pages(torch.empty(n, k // 2, dtype=torch.uint8))  # one C pass: a 4B model, ~3B codes
        lib.zen_q4_pack(n, k, codes.data_ptr(), packed.data_ptr(), in_panels, torch.get_num_threads())
    else:
        blocks = codes.view(n, k // BLOCK, 2, BLOCK // 2)
        packed = ((blocks[:, :, 0] & 15) | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    pad = -scale.shape[1] % 8  # whole eights of groups: the kernel's vector loads need no tail case
    planes = [scale] if zero is None else [scale, zero]
    return packed, torch.nn.functional.pad(torch.stack(planes, 1).to(torch.float16), (0, pad)).contiguous()


MID_ZERO = 0x10000  # or'd into the group size for scale_zero without zeros (the C source's Q4_MID_ZERO)
GGUF_BLOCKS = {2: 18, 3: 20, 8: 34}  # ggml types Q4_0, Q4_1, Q8_0 -> bytes a block of 32: what `pack_blocks` takes


def empty_packed(ggml_type: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's buffers for an (n, k) Q4_0 / Q4_1 / Q8_0 weight, to fill (the scales' padding zeros): Q4_0 / Q4_1
    `pack`'s packed (n, k / 2) and scale_zero (n, 1 (Q4_0: the scales only) or 2, k / 32 rounded up to eights);
    Q8_0 `pack_int8`'s codes (n, k) and `pack_block_scales`' one plane (n, 1, k / 32 rounded up to eights)."""
    groups = (k // BLOCK + 7) // 8 * 8
    if ggml_type == 8:
        return native.huge_pages(torch.empty(n, k, dtype=torch.int8)), torch.zeros(n, 1, groups, dtype=torch.float16)
    return (native.huge_pages(torch.empty(n, k // 2, dtype=torch.uint8)),
            torch.zeros(n, 1 if ggml_type == 2 else 2, groups, dtype=torch.float16))


def pack_blocks(ggml_type: int, blocks: np.ndarray, n: int, k: int,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_0 / Q4_1 / Q8_0 (n, k) matrix's blocks (bytes, row after row: a file's mapping) -> the kernel's
    buffers (`empty_packed`'s), in one C pass with no (n, k) codes in between: the nibbles or codes copied to
    where this build reads them, d (Q4_1: m too) as its float16 bits. out: buffers to fill (rows of larger ones)."""
    data = np.ascontiguousarray(blocks).view(np.uint8)  # a view of a contiguous mapping, never a copy
    if data.nbytes != n * k // BLOCK * GGUF_BLOCKS[ggml_type]:
        raise ValueError(f"{data.nbytes} bytes are not the blocks of a type-{ggml_type} ({n}, {k}) matrix")
    codes, scales = out if out is not None else empty_packed(ggml_type, n, k)
    if not (codes.is_contiguous() and scales.is_contiguous()):
        raise ValueError("pack_blocks writes into contiguous buffers only")
    if ggml_type == 8:
        library().zen_q8_pack_blocks(data.ctypes.data, n, k, codes.data_ptr(), scales.data_ptr(),
                                     torch.get_num_threads())
    else:
        library().zen_q4_pack_blocks(ggml_type, data.ctypes.data, n, k, codes.data_ptr(), scales.data_ptr(),
                                     torch.get_num_threads())
    return codes, scales


def group_arg(group: int, scale_zero: torch.Tensor) -> int:
    """The group size as the C functions take it: with MID_ZERO where scale_zero holds the scales only."""
    return group | MID_ZERO if scale_zero.shape[1] == 1 else group


def unpack(packed: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """Inverse of `pack` for the codes (their low four bits): (N, K / 2) bytes -> (N, K) uint8 codes."""
    n = packed.shape[0]
    if paneled(group, bits):
        packed = packed[:, _panel_index(packed.shape[1] * 2)]
    blocks = packed.view(n, -1, BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], -1).reshape(n, -1)


_IO_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write as they are


def _linear(x: torch.Tensor, n: int, out_dtype: torch.dtype, run) -> torch.Tensor:
    """What `matmul` and `matmul_int8` share: x in a dtype the kernel reads, y (M, n) allocated,
    run(x, x_bf16, y, y_bf16) the kernel call (0 = done, -1 = no memory)."""
    m, k = x.shape
    x = (x if x.dtype in _IO_DTYPES else x.float()).contiguous()
    y = torch.empty(m, n, dtype=out_dtype if out_dtype in _IO_DTYPES else torch.float32)
    if run(x.data_ptr(), x.dtype == torch.bfloat16, y.data_ptr(), y.dtype == torch.bfloat16) != 0:
        raise MemoryError(f"quantized matmul kernel: no memory for a {m}x{k} activation")
    return y.to(out_dtype)


def matmul(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int,
           out_dtype: torch.dtype = torch.float32, high: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) x (CPU) @ W^T -> (M, N) in `out_dtype`, for `pack`'s buffers of a W in groups of `group`
    columns (and `pack_high`'s fifth bits for 5-bit codes). float32 and bfloat16 go in and out as they
    are; other dtypes through float32."""
    if torch.compiler.is_compiling():  # traced: an opaque op (calling it eagerly costs dispatcher time)
        return torch.ops.zen_eco.q4_linear(x, packed, scale_zero, group, out_dtype, high)
    return _q4_linear(x, packed, scale_zero, group, out_dtype, high)


def matmul_int8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) x (CPU) @ W^T -> (M, N) in `out_dtype` for int8 codes (N, K) (K a multiple of 32; as `pack_int8`
    orders them) and a float32 scale per row: the same int16-activation scheme as `matmul`."""
    if torch.compiler.is_compiling():
        return torch.ops.zen_eco.q8_linear(x, codes, scale, out_dtype)
    return _q8_linear(x, codes, scale, out_dtype)


def matmul_int8_blocks(x: torch.Tensor, codes: torch.Tensor, block_scale: torch.Tensor, flags: int = 0,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) x (CPU) @ W^T -> (M, N) for int8 codes (N, K) (as `pack_int8` orders them) with float16 block scales in
    `pack_block_scales`' layout and its `flags`: GGUF's Q8_0 and Q5_0 as stored (a scale per block of 32),
    Q5_1 / Q5_K (and offsets), Q6_K / Q3_K (a scale per 16 columns), Q2_K (a scale and an offset per 16)."""
    if torch.compiler.is_compiling():
        return torch.ops.zen_eco.q8b_linear(x, codes, block_scale, flags, out_dtype)
    return _q8b_linear(x, codes, block_scale, flags, out_dtype)


# pack_block_scales' flags: a scale per 16 columns; an offset per block of 32; (with OFFSETS) an offset per 16
HALVES, OFFSETS, OFFSET_HALVES = 1, 2, 4


def pack_block_scales(scale: torch.Tensor, scale_b: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                      offset_b: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(N, K / 32) block scales (of the first 16 columns of each block where `scale_b` holds the last 16's),
    optional offsets (w = code * scale + offset; of the first 16 columns where `offset_b` holds the last
    16's) -> ((N, planes, K / 32 rounded up to a multiple of 8) float16, the padding zeros; flags): the
    planes are scale, scale_b, offset, offset_b, those present."""
    if offset_b is not None and offset is None:
        raise ValueError("offset_b (the last 16 columns' offsets) needs offset")
    planes = [p for p in (scale, scale_b, offset, offset_b) if p is not None]
    flags = ((HALVES if scale_b is not None else 0) | (OFFSETS if offset is not None else 0)
             | (OFFSET_HALVES if offset_b is not None else 0))
    packed = torch.nn.functional.pad(torch.stack(planes, 1).to(torch.float16), (0, -scale.shape[1] % 8))
    return packed.contiguous(), flags


REUSE_BYTES = 256 << 20  # the largest dense weight a prompt matmul dequantizes into a reused buffer
_reused = threading.local()


def _weight_buffer(n: int, k: int, dtype: torch.dtype, reuse: bool) -> torch.Tensor:
    """Where an (n, k) weight is dequantized to: a new tensor, or (reuse) this thread's buffer, kept from
    call to call, for a weight used once and dropped (a prompt's dense matmul): a fresh 50 MB tensor
    costs more in page faults (~18 ms on 2 cores) than dequantizing into it (~16 ms). Above REUSE_BYTES
    (an output head) a new tensor anyway, so that the buffer stays the size of a layer's matrix."""
    size = n * k * dtype.itemsize
    if not reuse or size > REUSE_BYTES:
        return torch.empty(n, k, dtype=dtype)
    buf = getattr(_reused, "buf", None)
    if buf is None or buf.numel() < size:
        buf = _reused.buf = torch.empty(size, dtype=torch.uint8)
    return buf[:size].view(dtype).view(n, k)


def dequantize_int4(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, dtype: torch.dtype,
                    high: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
    """`pack`'s buffers (and `pack_high`'s for 5-bit codes) -> the dense (N, K) weight in `dtype` (float32
    or bfloat16), code * scale + zero computed in float32 and rounded once. reuse: into this thread's
    reused buffer (`_weight_buffer`): valid until the thread's next reusing call."""
    n, k = packed.shape[0], packed.shape[1] * 2
    out = _weight_buffer(n, k, dtype, reuse)
    library().zen_q4_dequant(n, k, group_arg(group, scale_zero), packed.data_ptr(),
                             None if high is None else high.data_ptr(), scale_zero.data_ptr(), out.data_ptr(),
                             dtype == torch.bfloat16, torch.get_num_threads())
    return out


def pack_high(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 31] -> their fifth bits (N, 16 per four blocks of 32 columns) uint8, in the order
    the kernel reads them (C source: high_bits16); `pack` takes the low four bits."""
    n, k = codes.shape
    nb = k // BLOCK
    lib = _packer(codes)
    if lib is not None:
        high = torch.empty(n, (nb + 3) // 4 * 16, dtype=torch.uint8)  # in C: the torch ops below took ~11 s for 4B Q5_K_M
        lib.zen_q4_pack_high(n, k, codes.data_ptr(), high.data_ptr(), torch.get_num_threads())
        return high
    bits = torch.nn.functional.pad((codes >> 4).view(n, nb, 2, BLOCK // 2), (0, 0, 0, 0, 0, -nb % 4))
    bits = bits.view(n, -1, 4, 2, BLOCK // 2).transpose(2, 3).reshape(n, -1, 8)  # per four: half, block, column
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).contiguous()


def dequantize_int8_blocks(codes: torch.Tensor, block_scale: torch.Tensor, flags: int, dtype: torch.dtype,
                           reuse: bool = False) -> torch.Tensor:
    """`pack_block_scales`' buffers with int8 codes (N, K; `pack_int8`'s) -> the dense weight in `dtype` (float32 or
    bfloat16), code * scale (+ offset) computed in float32 and rounded once. reuse: as `dequantize_int4`."""
    n, k = codes.shape
    out = _weight_buffer(n, k, dtype, reuse)
    library().zen_q8b_dequant(n, k, codes.data_ptr(), block_scale.data_ptr(), flags, out.data_ptr(),
                              dtype == torch.bfloat16, torch.get_num_threads())
    return out


def _q4_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int,
               out_dtype: torch.dtype, high: torch.Tensor | None = None, gemm: bool | None = None) -> torch.Tensor:
    (m, k), n = x.shape, packed.shape[0]
    run = _entry(m, "q4", gemm)
    return _linear(x, n, out_dtype, lambda xp, xb, yp, yb: run(
        m, n, k, group_arg(group, scale_zero), xp, xb, packed.data_ptr(), None if high is None else high.data_ptr(),
        scale_zero.data_ptr(),
        yp, yb, torch.get_num_threads()))


def _q8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
               gemm: bool | None = None) -> torch.Tensor:
    (m, k), n = x.shape, codes.shape[0]
    run = _entry(m, "q8", gemm)
    return _linear(x, n, out_dtype, lambda xp, xb, yp, yb: run(
        m, n, k, xp, xb, codes.data_ptr(), scale.data_ptr(), yp, yb, torch.get_num_threads()))


def _q8b_linear(x: torch.Tensor, codes: torch.Tensor, block_scale: torch.Tensor, flags: int,
                out_dtype: torch.dtype, gemm: bool | None = None) -> torch.Tensor:
    (m, k), n = x.shape, codes.shape[0]
    run = _entry(m, "q8b", gemm)
    return _linear(x, n, out_dtype, lambda xp, xb, yp, yb: run(
        m, n, k, xp, xb, codes.data_ptr(), block_scale.data_ptr(), flags, yp, yb, torch.get_num_threads()))


# The kernels as PyTorch operators, so torch.compile can trace a model that calls them (engine.graphs).
_q4_op = torch.library.custom_op("zen_eco::q4_linear", _q4_linear, mutates_args=())
_q8_op = torch.library.custom_op("zen_eco::q8_linear", _q8_linear, mutates_args=())
_q8b_op = torch.library.custom_op("zen_eco::q8b_linear", _q8b_linear, mutates_args=())


@_q4_op.register_fake
def _(x, packed, scale_zero, group, out_dtype, high=None):
    return x.new_empty((x.shape[0], packed.shape[0]), dtype=out_dtype)


@_q8_op.register_fake
def _(x, codes, scale, out_dtype):
    return x.new_empty((x.shape[0], codes.shape[0]), dtype=out_dtype)


@_q8b_op.register_fake
def _(x, codes, block_scale, flags, out_dtype):
    return x.new_empty((x.shape[0], codes.shape[0]), dtype=out_dtype)
