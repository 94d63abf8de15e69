"""GGUF's Q6_K weights as stored, 6.56 bits a weight, on the CPU: y = x W^T and W itself.

Q6_K stores per 256 columns a float16 `d`, per 16 columns a signed 8-bit sub-scale `sc`, and 6-bit codes
q: w = d * sc * (q - 32). Widened to int8 with a float16 scale per 16 (`Int8BlockLinear`), it took
9 bits a weight: a Q4_K_M file's Q6_K tensors (the tied table, half of v and down) were a third of
zen-eco-4b's bytes read per token. Kept as they are, the product d * sc is exact in float32 (the int8
layout rounded it to float16).

Layout (`pack`), per row of W: the low four bits of the codes as `q4_kernel.pack` lays out int4 codes
(16 bytes a block of 32: byte j = column j | column 16 + j); two bit planes, the codes' bits 4 and 5,
each as `q4_kernel.pack_high` lays out a fifth bit (a 64-bit mask per 64 bytes of codes, in their byte
order); the sub-scales as two int8 planes, the first and the last 16 columns of each block of 32; d,
float16 per 256 columns.

The kernel (AVX-512 VNNI only: `available()`) is the int4 decode loop's: x rounded to 15-bit integers per
block of 32 and split into two byte planes, four `vpdpbusd` per 64 bytes of codes and row of x (the low
nibbles are each block's first 16 columns and the high nibbles its last 16, so every sum has one
sub-scale), the bits 4-5 added by masked byte adds, -32 * scale times the float sum of x over each 16
columns. Tiles of 4 rows of W x 1 row of x for decode, 1 x 4 for a few rows; from GEMM_MIN_ROWS rows the
prompt GEMM (`prompt_gemm`, its Q6_K panels: codes 0..63, d * sc and -32 d * sc per 16 columns);
`dequantize` for a dense GEMM (long prompts) and for rows of a tied embedding table.
"""

from __future__ import annotations

import torch

from . import q4_kernel

SUPER = 256  # columns per d (Q6_K's block)
SUB = 16  # columns per sub-scale

C_SOURCE = r"""
/* ---- Q6_K as stored (q6_kernel.py) ---- */
#ifdef ZEN_VNNI
INLINE int q6_nbp(int K) { return (K / 32 + 15) & ~15; }  /* sub-scale plane length: blocks, padded to 16 */

/* Rows of x for the 6-bit loop: quantize_planes' planes, scales and half-block float sums, per row. */
typedef struct { const int8_t *xp; const float *xd, *xa, *xb; } q6x_t;

/* out[j * RX + r] = x_r . w_j for RW rows of W (rows_w <= RW real, the others repeat row 0 and are
   dropped) and RX rows of x. Constant RW, RX (always inlined): accumulators in registers. */
INLINE void q6k_tile(const int RW, const int RX, int K, int rows_w, const uint8_t *codes, const uint8_t *high,
                     const int8_t *sc, const uint16_t *d, const q6x_t *x, float *out) {
    const int nb = K / 32, hs = high_stride(K), nbp = q6_nbp(K), nsb = K / 256;
    const int64_t ahead = group_ahead(K / 2), rows_ahead = ahead / (K / 2);
    const __m512i low = _mm512_set1_epi8(15), b4 = _mm512_set1_epi8(16), b5 = _mm512_set1_epi8(32);
    const uint8_t *row[4], *hrow[4];
    const int8_t *srow[4];
    const uint16_t *drow[4];
    for (int j = 0; j < RW; j++) {
        const int64_t i = j < rows_w ? j : 0;
        row[j] = codes + i * (K / 2), hrow[j] = high + i * 2 * hs, srow[j] = sc + i * 2 * nbp, drow[j] = d + i * nsb;
    }
    __m512 acc[4][4];
    for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) acc[j][r] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int n16 = nb - b0 < 16 ? nb - b0 : 16;  /* a multiple of 8: K is one of 256 */
        __m512 ca[4][4], cb[4][4];  /* per block: the scale of its first / last 16 columns times x's scale */
        for (int j = 0; j < RW; j++) {
            prefetch_side(srow[j] + b0, rows_ahead, 2 * nbp);
            prefetch_side(srow[j] + nbp + b0, rows_ahead, 2 * nbp);
            prefetch_side(hrow[j] + b0 * 4, rows_ahead, 2 * hs);
            prefetch_side(hrow[j] + hs + b0 * 4, rows_ahead, 2 * hs);
            prefetch_side(drow[j] + b0 / 8, rows_ahead, 2 * nsb);
            const __m512 dv = per_block16(drow[j], b0, n16, 256);
            const __m512 sa = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(srow[j] + b0)))));
            const __m512 sb = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(srow[j] + nbp + b0)))));
            const __m512 za = _mm512_mul_ps(sa, _mm512_set1_ps(-32.0f)), zb = _mm512_mul_ps(sb, _mm512_set1_ps(-32.0f));
            for (int r = 0; r < RX; r++) {
                const __m512 xdv = _mm512_loadu_ps(x[r].xd + b0);
                ca[j][r] = _mm512_mul_ps(sa, xdv), cb[j][r] = _mm512_mul_ps(sb, xdv);
                acc[j][r] = _mm512_fmadd_ps(za, _mm512_loadu_ps(x[r].xa + b0), acc[j][r]);
                acc[j][r] = _mm512_fmadd_ps(zb, _mm512_loadu_ps(x[r].xb + b0), acc[j][r]);
            }
        }
        for (int p = 0; p < n16; p += 4) {  /* four blocks: 64 bytes of low nibbles, 2 x 16 bytes of bit planes */
            const int b = b0 + p;
            for (int j = 0; j < RW; j++) {
                const uint8_t *c = row[j] + b * 16;
                __builtin_prefetch(c + ahead, 0, 2);
                const __m512i w = _mm512_loadu_si512(c);
                __m512i c0 = _mm512_and_si512(w, low), c1 = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
                uint64_t h4[2], h5[2];
                __builtin_memcpy(h4, hrow[j] + (b / 4) * 16, 16);
                __builtin_memcpy(h5, hrow[j] + hs + (b / 4) * 16, 16);
                c0 = _mm512_mask_add_epi8(c0, (__mmask64)h4[0], c0, b4);
                c1 = _mm512_mask_add_epi8(c1, (__mmask64)h4[1], c1, b4);
                c0 = _mm512_mask_add_epi8(c0, (__mmask64)h5[0], c0, b5);
                c1 = _mm512_mask_add_epi8(c1, (__mmask64)h5[1], c1, b5);
                for (int r = 0; r < RX; r++) {
                    const int8_t *x4 = x[r].xp + (int64_t)(b / 4) * 256;
                    const __m512i l0 = _mm512_loadu_si512(x4), h0 = _mm512_loadu_si512(x4 + 64);
                    const __m512i l1 = _mm512_loadu_si512(x4 + 128), h1 = _mm512_loadu_si512(x4 + 192);
                    /* c0: each block's first 16 columns; c1: its last 16 */
                    const __m512i d0 = _mm512_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, l0),
                                                        _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, h0), 7));
                    const __m512i d1 = _mm512_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c1, l1),
                                                        _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c1, h1), 7));
                    acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), quad_scale(ca[j][r], p), acc[j][r]);
                    acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), quad_scale(cb[j][r], p), acc[j][r]);
                }
            }
        }
    }
    for (int j = 0; j < rows_w; j++) for (int r = 0; r < RX; r++) out[j * RX + r] = hsum16(acc[j][r]);
}
#endif

/* 1 where the Q6_K kernel is built (AVX-512 VNNI): else zen_q6k_linear returns -2. */
int zen_q6k_available(void) {
#ifdef ZEN_VNNI
    return 1;
#else
    return 0;
#endif
}

/* y (M, N) = x (M, K) W^T for W in q6_kernel.pack's buffers; x and y float32 or bfloat16 (x_bf16, y_bf16).
   0; -1 where memory runs out; -2 where not built (no AVX-512 VNNI). */
int zen_q6k_linear(int M, int N, int K, const void *x, int x_bf16, const uint8_t *codes, const uint8_t *high,
                   const int8_t *sc, const uint16_t *d, void *y, int y_bf16, int n_threads) {
#ifdef ZEN_VNNI
    const int nbx = (K / 32 + 15) & ~15, hs = high_stride(K), nbp = q6_nbp(K), nsb = K / 256;
    const int64_t plane = (int64_t)(K / 32 + 3) / 4 * 256;
    int8_t *xp = calloc((size_t)M * plane, 1);
    float *sums = calloc((size_t)4 * M * nbx, sizeof(float));  /* per row: xd, block sums, first-half, last-half */
    q6x_t *xs = malloc((size_t)M * sizeof(q6x_t));
    if (!xp || !sums || !xs) { free(xp); free(sums); free(xs); return -1; }
    for (int m = 0; m < M; m++) {
        float *s = sums + (int64_t)4 * m * nbx;
        quantize_planes(K, (const char *)x + (int64_t)m * K * (x_bf16 ? 2 : 4), x_bf16, xp + m * plane, s, s + nbx,
                        s + 2 * nbx);
        xs[m] = (q6x_t){xp + m * plane, s, s + 2 * nbx, s + 3 * nbx};
    }
    if (M == 1) {  /* decode: four rows of W a tile */
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int n = 0; n < N; n += 4) {
            float out[4];
            const int rows = N - n < 4 ? N - n : 4;
            q6k_tile(4, 1, K, rows, codes + (int64_t)n * (K / 2), high + (int64_t)n * 2 * hs, sc + (int64_t)n * 2 * nbp,
                     d + (int64_t)n * nsb, xs, out);
            for (int j = 0; j < rows; j++) store(y, y_bf16, n + j, out[j]);
        }
    } else {  /* a few rows of x: one row of W a tile, four rows of x at a time */
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int n = 0; n < N; n++) {
            const uint8_t *c = codes + (int64_t)n * (K / 2), *h = high + (int64_t)n * 2 * hs;
            const int8_t *s = sc + (int64_t)n * 2 * nbp;
            const uint16_t *dn = d + (int64_t)n * nsb;
            for (int m0 = 0; m0 < M; m0 += 4) {
                float out[4];
                const int R = M - m0 < 4 ? M - m0 : 4;
                switch (R) {
                    case 1: q6k_tile(1, 1, K, 1, c, h, s, dn, xs + m0, out); break;
                    case 2: q6k_tile(1, 2, K, 1, c, h, s, dn, xs + m0, out); break;
                    case 3: q6k_tile(1, 3, K, 1, c, h, s, dn, xs + m0, out); break;
                    default: q6k_tile(1, 4, K, 1, c, h, s, dn, xs + m0, out); break;
                }
                for (int r = 0; r < R; r++) store(y, y_bf16, (int64_t)(m0 + r) * N + n, out[r]);
            }
        }
    }
    free(xp);
    free(sums);
    free(xs);
    return 0;
#else
    return -2;
#endif
}

/* Rows of the dense weight, float32 or (out_bf16) bfloat16: w = (d * sc) * (q - 32) in float32 as ggml
   computes it, rounded once. rows: the R row indices to give (out is (R, K)); NULL: all N rows, in order. */
void zen_q6k_dequant(int R, int K, const uint8_t *codes, const uint8_t *high, const int8_t *sc, const uint16_t *d,
                     const int64_t *rows, void *out, int out_bf16, int n_threads) {
    const int hs = high_stride(K), nbp = (K / 32 + 15) & ~15, nsb = K / 256;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int i = 0; i < R; i++) {
        const int64_t n = rows ? rows[i] : i;
        const uint8_t *c = codes + n * (K / 2), *h = high + n * 2 * hs;
        const int8_t *s = sc + n * 2 * nbp;
        for (int b = 0; b < K / 32; b++) {
            const float dv = f16(d[n * nsb + b / 8]), sa = dv * (float)s[b], sb = dv * (float)s[nbp + b];
            const uint32_t a4 = high_bits16(h, b, 0), a5 = high_bits16(h + hs, b, 0);
            const uint32_t z4 = high_bits16(h, b, 1), z5 = high_bits16(h + hs, b, 1);
            float v[32];
            for (int j = 0; j < 16; j++) {
                v[j] = sa * (float)((int)((c[b * 16 + j] & 15) | (a4 >> j & 1) << 4 | (a5 >> j & 1) << 5) - 32);
                v[j + 16] = sb * (float)((int)((c[b * 16 + j] >> 4) | (z4 >> j & 1) << 4 | (z5 >> j & 1) << 5) - 32);
            }
            store32(out, out_bf16, (int64_t)i * K + b * 32, v);
        }
    }
}
"""


def available() -> bool:
    """Whether the Q6_K kernel is built here (AVX-512 VNNI): loaders keep Q6_K as stored only then."""
    lib = q4_kernel.library()
    return lib is not None and bool(lib.zen_q6k_available())


def pack(codes: torch.Tensor, sub_scale: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(N, K) codes in [0, 63] (uint8), (N, K / 16) sub-scales (int8), (N, K / 256) d (float16 values) ->
    the kernel's buffers: low four bits (N, K / 2) uint8, bits 4 and 5 (N, 2, high bytes) uint8, sub-scales
    (N, 2, K / 32 rounded up to 16) int8 (each block's first 16 columns', then its last 16's), d (N, K / 256)
    float16."""
    n, k = codes.shape
    if k % SUPER:
        raise ValueError(f"Q6_K rows are whole blocks of {SUPER} columns, not {k}")
    codes = codes.contiguous()
    packed, _ = q4_kernel.pack(codes, torch.zeros(n, 1), torch.zeros(n, 1))
    high = torch.stack([q4_kernel.pack_high(codes), q4_kernel.pack_high(codes >> 1)], 1).contiguous()
    halves = sub_scale.view(n, k // 32, 2).transpose(1, 2)  # (N, 2, K / 32)
    sc = torch.nn.functional.pad(halves, (0, -(k // 32) % 16)).contiguous()
    return packed, high, sc, d.to(torch.float16).contiguous()


def dequantize(packed: torch.Tensor, high: torch.Tensor, sc: torch.Tensor, d: torch.Tensor, dtype: torch.dtype,
               rows: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
    """`pack`'s buffers -> the dense weight (rows `rows`: an int64 index tensor; None: all) in `dtype` (float32 or
    bfloat16), ggml's float32 values rounded once. reuse: as `q4_kernel.dequantize_int4`."""
    k = packed.shape[1] * 2
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= packed.shape[0]):
            raise IndexError(f"row index out of range for a weight of {packed.shape[0]} rows")
    r = packed.shape[0] if rows is None else rows.numel()
    out = q4_kernel._weight_buffer(r, k, dtype, reuse and rows is None)
    q4_kernel.library().zen_q6k_dequant(r, k, packed.data_ptr(), high.data_ptr(), sc.data_ptr(), d.data_ptr(),
                                        None if rows is None else rows.data_ptr(), out.data_ptr(),
                                        dtype == torch.bfloat16, torch.get_num_threads())
    return out


def _q6k_linear(x: torch.Tensor, packed: torch.Tensor, high: torch.Tensor, sc: torch.Tensor, d: torch.Tensor,
                out_dtype: torch.dtype, gemm: bool | None = None) -> torch.Tensor:
    (m, k), n = x.shape, packed.shape[0]
    run = q4_kernel._entry(m, "q6k", gemm)  # the prompt GEMM from GEMM_MIN_ROWS rows, as the other layouts
    return q4_kernel._linear(x, n, out_dtype, lambda xp, xb, yp, yb: run(
        m, n, k, xp, xb, packed.data_ptr(), high.data_ptr(), sc.data_ptr(), d.data_ptr(), yp, yb,
        torch.get_num_threads()))


_q6k_op = torch.library.custom_op("zen_eco::q6k_linear", _q6k_linear, mutates_args=())


@_q6k_op.register_fake
def _(x, packed, high, sc, d, out_dtype, gemm=None):
    return x.new_empty((x.shape[0], packed.shape[0]), dtype=out_dtype)


def matmul(x: torch.Tensor, packed: torch.Tensor, high: torch.Tensor, sc: torch.Tensor, d: torch.Tensor,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) x (CPU) @ W^T -> (M, N) in `out_dtype` for `pack`'s buffers (where `available()`)."""
    if torch.compiler.is_compiling():
        return torch.ops.zen_eco.q6k_linear(x, packed, high, sc, d, out_dtype)
    return _q6k_linear(x, packed, high, sc, d, out_dtype)
