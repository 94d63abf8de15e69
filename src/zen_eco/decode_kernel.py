"""A whole batch-1 decode step on the CPU as one C call: every layer, the final norm and the head.

At batch 1 a small model's step is a few hundred tiny operations. Run one by one from Python, their
dispatch costs more than their arithmetic: on SmolLM2-135M (2 threads) the matmul kernels took 6.5 ms
of a 17.4 ms step and the rest was PyTorch and Python between them. Here the layers run in C over
buffers allocated once per call, calling `q4_kernel`'s matmuls directly (its source is compiled into
this library), so the step costs what its matmuls and attention cost.

What one call does, per layer (`engine.native_step` builds the descriptors from a `Transformer`):
RMSNorm, the fused q|k|v matmul (+ bias), QK-norm, RoPE (rotate-half, the caller's cos/sin rows for
this position), K/V written into the cache at `pos` (float32 or bfloat16, rounded to nearest even),
attention of each query head over positions [start, pos] (start = pos + 1 - window on sliding layers),
split over threads by KV head and token range and merged by log-sum-exp, the output matmul, Gemma's
post-norm, the residual add, the same for the MLP (SiLU or GELU-tanh of gate times up). Then the final
norm, the head and Gemma's logit soft-capping, into float32 logits.

Numerics: everything between matmuls is float32 (the eager bf16 path rounds each intermediate to
bf16); the matmuls are the same kernels as the eager path's (`q4_kernel`: int16 activations per block
of 32) and, for dense float32/bfloat16 weights, float32 dot products. tests/test_native_step.py holds
it to the eager forward: float32 logits to ~1e-5, bf16 ones to the eager path's own bf16 rounding.

Linear kinds: 0 dense float32, 1 dense bfloat16, 2 int4 (`Int4Linear` native), 3 int8 with a float32
scale per row (`Int8Linear` native), 4 int8 with a float16 scale per block of 32 (`Int8BlockLinear`), 5 a
K-quant as stored (`KQuantLinear`).
A `StackedLinear` (row ranges of different kinds) is a chain of descriptors (`next`), run one after
another into consecutive ranges of the output.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

from . import kquant_kernel, kv_kernel, native, q4_kernel

LIN_F32, LIN_BF16, LIN_Q4, LIN_Q8, LIN_Q8B, LIN_KQ = range(6)
MAX_HEAD_DIM = 512

C_SOURCE = q4_kernel.C_SOURCE + kquant_kernel.C_SOURCE + native.VEC16 + r"""
#include <string.h>

enum { LIN_F32 = 0, LIN_BF16 = 1, LIN_Q4 = 2, LIN_Q8 = 3, LIN_Q8B = 4, LIN_KQ = 5 };
#define MAX_HEAD_DIM 512
#ifndef KV_PREFETCH
#define KV_PREFETCH 4096  /* bytes ahead that K and V rows are prefetched: one stream per task, from DRAM */
#endif

typedef struct lin_s {
    int32_t kind, n, k, group;  /* group: int4's group size; int8 blocks' flags (zen_q8b_linear); K-quants' KQ_* */
    const void *w;        /* dense (n, k) weights, or the codes */
    const void *scale;    /* int4: scale_zero; int8: float32 per row; int8 blocks: float16 planes per block;
                             K-quants: the sub-scale planes */
    const float *bias;    /* (n,) or NULL */
    const uint8_t *high;  /* 5-bit int4 layout: the codes' fifth bits (q4_kernel.pack_high); K-quants' bit planes */
    const struct lin_s *next;  /* the matrix's next rows, of another kind (a StackedLinear's next part); or NULL */
    const uint16_t *d;    /* K-quants: float16 d (, dmin) per 256 columns; else NULL */
} lin_t;

typedef struct {
    lin_t qkv, o, gate_up, down;
    /* float32 norm scales as multiplied (Gemma's 1 + w already added); the optional ones NULL when absent */
    const float *attn_norm, *attn_post_norm, *mlp_norm, *mlp_post_norm, *q_norm, *k_norm;
    int32_t window, local_rope;  /* window 0: every earlier position */
} layer_t;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, gelu, kv_bf16;
    float eps, attn_scale, softcap;  /* softcap 0: none */
    const layer_t *layers;
    const float *final_norm;
    lin_t head;
} model_t;

static int dense_linear(const lin_t *l, const float *x, float *y, int nt) {
    const int64_t K = l->k;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = 0; n < l->n; n++) {
        float s = 0.0f;
        if (l->kind == LIN_BF16) {
            const uint16_t *w = (const uint16_t *)l->w + n * K;
            for (int64_t i = 0; i < K; i++) s += bf16_to_f32(w[i]) * x[i];
        } else {
            const float *w = (const float *)l->w + n * K;
            for (int64_t i = 0; i < K; i++) s += w[i] * x[i];
        }
        y[n] = s;
    }
    return 0;
}

static int linear(const lin_t *l, const float *x, float *y, int nt) {
    for (; l; y += l->n, l = l->next) {
        int rc;
        switch (l->kind) {
            case LIN_Q4: rc = zen_q4_linear(1, l->n, l->k, l->group, x, 0, l->w, l->high, l->scale, y, 0, nt); break;
            case LIN_Q8: rc = zen_q8_linear(1, l->n, l->k, x, 0, l->w, l->scale, y, 0, nt); break;
            case LIN_Q8B: rc = zen_q8b_linear(1, l->n, l->k, x, 0, l->w, l->scale, l->group, y, 0, nt); break;
            case LIN_KQ: rc = zen_kq_linear(l->group, 1, l->n, l->k, x, 0, l->w, l->high, l->scale, l->d, y, 0, nt); break;
            default: rc = dense_linear(l, x, y, nt);
        }
        if (rc) return rc;
        if (l->bias) for (int i = 0; i < l->n; i++) y[i] += l->bias[i];
    }
    return 0;
}

/* out = x / rms(x) * w, in float32 (out may be x) */
static void rms_norm(int n, const float *x, const float *w, float eps, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* rotate-half RoPE of one head: cs = cos row then sin row (head_dim each, halves duplicated) */
static void rope(int D, float *x, const float *cs) {
    const float *c = cs, *s = cs + D;
    for (int i = 0; i < D / 2; i++) {
        const float a = x[i], b = x[i + D / 2];
        x[i] = a * c[i] - b * s[i];
        x[i + D / 2] = b * c[i + D / 2] + a * s[i + D / 2];
    }
}

#ifdef __AVX512F__
/* 16 values of a K or V row from column d, as floats */
INLINE __m512 kv16(const void *row, int d, const int bf16) {
    if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + d))), 16));
    return _mm512_loadu_ps((const float *)row + d);
}

/* Chunk c of a bf16 row in even/odd order: chunk 2i holds the even columns of columns [32i, 32i + 32),
   chunk 2i + 1 the odd ones. Each 32-bit lane holds a pair of bf16 values, so a shift and a mask
   make floats of both without widening shuffles. Float32 rows as they are. */
INLINE __m512 kv16p(const void *row, int c, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)row + 16 * c);
    const __m512i w = _mm512_loadu_si512((const uint16_t *)row + 32 * (c >> 1));
    return _mm512_castsi512_ps((c & 1) ? _mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)) : _mm512_slli_epi32(w, 16));
}

/* exp(x) for x <= 0 (scores minus their max), 0 below -87: 2^n * 2^f, n = round(x log2 e), 2^f a
   degree-6 polynomial on [-1/2, 1/2] (relative error ~2e-7). */
INLINE __m512 exp512(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), _mm512_scalef_ps(p, n));
}
#endif

#ifdef __AVX512F__
""" + native.TRANSPOSE_SUM16 + r"""

#define KT 16  /* tokens per tile of scores: one transpose-sum gives 16 of them */
#define VT 32  /* tokens per tile of the weighted sum of V: their rows stay in L1 for every query */

/* attend_range's AVX-512 body, inlined with constant D (head_dim, a multiple of 16) so that a
   query's D / 16 accumulators live in registers. Scores: per tile of 16 tokens, each K row is read
   once for up to four queries and the 16 dot products' lanes are summed together. Weighted sum of
   V: per tile of 32 tokens, two queries at a time (one where D > 128) hold their outputs in registers. */
INLINE void attend_avx512(int n_rep, const int D, const float *q, const void *K, const void *V, int64_t a, int64_t b,
                          float scale, float *s, float *m, float *l, float *acc, const int bf16) {
    const int64_t n = b - a, row_bytes = (int64_t)D * (bf16 ? 2 : 4);
    const int nc = D / 16, RS = nc <= 8 ? 2 : 1;
    /* bf16 rows are read in even/odd order (kv16p): the queries are permuted to match once here and the
       outputs, accumulated in that order, put back at the end */
    const int perm = bf16 && D % 32 == 0;
    float qp_buf[perm ? n_rep * D : 1];
    if (perm) {
        for (int r = 0; r < n_rep; r++)
            for (int d = 0; d < D; d++) qp_buf[r * D + (d & ~31) + ((d & 1) << 4) + ((d & 31) >> 1)] = q[r * D + d];
        q = qp_buf;
    }
    for (int64_t t0 = 0; t0 < n; t0 += KT) {
        const int nt = n - t0 < KT ? (int)(n - t0) : KT;
        const __mmask16 valid = (__mmask16)((1u << nt) - 1);
        for (int r0 = 0; r0 < n_rep; r0 += 4) {
            const int nr = n_rep - r0 < 4 ? n_rep - r0 : 4;
            __m512 part[4][KT];
            for (int tt = 0; tt < KT; tt++) {
                __m512 d[4][2];
                for (int j = 0; j < 4; j++) d[j][0] = d[j][1] = _mm512_setzero_ps();
                if (tt < nt) {
                    const char *krow = (const char *)K + (a + t0 + tt) * row_bytes;
                    if (r0 == 0) for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(krow + KV_PREFETCH + o, 0, 2);
                    for (int c = 0; c < nc; c++) {
                        const __m512 k = perm ? kv16p(krow, c, 1) : kv16(krow, 16 * c, bf16);
                        for (int j = 0; j < 4; j++)
                            if (j < nr) d[j][c & 1] = _mm512_fmadd_ps(k, _mm512_loadu_ps(q + (r0 + j) * D + 16 * c), d[j][c & 1]);
                    }
                }
                for (int j = 0; j < 4; j++) part[j][tt] = _mm512_add_ps(d[j][0], d[j][1]);
            }
            for (int j = 0; j < nr; j++) {
                const __m512 sc = _mm512_mul_ps(transpose_sum16(part[j]), _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(s + (int64_t)(r0 + j) * n + t0, valid, sc);
                const float top = _mm512_mask_reduce_max_ps(valid, sc);
                if (top > m[r0 + j]) m[r0 + j] = top;
            }
        }
    }
    for (int r = 0; r < n_rep; r++) {
        __m512 sum = _mm512_setzero_ps();
        const __m512 mx = _mm512_set1_ps(m[r]);
        for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 k = n - t >= 16 ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + r * n + t), mx));
            _mm512_mask_storeu_ps(s + r * n + t, k, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
        }
        l[r] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t t0 = 0; t0 < n; t0 += VT) {
        const int64_t t1 = t0 + VT < n ? t0 + VT : n;
        for (int r0 = 0; r0 < n_rep; r0 += RS) {
            const int two = RS == 2 && r0 + 1 < n_rep;
            float *o0 = acc + (int64_t)r0 * D, *o1 = acc + (int64_t)(r0 + two) * D;
            __m512 a0[MAX_HEAD_DIM / 16], a1[MAX_HEAD_DIM / 16];
            for (int c = 0; c < nc; c++) {
                a0[c] = _mm512_loadu_ps(o0 + 16 * c);
                if (RS == 2) a1[c] = _mm512_loadu_ps(o1 + 16 * c);
            }
            for (int64_t t = t0; t < t1; t++) {
                const char *vrow = (const char *)V + (a + t) * row_bytes;
                if (r0 == 0) for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(vrow + KV_PREFETCH + o, 0, 2);
                const __m512 p0 = _mm512_set1_ps(s[(int64_t)r0 * n + t]);
                const __m512 p1 = _mm512_set1_ps(two ? s[(int64_t)(r0 + 1) * n + t] : 0.0f);
                for (int c = 0; c < nc; c++) {
                    const __m512 v = perm ? kv16p(vrow, c, 1) : kv16(vrow, 16 * c, bf16);
                    a0[c] = _mm512_fmadd_ps(p0, v, a0[c]);
                    if (RS == 2) a1[c] = _mm512_fmadd_ps(p1, v, a1[c]);
                }
            }
            for (int c = 0; c < nc; c++) {
                _mm512_storeu_ps(o0 + 16 * c, a0[c]);
                if (two) _mm512_storeu_ps(o1 + 16 * c, a1[c]);
            }
        }
    }
    if (perm) {
        float row[MAX_HEAD_DIM];
        for (int r = 0; r < n_rep; r++) {
            float *o = acc + (int64_t)r * D;
            for (int d = 0; d < D; d++) row[d] = o[(d & ~31) + ((d & 1) << 4) + ((d & 31) >> 1)];
            memcpy(o, row, sizeof(float) * D);
        }
    }
}
#endif

#ifndef __AVX512F__
typedef float f8 __attribute__((vector_size(32)));  /* one AVX2 register (wider GCC vectors go through the stack) */

/* 8 values of a K or V row from column d as floats (bf16: widened and shifted). */
INLINE f8 row8(const void *row, int d, const int bf16) {
    f8 out;
    if (!bf16) { memcpy(&out, (const float *)row + d, 32); return out; }
    typedef uint16_t u16v __attribute__((vector_size(16)));
    typedef uint32_t u32v __attribute__((vector_size(32)));
    u16v h;
    memcpy(&h, (const uint16_t *)row + d, 16);
    const u32v w = __builtin_convertvector(h, u32v) << 16;
    memcpy(&out, &w, 32);
    return out;
}

INLINE float sum8(f8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* attend_range without AVX-512 (D a multiple of 16) in 8-float GCC vectors (AVX2 registers): per token the
   K row (widened once, if bf16) dotted with every query; the scores' exponentials 16 at a time (exp16: the
   plain loop called expf per score); then per tile of 32 tokens (their V rows widened once into L1) each
   query's outputs, 16 columns at a time, held in registers while the tile goes by. */
INLINE void attend_vec(int n_rep, const int D, const float *q, const void *K, const void *V, int64_t a, int64_t b,
                       float scale, float *s, float *m, float *l, float *acc, const int bf16) {
    const int64_t n = b - a, row_bytes = (int64_t)D * (bf16 ? 2 : 4);
    const int nc = D / 8;
    float kbuf[MAX_HEAD_DIM] __attribute__((aligned(32))), vbuf[32 * MAX_HEAD_DIM] __attribute__((aligned(32)));
    for (int64_t t = 0; t < n; t++) {
        const char *krow = (const char *)K + (a + t) * row_bytes;
        __builtin_prefetch(krow + KV_PREFETCH, 0, 0);
        const float *k = (const float *)krow;
        if (bf16) {
            for (int c = 0; c < nc; c++) { const f8 x = row8(krow, 8 * c, 1); memcpy(kbuf + 8 * c, &x, 32); }
            k = kbuf;
        }
        for (int r = 0; r < n_rep; r++) {
            f8 d0 = {0}, d1 = d0;
            for (int c = 0; c < nc; c += 2) {  /* nc is even */
                f8 q0, q1, k0, k1;
                memcpy(&q0, q + r * D + 8 * c, 32), memcpy(&q1, q + r * D + 8 * c + 8, 32);
                memcpy(&k0, k + 8 * c, 32), memcpy(&k1, k + 8 * c + 8, 32);
                d0 += q0 * k0, d1 += q1 * k1;
            }
            s[r * n + t] = sum8(d0 + d1) * scale;
        }
    }
    for (int r = 0; r < n_rep; r++) {
        float *sr = s + r * n, mr = -INFINITY;
        for (int64_t t = 0; t < n; t++) mr = sr[t] > mr ? sr[t] : mr;
        float sum = 0.0f;
        int64_t t = 0;
        for (; t + 16 <= n; t += 16) {
            v16 x;
            memcpy(&x, sr + t, 64);
            x = exp16(x - mr);
            memcpy(sr + t, &x, 64);
            for (int i = 0; i < 16; i++) sum += x[i];
        }
        for (; t < n; t++) sr[t] = exp16(splat(sr[t] - mr))[0], sum += sr[t];
        m[r] = mr, l[r] = sum;
    }
    for (int64_t t0 = 0; t0 < n; t0 += 32) {
        const int64_t t1 = n - t0 < 32 ? n : t0 + 32;
        const float *vt = (const float *)((const char *)V + (a + t0) * row_bytes);  /* the tile's rows as floats */
        if (bf16) {
            for (int64_t t = t0; t < t1; t++)
                for (int c = 0; c < nc; c++) {
                    const f8 x = row8((const char *)V + (a + t) * row_bytes, 8 * c, 1);
                    memcpy(vbuf + (t - t0) * D + 8 * c, &x, 32);
                }
            vt = vbuf;
        }
        for (int r = 0; r < n_rep; r++)
            for (int c = 0; c < nc; c += 2) {
                f8 o0, o1;
                memcpy(&o0, acc + r * D + 8 * c, 32), memcpy(&o1, acc + r * D + 8 * c + 8, 32);
                for (int64_t t = t0; t < t1; t++) {
                    const float p = s[r * n + t], *row = vt + (t - t0) * D + 8 * c;
                    f8 x0, x1;
                    memcpy(&x0, row, 32), memcpy(&x1, row + 8, 32);
                    o0 += p * x0, o1 += p * x1;
                }
                memcpy(acc + r * D + 8 * c, &o0, 32), memcpy(acc + r * D + 8 * c + 8, &o1, 32);
            }
    }
}
#endif

/* Queries q (n_rep, D) of one KV head over cached tokens [a, b): the unnormalised softmax state
   m (n_rep), l (n_rep), acc (n_rep, D). s: scratch of n_rep * (b - a) floats. Each K and V row is read
   from memory once for all n_rep queries (rows far apart in a long cache come from DRAM). */
INLINE void attend_range(int n_rep, int D, const float *q, const void *K, const void *V, int64_t a, int64_t b,
                         float scale, float *s, float *m, float *l, float *acc, const int bf16) {
    const int64_t n = b - a, esz = bf16 ? 2 : 4;
    for (int r = 0; r < n_rep; r++) m[r] = -INFINITY, l[r] = 0.0f;
    memset(acc, 0, sizeof(float) * n_rep * D);
#ifdef __AVX512F__
    if (D % 16 == 0) {  /* constant head sizes get their own unrolled copies */
        if (D == 64) attend_avx512(n_rep, 64, q, K, V, a, b, scale, s, m, l, acc, bf16);
        else if (D == 128) attend_avx512(n_rep, 128, q, K, V, a, b, scale, s, m, l, acc, bf16);
        else if (D == 256) attend_avx512(n_rep, 256, q, K, V, a, b, scale, s, m, l, acc, bf16);
        else attend_avx512(n_rep, D, q, K, V, a, b, scale, s, m, l, acc, bf16);
        return;
    }
#else
    if (D % 16 == 0) {
        if (D == 64) attend_vec(n_rep, 64, q, K, V, a, b, scale, s, m, l, acc, bf16);
        else if (D == 128) attend_vec(n_rep, 128, q, K, V, a, b, scale, s, m, l, acc, bf16);
        else attend_vec(n_rep, D, q, K, V, a, b, scale, s, m, l, acc, bf16);
        return;
    }
#endif
    for (int64_t t = 0; t < n; t++) {
        const char *krow = (const char *)K + (a + t) * D * esz;
        for (int r = 0; r < n_rep; r++) {
            float v = 0.0f;
            for (int d = 0; d < D; d++)
                v += (bf16 ? bf16_to_f32(((const uint16_t *)krow)[d]) : ((const float *)krow)[d]) * q[r * D + d];
            s[r * n + t] = v * scale;
            m[r] = v * scale > m[r] ? v * scale : m[r];
        }
    }
    for (int r = 0; r < n_rep; r++)
        for (int64_t t = 0; t < n; t++) { const float p = expf(s[r * n + t] - m[r]); s[r * n + t] = p; l[r] += p; }
    for (int64_t t = 0; t < n; t++) {
        const char *vrow = (const char *)V + (a + t) * D * esz;
        for (int r = 0; r < n_rep; r++)
            for (int d = 0; d < D; d++)
                acc[r * D + d] += s[r * n + t] * (bf16 ? bf16_to_f32(((const uint16_t *)vrow)[d]) : ((const float *)vrow)[d]);
    }
}

/* Attention of all query heads q (n_heads, D) over tokens [start, end) of one layer's cache
   K, V (n_kv, cap, D): out (n_heads, D). Tasks = KV heads x token ranges, merged by log-sum-exp. */
static int attention(const model_t *m, const float *q, const void *K, const void *V, int64_t cap, int64_t start,
                     int64_t end, float *out, int nt) {
    const int D = m->head_dim, n_kv = m->n_kv, n_rep = m->n_heads / m->n_kv;
    const int64_t len = end - start;
    int splits = (2 * nt + n_kv - 1) / n_kv;
    const int64_t most = (len + 255) / 256;  /* at least 256 tokens a task */
    if (splits > most) splits = (int)most;
    if (splits < 1) splits = 1;
    const int tasks = n_kv * splits, per = n_rep * (D + 2);
    const int64_t span = (len + splits - 1) / splits;
    float *state = malloc(sizeof(float) * (size_t)tasks * per);
    float *scores = malloc(sizeof(float) * (size_t)tasks * n_rep * (span > 0 ? span : 1));
    if (!state || !scores) { free(state); free(scores); return -1; }
    const int64_t esz = m->kv_bf16 ? 2 : 4, head_stride = cap * D * esz;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int task = 0; task < tasks; task++) {
        const int g = task / splits, part = task % splits;
        const int64_t a = start + part * span, b = a + span < end ? a + span : end;
        float *sm = state + (size_t)task * per, *sl = sm + n_rep, *sa = sl + n_rep;
        if (a >= b) { for (int r = 0; r < n_rep; r++) { sm[r] = -INFINITY; sl[r] = 0.0f; } continue; }
        const char *Kg = (const char *)K + g * head_stride, *Vg = (const char *)V + g * head_stride;
        float *s = scores + (size_t)task * n_rep * span;
        if (m->kv_bf16) attend_range(n_rep, D, q + (size_t)g * n_rep * D, Kg, Vg, a, b, m->attn_scale, s, sm, sl, sa, 1);
        else attend_range(n_rep, D, q + (size_t)g * n_rep * D, Kg, Vg, a, b, m->attn_scale, s, sm, sl, sa, 0);
    }
    for (int g = 0; g < n_kv; g++) {
        for (int r = 0; r < n_rep; r++) {
            float mx = -INFINITY, total = 0.0f;
            for (int p = 0; p < splits; p++) { const float v = state[(size_t)(g * splits + p) * per + r]; mx = v > mx ? v : mx; }
            float *o = out + ((size_t)g * n_rep + r) * D;
            memset(o, 0, sizeof(float) * D);
            for (int p = 0; p < splits; p++) {
                const float *st = state + (size_t)(g * splits + p) * per;
                if (st[n_rep + r] == 0.0f) continue;
                const float w = expf(st[r] - mx);
                total += st[n_rep + r] * w;
                const float *acc = st + 2 * n_rep + (size_t)r * D;
                for (int d = 0; d < D; d++) o[d] += acc[d] * w;
            }
            for (int d = 0; d < D; d++) o[d] /= total;
        }
    }
    free(state);
    free(scores);
    return 0;
}

INLINE float gelu_tanh(float x) { return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); }

/* act = f(gate) * up for the MLP's n columns: SiLU, g * sigmoid(g), or GELU-tanh, which is
   g * sigmoid(2u) with u = sqrt(2 / pi) (g + 0.044715 g^3) (0.5 (1 + tanh u) = sigmoid(2u)). Vectorized, the
   sigmoid from exp512 of -|z| (so no overflow): 1 / (1 + e) for z >= 0, e / (1 + e) below; libm's tanhf and
   expf one value at a time took ~5% of a Gemma-3-270M step. */
static void glu(int n, int gelu, const float *gate, const float *up, float *act) {
    int j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= n; j += 16) {
        const __m512 g = _mm512_loadu_ps(gate + j);
        const __m512 z = gelu ? _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f),
                                              _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(g, g), g), _mm512_set1_ps(0.044715f), g))
                              : g;
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        const __m512 sig = _mm512_mask_mul_ps(inv, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), inv, e);
        _mm512_storeu_ps(act + j, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + j)));
    }
#endif
    for (; j < n; j++) act[j] = (gelu ? gelu_tanh(gate[j]) : gate[j] / (1.0f + expf(-gate[j]))) * up[j];
}

/* The final norm, the head and Gemma's soft-cap: logits (vocab) of the residual stream x. */
int zen_decode_head(const model_t *m, const float *x, float *logits, int nt) {
    float *h = malloc(sizeof(float) * m->hidden);
    if (!h) return -1;
    rms_norm(m->hidden, x, m->final_norm, m->eps, h);
    const int rc = linear(&m->head, h, logits, nt);
    if (rc == 0 && m->softcap > 0.0f)
        for (int j = 0; j < m->head.n; j++) logits[j] = tanhf(logits[j] / m->softcap) * m->softcap;
    free(h);
    return rc;
}

/* Layer i up to attention: q (n_heads, D), k, v (n_kv, D) of x, normed and rotated (cs: cos then sin
   rows for the position). h: scratch of `hidden` floats; qkv receives q | k | v. */
static int attn_inputs(const model_t *m, int i, const float *x, const float *cs, float *h, float *qkv, int nt) {
    const layer_t *L = m->layers + i;
    const int D = m->head_dim;
    rms_norm(m->hidden, x, L->attn_norm, m->eps, h);
    const int rc = linear(&L->qkv, h, qkv, nt);
    if (rc) return rc;
    for (int j = 0; j < m->n_heads + m->n_kv; j++) {  /* q heads, then k heads */
        const float *w = j < m->n_heads ? L->q_norm : L->k_norm;
        if (w) rms_norm(D, qkv + j * D, w, m->eps, qkv + j * D);
        rope(D, qkv + j * D, cs);
    }
    return 0;
}

/* Layer i from the attention output att (n_heads * D) on: x += post(o(att)); x += post(mlp(x)).
   h: scratch of hidden + 3 * inter floats. */
static int attn_outputs(const model_t *m, int i, float *x, const float *att, float *h, int nt) {
    const layer_t *L = m->layers + i;
    const int H = m->hidden;
    float *o = h, *gu = h + H, *act = gu + 2 * m->inter;
    int rc;
    if ((rc = linear(&L->o, att, o, nt))) return rc;
    if (L->attn_post_norm) rms_norm(H, o, L->attn_post_norm, m->eps, o);
    for (int j = 0; j < H; j++) x[j] += o[j];
    rms_norm(H, x, L->mlp_norm, m->eps, o);
    if ((rc = linear(&L->gate_up, o, gu, nt))) return rc;
    glu(m->inter, m->gelu, gu, gu + m->inter, act);
    if ((rc = linear(&L->down, act, o, nt))) return rc;
    if (L->mlp_post_norm) rms_norm(H, o, L->mlp_post_norm, m->eps, o);
    for (int j = 0; j < H; j++) x[j] += o[j];
    return 0;
}

static int check(const model_t *m) {
    return m->head_dim > MAX_HEAD_DIM || m->head_dim % 2 || m->n_heads % m->n_kv ? -2 : 0;
}

static size_t scratch_floats(const model_t *m) {
    const int qd = m->n_heads * m->head_dim, kvd = m->n_kv * m->head_dim;
    return (size_t)m->hidden + 3 * (size_t)m->inter + (qd + 2 * kvd) + qd;
}

/* ---- The step over a quantized KV cache (kv_quant.QuantizedKVCache), for steps that quantize nothing
   in bulk: the new token's K/V go into the unquantized window (the KIVI formats) or are quantized as
   one int8 row (int8), and attention is kv_kernel's over the cache's segments, called through a pointer
   (that library is built apart) in the order and with the arguments QuantizedKVCache.attend uses, so
   the result is the same. The caller takes the two-call path for steps that move a key group out of
   the window. */
""" + kv_kernel.SIDE_T + r"""
typedef int (*kv_attend_fn)(int, int, int, int64_t, int64_t, const float *, const side_t *, const side_t *,
                            float *, float *, float *, int);
typedef struct {
    const side_t *pages;      /* K then V for each page */
    side_t sink[2], window[2];  /* plain rows (K, V); codes NULL where the cache has none */
} kvq_layer_t;
typedef struct {
    kv_attend_fn attend;
    const kvq_layer_t *layers;
    int64_t sink, qlen, page_tokens;  /* positions [0, sink) sink rows, [sink, qlen) codes, [qlen, ...) window */
    int32_t n_pages;
} kvq_t;

/* Row r of a plain side (float32 / bfloat16 rows) or of an int8 side for head h, as bytes. */
INLINE char *side_row(const side_t *s, int64_t h, int64_t r, int D) {
    return (char *)s->codes + h * s->codes_head_stride + r * (int64_t)D * (s->bits / 8);
}

/* x (D floats) into row r of a plain side, rounded as PyTorch rounds to its dtype; or into an int8 side:
   scale = float16(max |x| / 127), code = round(x / scale) (ties to even) in [-127, 127]: Codec.quantize. */
static void kvq_write(const side_t *s, int64_t h, int64_t r, int D, const float *x) {
    char *row = side_row(s, h, r, D);
    if (s->bits == 32) { memcpy(row, x, sizeof(float) * D); return; }
    if (s->bits == 16) { for (int d = 0; d < D; d++) ((uint16_t *)row)[d] = f32_to_bf16(x[d]); return; }
    float amax = 0.0f;
    for (int d = 0; d < D; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    const _Float16 scale = (_Float16)(amax / 127.0f);
    const float sc = (float)scale > 0.0f ? (float)scale : 1.0f;
    for (int d = 0; d < D; d++) {
        const float c = rintf(x[d] / sc);
        ((int8_t *)row)[d] = (int8_t)(c > 127.0f ? 127.0f : c < -127.0f ? -127.0f : c);
    }
    ((_Float16 *)s->scale)[h * s->scale_head_stride + r] = scale;
}

/* Layer i: store k, v (n_kv heads) for position pos, attend q (n_heads) over [lo, pos] into att. */
static int kvq_attention(const model_t *m, int i, const kvq_t *kv, const float *q, const float *k, const float *v,
                         int64_t pos, float *qf, float *ml, float *att, int nt) {
    const kvq_layer_t *L = kv->layers + i;
    const int D = m->head_dim, n_kv = m->n_kv, n_rep = m->n_heads / m->n_kv, P = (int)kv->page_tokens;
    const int64_t end = pos + 1, window = m->layers[i].window;
    if (!L->window[0].codes && pos / P >= kv->n_pages) return -2;
    for (int h = 0; h < n_kv; h++) {
        if (pos < kv->sink) {  /* the first positions are also kept as they are (QuantizedKVCache.write) */
            kvq_write(&L->sink[0], h, pos, D, k + h * D);
            kvq_write(&L->sink[1], h, pos, D, v + h * D);
        }
        if (L->window[0].codes) {
            kvq_write(&L->window[0], h, pos - kv->qlen, D, k + h * D);
            kvq_write(&L->window[1], h, pos - kv->qlen, D, v + h * D);
        } else {
            const side_t *page = L->pages + 2 * (pos / P);
            kvq_write(&page[0], h, pos % P, D, k + h * D);
            kvq_write(&page[1], h, pos % P, D, v + h * D);
        }
    }
    const int64_t q1 = L->window[0].codes ? kv->qlen : end, lo = window > 0 && end > window ? end - window : 0;
    const int64_t S = kv->sink < end ? kv->sink : end;
    float *mm = ml, *ll = ml + m->n_heads;
    for (int j = 0; j < m->n_heads * D; j++) qf[j] = q[j] * m->attn_scale, att[j] = 0.0f;
    for (int j = 0; j < m->n_heads; j++) mm[j] = -INFINITY, ll[j] = 0.0f;
    int rc = 0;
    if (lo < S) rc = kv->attend(n_kv, n_rep, D, lo, S, qf, &L->sink[0], &L->sink[1], mm, ll, att, nt);
    for (int64_t a = lo > S ? lo : S; a < q1 && rc == 0;) {  /* page by page, page-relative */
        const int64_t p = a / P, off = a % P, n = q1 - a < P - off ? q1 - a : P - off;
        if (p >= kv->n_pages) return -2;
        rc = kv->attend(n_kv, n_rep, D, off, off + n, qf, &L->pages[2 * p], &L->pages[2 * p + 1], mm, ll, att, nt);
        a += n;
    }
    int64_t w0 = lo > q1 ? lo : q1;
    w0 = w0 > S ? w0 : S;
    if (rc == 0 && L->window[0].codes && end > w0)
        rc = kv->attend(n_kv, n_rep, D, w0 - q1, end - q1, qf, &L->window[0], &L->window[1], mm, ll, att, nt);
    for (int j = 0; j < m->n_heads && rc == 0; j++)
        for (int d = 0; d < D; d++) att[j * D + d] /= ll[j];
    return rc;
}

/* One decode step. x (hidden) float32: the token's embedding in, the final residual stream out.
   pos: the new token's position (= tokens cached before it). rope_global / rope_local: cos then sin
   (head_dim each) for pos. kv: per layer its K then V tensor (n_kv, cap, head_dim). logits (vocab).
   Returns 0, -1 when memory runs out, -2 for a shape it does not take. A quantized cache: kvq instead
   of kv and cap (zen_decode_step_kvq). */
static int decode_step(const model_t *m, float *x, int64_t pos, const float *rope_global, const float *rope_local,
                       void *const *kv, int64_t cap, const kvq_t *kvq, float *logits, int nt) {
    const int D = m->head_dim, qd = m->n_heads * D, kvd = m->n_kv * D;
    float *buf = malloc(sizeof(float) * (scratch_floats(m) + (kvq ? qd + 2 * m->n_heads : 0)));
    if (!buf) return -1;
    float *h = buf, *qkv = h + m->hidden + 3 * m->inter, *att = qkv + qd + 2 * kvd, *qf = att + qd, *ml = qf + qd;
    int rc = 0;
    const int64_t esz = m->kv_bf16 ? 2 : 4;
    for (int i = 0; i < m->n_layers && rc == 0; i++) {
        const layer_t *L = m->layers + i;
        if ((rc = attn_inputs(m, i, x, L->local_rope ? rope_local : rope_global, h, qkv, nt))) break;
        const float *k = qkv + qd, *v = k + kvd;
        if (kvq) {
            rc = kvq_attention(m, i, kvq, qkv, k, v, pos, qf, ml, att, nt);
        } else {
            for (int j = 0; j < m->n_kv; j++) {
                char *kd = (char *)kv[2 * i] + ((int64_t)j * cap + pos) * D * esz;
                char *vd = (char *)kv[2 * i + 1] + ((int64_t)j * cap + pos) * D * esz;
                for (int d = 0; d < D; d++) {
                    if (m->kv_bf16) { ((uint16_t *)kd)[d] = f32_to_bf16(k[j * D + d]); ((uint16_t *)vd)[d] = f32_to_bf16(v[j * D + d]); }
                    else { ((float *)kd)[d] = k[j * D + d]; ((float *)vd)[d] = v[j * D + d]; }
                }
            }
            const int64_t start = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
            rc = attention(m, qkv, kv[2 * i], kv[2 * i + 1], cap, start, pos + 1, att, nt);
        }
        if (rc == 0) rc = attn_outputs(m, i, x, att, h, nt);
    }
    if (rc == 0) rc = zen_decode_head(m, x, logits, nt);
    free(buf);
    return rc;
}

int zen_decode_step(const model_t *m, float *x, int64_t pos, const float *rope_global, const float *rope_local,
                    void *const *kv, int64_t cap, float *logits, int nt) {
    if (check(m) || pos >= cap) return -2;
    return decode_step(m, x, pos, rope_global, rope_local, kv, cap, 0, logits, nt);
}

int zen_decode_step_kvq(const model_t *m, float *x, int64_t pos, const float *rope_global, const float *rope_local,
                        const kvq_t *kv, float *logits, int nt) {
    if (check(m) || m->n_heads / m->n_kv > 16) return -2;
    return decode_step(m, x, pos, rope_global, rope_local, 0, 0, kv, logits, nt);
}

/* The same step in pieces, for a KV cache whose attention runs elsewhere (kv_quant's): layer i's
   q | k | v (n_heads + 2 * n_kv rows of head_dim) into qkv, then from the attention output att on. */
int zen_decode_attn_inputs(const model_t *m, int i, const float *x, const float *rope, float *qkv, int nt) {
    if (check(m) || i < 0 || i >= m->n_layers) return -2;
    float *h = malloc(sizeof(float) * m->hidden);
    if (!h) return -1;
    const int rc = attn_inputs(m, i, x, rope, h, qkv, nt);
    free(h);
    return rc;
}

int zen_decode_attn_outputs(const model_t *m, int i, float *x, const float *att, int nt) {
    if (check(m) || i < 0 || i >= m->n_layers) return -2;
    float *h = malloc(sizeof(float) * (m->hidden + 3 * (size_t)m->inter));
    if (!h) return -1;
    const int rc = attn_outputs(m, i, x, att, h, nt);
    free(h);
    return rc;
}
"""


class Linear(ctypes.Structure):
    pass


Linear._fields_ = [("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("group", ctypes.c_int32),
                   ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                   ("high", ctypes.c_void_p), ("next", ctypes.POINTER(Linear)), ("d", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("qkv", Linear), ("o", Linear), ("gate_up", Linear), ("down", Linear),
                ("attn_norm", ctypes.c_void_p), ("attn_post_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("mlp_post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("window", ctypes.c_int32), ("local_rope", ctypes.c_int32)]


class KVQLayer(ctypes.Structure):
    """One layer of a quantized cache as the step reads it: kv_kernel sides of each page (K, V), of the
    unquantized sink rows and of the window rows (codes NULL where absent)."""
    _fields_ = [("pages", ctypes.POINTER(kv_kernel.Side)), ("sink", kv_kernel.Side * 2), ("window", kv_kernel.Side * 2)]


class KVQ(ctypes.Structure):
    """A quantized cache (kv_quant.QuantizedKVCache) for zen_decode_step_kvq; `attend` is kv_kernel's
    zen_kv_attend."""
    _fields_ = [("attend", ctypes.c_void_p), ("layers", ctypes.POINTER(KVQLayer)), ("sink", ctypes.c_int64),
                ("qlen", ctypes.c_int64), ("page_tokens", ctypes.c_int64), ("n_pages", ctypes.c_int32)]


class Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("gelu", ctypes.c_int32), ("kv_bf16", ctypes.c_int32), ("eps", ctypes.c_float),
                ("attn_scale", ctypes.c_float), ("softcap", ctypes.c_float), ("layers", ctypes.POINTER(Layer)),
                ("final_norm", ctypes.c_void_p), ("head", Linear)]


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled step, or None where it cannot be built or ZEN_ECO_NATIVE_STEP=0 (then decode runs
    the model's forward)."""
    if os.environ.get("ZEN_ECO_NATIVE_STEP", "1") == "0" or os.environ.get("ZEN_ECO_NATIVE_Q4", "1") == "0":
        return None
    lib = native.build("decode_step", C_SOURCE)
    if lib is None:
        return None
    p = ctypes.c_void_p
    lib.zen_decode_step.restype = ctypes.c_int
    m, i = ctypes.POINTER(Model), ctypes.c_int
    lib.zen_decode_step.argtypes = [m, p, ctypes.c_int64, p, p, p, ctypes.c_int64, p, i]
    for fn, args in ((lib.zen_decode_attn_inputs, [m, i, p, p, p, i]), (lib.zen_decode_attn_outputs, [m, i, p, p, i]),
                     (lib.zen_decode_head, [m, p, p, i]),
                     (lib.zen_decode_step_kvq, [m, p, ctypes.c_int64, p, p, ctypes.POINTER(KVQ), p, i])):
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib
