"""GGUF's K-quants (Q4_K, Q5_K, Q6_K) as stored, on the CPU: y = x W^T and W itself.

Per 256 columns a float16 d (Q4_K, Q5_K: also a dmin); Q6_K: per 16 columns a signed 8-bit sub-scale sc
and 6-bit codes q, w = d sc (q - 32); Q4_K / Q5_K: per 32 columns 6-bit sc and m, 4- / 5-bit codes,
w = d sc q - dmin m. Our int4 layout held Q4_K as a float16 scale and offset per 32 columns (5 bits a
weight against the file's 4.5) and Q6_K as int8 with a float16 scale per 16 (9 bits against 6.56): for
zen-eco-4b Q4_K_M 3.1 GB read per token where the file has 2.5. Kept as they are (the sub-scales in
bytes), a weight takes 4.63 / 5.63 / 6.56 bits and the products d * sc, dmin * m are ggml's float32 ones.

Layout (`pack`, zen_kq_pack), per row of W: the low four bits of the codes in panels: per 16 blocks of 32
columns (the last 8 or 16) each block's 16 bytes (byte j = column j | column 16 + j, as the int4 layout) as
four words, word w of block i at word w n + i (the C source's code_pos), so that each 64-byte read holds one
word of every block and a lane of the decode loop's sums is one block: a panel's four reads sum in
integers, then one conversion and one multiply-add per 16 blocks (laid out as int4, each read's sums were
four lanes per block, converted and scaled read by read: 1.5x the instructions); bit 4 (Q5_K, Q6_K) and
bit 5 (Q6_K) as bit planes: with AVX-512 VNNI 64-bit masks, one per 64 bytes of codes and nibble (bit p: byte
p's), with AVX2 the layout kq_high_at (C) describes, the same bytes, which a build's loaders write; two byte
planes of K / 32 (padded to 16): Q6_K the sub-scales of each block's first and last 16 columns, Q4_K / Q5_K
sc and m; per 256 columns float16 d (Q4_K / Q5_K: d, dmin pairs).

The kernel, two loops (`loop()`; `available()` where either is built):
- AVX-512 VNNI: x rounded to 15-bit integers per block of 32 (as the int4 decode loop) and split into two
  byte planes in the codes' panel order, four `vpdpbusd` per 64 bytes of codes and row of x, the bit planes
  added by masked byte adds (the low nibbles are each block's first 16 columns and the high nibbles its last
  16, so Q6_K's two sub-scales each take their own sums), the offsets times the sums of x as rounded. From
  GEMM_MIN_ROWS rows the prompt GEMM (`prompt_gemm`, its K-quant panels).
- AVX2 (most other x86 CPUs): x rounded to int8 per block of 32, as llama.cpp rounds activations
  (`vpmaddubsw` saturates 16-bit pair sums, which two byte planes of x would pass), per 32 bytes of codes
  (a word of 8 blocks) two `vpmaddubsw` and one `vpmaddwd` per row of x, several words' pair sums added in 16
  bits first; with AVX-VNNI (Intel since Alder Lake) two 256-bit `vpdpbusd` instead (a 512-row prompt
  1.35-1.6x faster). The bit planes in their own layout (kq_high_at), widened by one broadcast and a shift
  per 32-byte read. Prompts take the same row tiles (2 rows of W x 4 of x) up to
  quant.AVX2_DENSE_ROWS rows.
Tiles of 4 rows of W x 1 row of x for decode, 1 (AVX2: 2) x 4 for more rows (x in chunks that stay in L2);
`dequantize` for a dense GEMM (long prompts) and for rows of a tied embedding table.

On zen-eco-4b Q4_K_M (AVX2 emulated) decode went from 0.83x llama.cpp's to 0.90-1.26x (both at about the
file's bytes), prompts from 0.60x / 0.81x (64 / 512 tokens) to 0.95x / 0.89x (docs/benchmarks.md, "K-quants
as stored on AVX2").
"""

from __future__ import annotations

import numpy as np
import torch

from . import native, q4_kernel

KINDS = {"q4_k": 0, "q5_k": 1, "q6_k": 2}  # the C side's KQ_*: also the number of bit planes above the nibbles
SUPER = 256  # columns per d (a K-quant block)

# The codes and sub-scales of one GGUF Q6_K / Q4_K / Q5_K block (ggml's layouts), in C: pasted into this
# kernel's source (pack_blocks: a file's blocks straight into our layout) and into checkpoint.gguf_native's.
GGUF_BLOCKS_C = r"""
/* Q6_K: ql: 128 bytes | qh: 64 | scales: 16 int8 | d: f16. Per half of 128 values, group g of 32: the low
   nibbles of ql 0..31 (g 0), of 32..63 (g 1), their high nibbles (g 2, 3); bits 2g, 2g + 1 of the half's
   qh bytes on top. q: the 256 codes in [0, 63] (the value + 32). */
static inline void gguf_q6_k_block(const uint8_t *x, uint8_t *q) {
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = x + 64 * h, *qh = x + 128 + 32 * h;
        uint8_t *o = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (uint8_t)((ql[l] & 15) | ((qh[l] & 3) << 4));
            o[l + 32] = (uint8_t)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4));
            o[l + 64] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            o[l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
        }
    }
}

/* Q4_K (five 0): d, dmin: f16 | scales: 12 | qs: 128. Q5_K (five 1): d, dmin | scales: 12 | qh: 32 | qs: 128.
   Sub-blocks 0..3 keep scale and min in the low 6 bits of scale bytes 0..3 / 4..7; 4..7 take their low 4
   bits from the nibbles of bytes 8..11 and their top 2 from the top of bytes 0..3 / 4..7. Chunk c of 32
   code bytes: low nibbles are sub-block 2c, high ones 2c + 1; Q5_K's sub-block s takes bit s of qh[l].
   q: the 256 codes; sc, mn: the 8 sub-blocks' 6-bit scales and minimums. */
static inline void gguf_kquant_block(const uint8_t *x, int five, uint8_t *q, uint8_t *sc, uint8_t *mn) {
    const uint8_t *p = x + 4, *qs = x + (five ? 48 : 16), *qh = x + 16;
    for (int j = 0; j < 4; j++) {  /* sub-blocks j and 4 + j */
        sc[j] = p[j] & 63, sc[4 + j] = (p[8 + j] & 15) | ((p[j] >> 6) << 4);
        mn[j] = p[4 + j] & 63, mn[4 + j] = (p[8 + j] >> 4) | ((p[4 + j] >> 6) << 4);
    }
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            const uint8_t v = qs[32 * c + l];
            uint8_t lo = v & 15, hi = v >> 4;
            if (five) {
                lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
            q[64 * c + l] = lo, q[64 * c + 32 + l] = hi;
        }
}
"""

C_SOURCE = GGUF_BLOCKS_C + r"""
/* ---- GGUF K-quants as stored (kquant_kernel.py) ---- */
enum { KQ_Q4K = 0, KQ_Q5K = 1, KQ_Q6K = 2 };  /* also the number of bit planes above the low nibbles */

INLINE int kq_nbp(int K) { return (K / 32 + 15) & ~15; }  /* a sub-scale plane's length: blocks, padded to 16 */
INLINE int kq_nd(int kind) { return kind == KQ_Q6K ? 1 : 2; }  /* float16 planes per 256 columns: d (, dmin) */

/* One weight's buffers (kquant_kernel.pack), at row 0 of those given; d: (d, dmin) pairs for Q4_K / Q5_K. */
typedef struct { int kind; const uint8_t *codes, *high, *sc; const uint16_t *d; } kq_t;

INLINE kq_t kq_row(const kq_t *w, int K, int64_t n) {
    const kq_t r = {w->kind, w->codes + n * (K / 2), w->high + n * w->kind * high_stride(K), w->sc + n * 2 * kq_nbp(K),
                    w->d + n * kq_nd(w->kind) * (K / 256)};
    return r;
}

/* Where the bit planes keep bit 4 + i of the code in the low (nib 0) or high (nib 1) nibble of byte `pos` of a
   row's packed codes: a byte of the row's planes (returned) and a bit in it. With AVX-512 VNNI, masks for the
   masked byte adds: per 64 bytes of codes and nibble a 64-bit mask per plane (bit p: byte p). Otherwise (AVX2),
   bits that a 32-byte read of codes widens with one broadcast and shift: per such read 8 bytes a plane, for
   Q6_K byte j (< 16) holding the two bits of lanes j (bits 0-1) and 16 + j (2-3) of the low nibbles, then the
   same of the high (4-7); for Q5_K byte j (< 8) the bit of lanes j, 8 + j, 16 + j, 24 + j of the low nibbles
   (bits 0-3), then of the high (4-7). */
INLINE int64_t kq_high_at(int K, int planes, int i, int64_t pos, int nib, int *bit) {
#ifdef ZEN_VNNI
    (void)planes;
    *bit = (int)(pos % 8);
    return i * high_stride(K) + pos / 64 * 16 + nib * 8 + pos % 64 / 8;
#else
    const int lane = (int)(pos % 32);
    if (planes == 2) {
        *bit = lane / 16 * 2 + nib * 4 + i;
        return pos / 32 * 16 + lane % 16;
    }
    *bit = lane / 8 + nib * 4;
    return pos / 32 * 8 + lane % 8;
#endif
}

/* Rows of x for the K-quant loops: planes of its rounded values, block scales and half-block sums (of x as
   rounded): quantize_planes' with AVX-512 VNNI, quantize_bytes' with AVX2. */
typedef struct { const int8_t *xp; const float *xd, *xa, *xb; } kqx_t;

#ifdef ZEN_VNNI

/* d (and dmin: Q4_K, Q5_K) of the one or two super-blocks that blocks b0 .. b0 + n16 - 1 span, each over its
   8 blocks' lanes: one load of the row's interleaved float16 (d, dmin) pairs. */
INLINE void kq_supers(const int KIND, const uint16_t *d, int b0, int n16, __m512 *dv, __m512 *mv) {
    const int nd = kq_nd(KIND), count = n16 / 8 * nd;
    const __m512 v = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << count) - 1),
                                                                              d + b0 / 8 * nd)));
    const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);  /* super-block per lane */
    const __m512i at = _mm512_mullo_epi32(first, _mm512_set1_epi32(nd));
    *dv = _mm512_permutexvar_ps(at, v);
    if (KIND != KQ_Q6K) *mv = _mm512_permutexvar_ps(_mm512_add_epi32(at, _mm512_set1_epi32(1)), v);
}

/* 64 bytes of a row's codes (read `chunk`: a word of each block of a panel) as unsigned bytes: c0 the low
   nibbles (each block's first 16 columns), c1 the high (its last 16), plus 16 << i where bit plane i's
   mask for that nibble is set. planes: r->kind, a constant where the caller's loop is hot. */
INLINE void kq_read(const int planes, const kq_t *r, int64_t hs, int64_t chunk, __m512i *c0, __m512i *c1) {
    const __m512i v = _mm512_loadu_si512(r->codes + chunk * 64), low = _mm512_set1_epi8(15);
    *c0 = _mm512_and_si512(v, low), *c1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    for (int i = 0; i < planes; i++) {
        uint64_t m[2];
        __builtin_memcpy(m, r->high + i * hs + chunk * 16, 16);
        const __m512i add = _mm512_set1_epi8((char)(16 << i));
        *c0 = _mm512_mask_add_epi8(*c0, (__mmask64)m[0], *c0, add);
        *c1 = _mm512_mask_add_epi8(*c1, (__mmask64)m[1], *c1, add);
    }
}

/* 4 x 4 32-bit words transposed within each 128-bit lane of v[0..3]: word i of v[w] -> word w of v[i]. */
INLINE void transpose_words4(__m512i *v) {
    const __m512i t0 = _mm512_unpacklo_epi32(v[0], v[1]), t1 = _mm512_unpackhi_epi32(v[0], v[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(v[2], v[3]), t3 = _mm512_unpackhi_epi32(v[2], v[3]);
    v[0] = _mm512_unpacklo_epi64(t0, t2), v[1] = _mm512_unpackhi_epi64(t0, t2);
    v[2] = _mm512_unpacklo_epi64(t1, t3), v[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* A whole panel of 16 blocks (from block bk) of a K-quant row as unsigned codes, 32 bytes a block (its
   first 16 columns, then its last 16; the GEMM's panels, the dequantization): the panel's four reads
   (kq_read; read w: word w of every block), then the words transposed back to block order. */
INLINE void kq_unpack_panel(const kq_t *r, int K, int bk, uint8_t *dst) {
    __m512i lo[4], hi[4];
    for (int w = 0; w < 4; w++) kq_read(r->kind, r, high_stride(K), bk / 4 + w, lo + w, hi + w);
    transpose_words4(lo);  /* lane L of lo[i]: block 4 L + i's four words */
    transpose_words4(hi);
    #define KQ_STORE_LANE(L) for (int i = 0; i < 4; i++) { \
        _mm_storeu_si128((__m128i *)(dst + (4 * (L) + i) * 32), _mm512_extracti32x4_epi32(lo[i], L)); \
        _mm_storeu_si128((__m128i *)(dst + (4 * (L) + i) * 32 + 16), _mm512_extracti32x4_epi32(hi[i], L)); }
    KQ_STORE_LANE(0) KQ_STORE_LANE(1) KQ_STORE_LANE(2) KQ_STORE_LANE(3)
    #undef KQ_STORE_LANE
}

/* 16 sub-scales (or minimums) from `at` as floats: int8 for Q6_K, uint8 for Q4_K / Q5_K. */
INLINE __m512 kq_scales16(const int KIND, const uint8_t *at) {
    const __m128i v = _mm_loadu_si128((const __m128i *)at);
    return _mm512_cvtepi32_ps(KIND == KQ_Q6K ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
}

/* kq_block_scales of the blocks b0 .. b0 + n16 - 1 of row r, a lane each: the scale and offset of each block's
   first 16 columns (sa, za) and of its last 16 (sb, zb; Q4_K / Q5_K: the same). */
INLINE void kq_scale_vectors(const int KIND, const kq_t *r, int nbp, int b0, int n16, __m512 *sa, __m512 *sb,
                             __m512 *za, __m512 *zb) {
    __m512 dv, mv;
    kq_supers(KIND, r->d, b0, n16, &dv, &mv);
    *sa = _mm512_mul_ps(dv, kq_scales16(KIND, r->sc + b0));
    *sb = KIND == KQ_Q6K ? _mm512_mul_ps(dv, kq_scales16(KIND, r->sc + nbp + b0)) : *sa;
    /* offsets: Q6_K -32 * scale per half; Q4_K / Q5_K -dmin * m per block */
    *za = KIND == KQ_Q6K ? _mm512_mul_ps(*sa, _mm512_set1_ps(-32.0f))
                         : _mm512_mul_ps(_mm512_mul_ps(mv, _mm512_set1_ps(-1.0f)),
                                         kq_scales16(KIND, r->sc + nbp + b0));
    *zb = KIND == KQ_Q6K ? _mm512_mul_ps(*sb, _mm512_set1_ps(-32.0f)) : *za;
}

/* out[j * RX + r] = x_r . w_j for RW rows of W (rows_w <= RW real; the others repeat row 0, dropped) and RX
   rows of x. Constant KIND, RW, RX (always inlined): accumulators in registers. Per 64 bytes of codes (a word
   of each block of a panel: lane i = block i): the nibbles as unsigned bytes, bits 4 (and 5) added by masked
   adds from the bit planes, four vpdpbusd per row of x against x = 128 h + l, summed over the panel's reads
   in integers; the low nibbles hold each block's first 16 columns and the high its last 16, so Q6_K's two
   sub-scales per block each take their own sums. */
INLINE void kq_tile(const int KIND, const int RW, const int RX, int K, int rows_w, const kq_t *w, const kqx_t *x,
                    float *out) {
    const int nb = K / 32, hs = high_stride(K), nbp = kq_nbp(K), nsb = K / 256;
    const int64_t ahead = group_ahead(K / 2), rows_ahead = ahead / (K / 2);
    kq_t row[4];
    for (int j = 0; j < RW; j++) row[j] = kq_row(w, K, j < rows_w ? j : 0);
    __m512 acc[4][4];
    for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) acc[j][r] = _mm512_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int n16 = nb - b0 < 16 ? nb - b0 : 16;  /* a multiple of 8: K is one of 256 */
        __m512 ca[4][4], cb[4][4];  /* per block: the scale of its first (last) 16 columns times x's scale */
        for (int j = 0; j < RW; j++) {
            if ((b0 & 63) == 0) {  /* a line of sub-scales covers 64 blocks, of d (, dmin) 128 or more */
                prefetch_side(row[j].sc + b0, rows_ahead, 2 * nbp);
                prefetch_side(row[j].sc + nbp + b0, rows_ahead, 2 * nbp);
                prefetch_side(row[j].d + b0 / 8 * kq_nd(KIND), rows_ahead, 2 * kq_nd(KIND) * nsb);
            }
            for (int i = 0; i < KIND; i++) prefetch_side(row[j].high + i * hs + b0 * 4, rows_ahead, KIND * hs);
            __m512 sa, sb, za, zb;
            kq_scale_vectors(KIND, row + j, nbp, b0, n16, &sa, &sb, &za, &zb);
            for (int r = 0; r < RX; r++) {
                const __m512 xdv = _mm512_loadu_ps(x[r].xd + b0);
                ca[j][r] = _mm512_mul_ps(sa, xdv), cb[j][r] = _mm512_mul_ps(sb, xdv);
                acc[j][r] = _mm512_fmadd_ps(za, _mm512_loadu_ps(x[r].xa + b0), acc[j][r]);
                acc[j][r] = _mm512_fmadd_ps(zb, _mm512_loadu_ps(x[r].xb + b0), acc[j][r]);
            }
        }
        if (n16 < 16) {  /* the last panel of 8 blocks: lanes i and 8 + i both hold block i */
            const __m512i dup = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
            for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++)
                ca[j][r] = _mm512_permutexvar_ps(dup, ca[j][r]), cb[j][r] = _mm512_permutexvar_ps(dup, cb[j][r]);
        }
        /* integer sums per lane (= block) over the panel's reads: x = 128 h + l; Q6_K each half apart */
        __m512i lo[4][4], hi[4][4], lo1[4][4], hi1[4][4];
        for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++)
            lo[j][r] = hi[j][r] = lo1[j][r] = hi1[j][r] = _mm512_setzero_si512();
        for (int v = 0; v < n16 / 4; v++) {
            const int chunk = b0 / 4 + v;  /* 64 bytes of codes: one word of each of the panel's blocks */
            __m512i l0[4], h0[4], l1[4], h1[4];  /* x's planes for this read, loaded once for all RW rows */
            for (int r = 0; r < RX; r++) {
                const int8_t *x4 = x[r].xp + (int64_t)chunk * 256;
                l0[r] = _mm512_loadu_si512(x4), h0[r] = _mm512_loadu_si512(x4 + 64);
                l1[r] = _mm512_loadu_si512(x4 + 128), h1[r] = _mm512_loadu_si512(x4 + 192);
            }
            for (int j = 0; j < RW; j++) {
                __builtin_prefetch(row[j].codes + (int64_t)chunk * 64 + ahead, 0, 2);
                __m512i c0, c1;
                kq_read(KIND, row + j, hs, chunk, &c0, &c1);
                for (int r = 0; r < RX; r++) {
                    lo[j][r] = _mm512_dpbusd_epi32(lo[j][r], c0, l0[r]);
                    hi[j][r] = _mm512_dpbusd_epi32(hi[j][r], c0, h0[r]);
                    if (KIND == KQ_Q6K) {  /* c1: each block's last 16 columns, their own sub-scale */
                        lo1[j][r] = _mm512_dpbusd_epi32(lo1[j][r], c1, l1[r]);
                        hi1[j][r] = _mm512_dpbusd_epi32(hi1[j][r], c1, h1[r]);
                    } else {
                        lo[j][r] = _mm512_dpbusd_epi32(lo[j][r], c1, l1[r]);
                        hi[j][r] = _mm512_dpbusd_epi32(hi[j][r], c1, h1[r]);
                    }
                }
            }
        }
        for (int j = 0; j < RW; j++)
            for (int r = 0; r < RX; r++) {
                const __m512i d0 = _mm512_add_epi32(lo[j][r], _mm512_slli_epi32(hi[j][r], 7));
                acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), ca[j][r], acc[j][r]);
                if (KIND == KQ_Q6K) {
                    const __m512i d1 = _mm512_add_epi32(lo1[j][r], _mm512_slli_epi32(hi1[j][r], 7));
                    acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), cb[j][r], acc[j][r]);
                }
            }
    }
    for (int j = 0; j < rows_w; j++) for (int r = 0; r < RX; r++) out[j * RX + r] = hsum16(acc[j][r]);
}

#elif defined(__AVX2__)
/* Where the CPU has AVX-VNNI (Intel since Alder Lake: vpdpbusd on 256-bit vectors, no AVX-512) the loop below
   takes it instead of vpmaddubsw + vpmaddwd. The EVEX form (AVX-512 VNNI + VL without BW: no such CPU, a
   test build on one with AVX-512 VNNI) computes the same. */
#if defined(__AVXVNNI__)
#define KQ_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KQ_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#endif
/* x (1, K) -> the bytes the AVX2 loop reads: rounded per block of 32 to int8 (max |x| -> 127, as llama.cpp's
   activations: vpmaddubsw's products of two bytes saturate beyond 15 bits, so x cannot take two planes of
   bytes as with VNNI), per 32-byte read of codes 64 bytes: the values of the columns in the low nibbles of
   those bytes, then of those in the high. xd: block scales; xh[b], xh[nbx + b]: the sums of each block's first
   and last 16 columns as rounded (as quantize_planes'). */
static void quantize_bytes(int K, const void *x, int x_bf16, int8_t *xp, float *xd, float *xh) {
    const int nbx = (K / 32 + 15) & ~15;
    for (int b = 0; b < K / 32; b++) {
        float xr[32];
        int32_t q[32], half[2] = {0, 0};
        load_block(x, x_bf16, b * 32, xr);
        xd[b] = round_block(xr, 127.0f, q, 0);
        for (int i = 0; i < 32; i++) half[i / 16] += q[i];
        xh[b] = xd[b] * (float)half[0], xh[nbx + b] = xd[b] * (float)half[1];
        for (int j = 0; j < 16; j++) {
            const int64_t pos = code_pos(1, K, b, j);
            int8_t *at = xp + pos / 32 * 64 + pos % 32;
            at[0] = (int8_t)q[j], at[32] = (int8_t)q[16 + j];
        }
    }
}

/* The 32 bytes of a row's codes at byte o (o % 32 == 0: a word of 8 blocks of a panel, lane i block i) as
   unsigned codes: c0 the low nibbles (each block's first 16 columns), c1 the high, with their bits from the
   planes (kq_high_at): one broadcast load, a shift per lane and two masks. */
INLINE void kq_read8(const int KIND, const kq_t *r, int64_t o, __m256i *c0, __m256i *c1) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(r->codes + o)), low = _mm256_set1_epi8(15);
    *c0 = _mm256_and_si256(v, low), *c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    if (KIND == KQ_Q4K) return;
    __m256i t, top;
    if (KIND == KQ_Q6K) {  /* lanes 16-31 take bits 2-3 (and 6-7) of the same bytes as lanes 0-15 */
        t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(r->high + o / 2)));
        t = _mm256_srlv_epi32(t, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), top = _mm256_set1_epi8(0x30);
    } else {  /* Q5_K: lanes 8 q + j take bit q (and 4 + q) of byte j */
        int64_t bits;
        __builtin_memcpy(&bits, r->high + o / 4, 8);
        t = _mm256_srlv_epi64(_mm256_set1_epi64x(bits), _mm256_setr_epi64x(0, 1, 2, 3)), top = _mm256_set1_epi8(0x10);
    }
    *c0 = _mm256_or_si256(*c0, _mm256_and_si256(_mm256_slli_epi16(t, 4), top));  /* the low bits moved up to 4 */
    *c1 = _mm256_or_si256(*c1, _mm256_and_si256(t, top));
}

INLINE __m256 kq_scales8(const int KIND, const uint8_t *at) {  /* kq_scales16's, 8 of them */
    const __m128i v = _mm_loadl_epi64((const __m128i *)at);
    return _mm256_cvtepi32_ps(KIND == KQ_Q6K ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}

/* The AVX-512 kq_tile's contract, per 8 blocks (one super-block: d, dmin are scalars; lane i = block i): per
   32 bytes of codes (a word of each of the 8 blocks) the codes times x's bytes by vpmaddubsw (pairs into 16
   bits: at most 2 x 63 x 127) and vpmaddwd against ones (the word's 4 products into the block's lane), the
   lanes summed in integers over the 4 words, then scaled once. */
INLINE void kq_tile(const int KIND, const int RW, const int RX, int K, int rows_w, const kq_t *w, const kqx_t *x,
                    float *out) {
    const int nb = K / 32, hs = high_stride(K), nbp = kq_nbp(K), nsb = K / 256, nd = kq_nd(KIND);
    const int64_t ahead = group_ahead(K / 2), rows_ahead = ahead / (K / 2);
#ifndef KQ_DPBUSD
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    kq_t row[4];
    for (int j = 0; j < RW; j++) row[j] = kq_row(w, K, j < rows_w ? j : 0);
    __m256 acc[4][4];
    for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) acc[j][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b += 8) {
        const int p0 = b / 16 * 16, n = nb - p0 < 16 ? nb - p0 : 16, half = (b - p0) / 8;
        __m256 ca[4][4], cb[4][4];
        for (int j = 0; j < RW; j++) {
            if ((b & 63) == 0) {
                prefetch_side(row[j].sc + b, rows_ahead, 2 * nbp);
                prefetch_side(row[j].sc + nbp + b, rows_ahead, 2 * nbp);
                prefetch_side(row[j].d + b / 8 * nd, rows_ahead, 2 * nd * nsb);
            }
            if (KIND) prefetch_side(row[j].high + b * 4 * KIND, rows_ahead, KIND * hs);  /* 4 bytes a block and plane */
            const __m256 dv = _mm256_set1_ps(f16(row[j].d[b / 8 * nd]));
            const __m256 sa = _mm256_mul_ps(dv, kq_scales8(KIND, row[j].sc + b));
            const __m256 sb = KIND == KQ_Q6K ? _mm256_mul_ps(dv, kq_scales8(KIND, row[j].sc + nbp + b)) : sa;
            const __m256 za = KIND == KQ_Q6K ? _mm256_mul_ps(sa, _mm256_set1_ps(-32.0f))
                                             : _mm256_mul_ps(_mm256_set1_ps(-f16(row[j].d[b / 8 * nd + 1])),
                                                             kq_scales8(KIND, row[j].sc + nbp + b));
            const __m256 zb = KIND == KQ_Q6K ? _mm256_mul_ps(sb, _mm256_set1_ps(-32.0f)) : za;
            for (int r = 0; r < RX; r++) {
                const __m256 xdv = _mm256_loadu_ps(x[r].xd + b);
                ca[j][r] = _mm256_mul_ps(sa, xdv), cb[j][r] = _mm256_mul_ps(sb, xdv);
                acc[j][r] = _mm256_fmadd_ps(za, _mm256_loadu_ps(x[r].xa + b), acc[j][r]);
                acc[j][r] = _mm256_fmadd_ps(zb, _mm256_loadu_ps(x[r].xb + b), acc[j][r]);
            }
        }
        /* Q6_K: each block's first and last 16 columns apart (their own scales). The 16-bit pair sums of
           `every` words are added before widening: Q4_K 4 x 2 x 2 x 15 x 127, Q5_K 2 x 2 x 2 x 31 x 127, Q6_K
           2 x 2 x 63 x 127 (each half) stay below 2^15. */
        __m256i s0[4][4], s1[4][4];
#ifndef KQ_DPBUSD
        const int every = KIND == KQ_Q4K ? 4 : 2;
        __m256i t0[4][4], t1[4][4];
#endif
        for (int j = 0; j < RW; j++) for (int r = 0; r < RX; r++) s0[j][r] = s1[j][r] = _mm256_setzero_si256();
        for (int v = 0; v < 4; v++) {
            const int64_t o = (int64_t)p0 * 16 + v * 4 * n + 32 * half;
            __m256i xl[4], xh[4];
            for (int r = 0; r < RX; r++)
                xl[r] = _mm256_loadu_si256((const __m256i *)(x[r].xp + 2 * o)),
                xh[r] = _mm256_loadu_si256((const __m256i *)(x[r].xp + 2 * o + 32));
            for (int j = 0; j < RW; j++) {
                __builtin_prefetch(row[j].codes + o + ahead, 0, 2);
                __m256i c0, c1;
                kq_read8(KIND, row + j, o, &c0, &c1);
                for (int r = 0; r < RX; r++) {
#ifdef KQ_DPBUSD  /* AVX-VNNI: 4 byte products into each 32-bit lane in one instruction */
                    s0[j][r] = KQ_DPBUSD(s0[j][r], c0, xl[r]);
                    if (KIND == KQ_Q6K) s1[j][r] = KQ_DPBUSD(s1[j][r], c1, xh[r]);
                    else s0[j][r] = KQ_DPBUSD(s0[j][r], c1, xh[r]);
#else
                    const __m256i p0v = _mm256_maddubs_epi16(c0, xl[r]), p1v = _mm256_maddubs_epi16(c1, xh[r]);
                    if (KIND == KQ_Q6K) {
                        t0[j][r] = v % every ? _mm256_add_epi16(t0[j][r], p0v) : p0v;
                        t1[j][r] = v % every ? _mm256_add_epi16(t1[j][r], p1v) : p1v;
                    } else {
                        const __m256i p = _mm256_add_epi16(p0v, p1v);
                        t0[j][r] = v % every ? _mm256_add_epi16(t0[j][r], p) : p;
                    }
                    if (v % every == every - 1) {
                        s0[j][r] = _mm256_add_epi32(s0[j][r], _mm256_madd_epi16(t0[j][r], ones));
                        if (KIND == KQ_Q6K) s1[j][r] = _mm256_add_epi32(s1[j][r], _mm256_madd_epi16(t1[j][r], ones));
                    }
#endif
                }
            }
        }
        for (int j = 0; j < RW; j++)
            for (int r = 0; r < RX; r++) {
                acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0[j][r]), ca[j][r], acc[j][r]);
                if (KIND == KQ_Q6K) acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[j][r]), cb[j][r], acc[j][r]);
            }
    }
    for (int j = 0; j < rows_w; j++) for (int r = 0; r < RX; r++) out[j * RX + r] = hsum(acc[j][r]);
}

/* 8 blocks from block b (a multiple of 8) of a K-quant row as unsigned codes, 32 bytes a block (its first 16
   columns, then its last 16): their four words (kq_read8), transposed back to block order. */
INLINE void kq_unpack8(const kq_t *r, int K, int b, uint8_t *dst) {
    const int nb = K / 32, p0 = b / 16 * 16, n = nb - p0 < 16 ? nb - p0 : 16, half = (b - p0) / 8;
    __m256i lo[4], hi[4];
    for (int v = 0; v < 4; v++) {
        const int64_t o = (int64_t)p0 * 16 + v * 4 * n + 32 * half;
        if (r->kind == KQ_Q6K) kq_read8(KQ_Q6K, r, o, lo + v, hi + v);
        else if (r->kind == KQ_Q5K) kq_read8(KQ_Q5K, r, o, lo + v, hi + v);
        else kq_read8(KQ_Q4K, r, o, lo + v, hi + v);
    }
    words8_to_blocks(lo, hi, dst);
}
#endif

#if defined(ZEN_VNNI) || defined(__AVX2__)
#define KQ_X_BYTES (256 << 10)  /* rows of x's bytes a prompt's tiles take at a time: L2, for every row of W */
#ifdef ZEN_VNNI
#define KQ_ROWS_W 1  /* rows of W per tile of a few rows of x (the prompt GEMM takes more) */
#else
#define KQ_ROWS_W 2  /* AVX2: each x load serves two rows of W (one: 1.15-1.2x the time of a 512-row prompt) */
#endif

/* One tile with constant KIND, RW, RX. (The OpenMP loops live in zen_kq_linear itself: a loop inside an
   inlined helper is outlined before inlining, with its constants turned back into variables: 1.5x slower.) */
#define KQ_TILE(KIND_, RW_, RX_, ROWS_, W_, X_, OUT_) do { \
    if ((KIND_) == KQ_Q4K) kq_tile(KQ_Q4K, RW_, RX_, K, ROWS_, W_, X_, OUT_); \
    else if ((KIND_) == KQ_Q5K) kq_tile(KQ_Q5K, RW_, RX_, K, ROWS_, W_, X_, OUT_); \
    else kq_tile(KQ_Q6K, RW_, RX_, K, ROWS_, W_, X_, OUT_); } while (0)
#endif

/* Block b's 32 codes c (of `planes` bits above four) into a row's packed codes o and its (zeroed) bit planes h. */
INLINE void kq_pack_block(int K, int planes, int b, const uint8_t *c, uint8_t *o, uint8_t *h) {
    uint8_t bytes[16];
#ifdef ZEN_VNNI
    const int hs = high_stride(K);
    const __m128i lo = _mm_loadu_si128((const __m128i *)c), hi = _mm_loadu_si128((const __m128i *)(c + 16));
    _mm_storeu_si128((__m128i *)bytes, _mm_or_si128(_mm_and_si128(lo, _mm_set1_epi8(15)),
                                                    _mm_slli_epi16(_mm_and_si128(hi, _mm_set1_epi8(15)), 4)));
    uint16_t bits[2][2] = {{0, 0}, {0, 0}};  /* per plane, half: bit j = that bit of column (16 half +) j */
    for (int i = 0; i < planes; i++)
        bits[i][0] = _mm_test_epi8_mask(lo, _mm_set1_epi8((char)(16 << i))),
        bits[i][1] = _mm_test_epi8_mask(hi, _mm_set1_epi8((char)(16 << i)));
    for (int w = 0; w < 4; w++) {  /* a word of 4 bytes stays together: 4 bits of each mask */
        const int64_t pos = code_pos(1, K, b, 4 * w);
        __builtin_memcpy(o + pos, bytes + 4 * w, 4);
        for (int i = 0; i < planes; i++)
            for (int half = 0; half < 2; half++)
                h[i * hs + pos / 64 * 16 + half * 8 + pos % 64 / 8] |=
                    (uint8_t)((bits[i][half] >> (4 * w) & 15) << (pos % 8));
    }
#else
    for (int j = 0; j < 16; j++) bytes[j] = (uint8_t)((c[j] & 15) | (c[16 + j] << 4));
    for (int w = 0; w < 4; w++) {
        const int64_t pos = code_pos(1, K, b, 4 * w);
        __builtin_memcpy(o + pos, bytes + 4 * w, 4);
        for (int k = 0; planes && k < 4; k++)
            for (int half = 0; half < 2; half++) {  /* a code's bits above four sit side by side (kq_high_at) */
                int bit;
                const int64_t at = kq_high_at(K, planes, 0, pos + k, half, &bit);
                h[at] |= (uint8_t)((c[16 * half + 4 * w + k] >> 4) << bit);
            }
    }
#endif
}

/* codes (N, K) of `planes` bits above four -> packed (N, K / 2), each block's byte j (column j | column 16 + j)
   at code_pos(1, K, b, j), and the bit planes (N, planes, high_stride(K)): bit 4 + i of the code in the bit
   of plane i's masks that its byte's position has (the low nibble's 64-bit mask, then the high's). */
void zen_kq_pack(int64_t N, int K, int planes, const uint8_t *codes, uint8_t *packed, uint8_t *high, int n_threads) {
    const int hs = high_stride(K);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < N; r++) {
        uint8_t *h = high + r * planes * hs;
        if (planes) __builtin_memset(h, 0, (size_t)planes * hs);
        for (int b = 0; b < K / 32; b++) kq_pack_block(K, planes, b, codes + r * K + b * 32, packed + r * (K / 2), h);
    }
}

/* N rows of a GGUF K-quant matrix (`kind`: its blocks, row after row, K / 256 per row) straight into the
   buffers `pack` makes from its codes (the same bytes): no (N, K) codes in between. d: the blocks' float16
   bits as stored. */
void zen_kq_pack_blocks(int kind, int64_t N, int K, const uint8_t *blocks, uint8_t *packed, uint8_t *high,
                        uint8_t *sc, uint16_t *d, int n_threads) {
    const int size = kind == KQ_Q6K ? 210 : kind == KQ_Q5K ? 176 : 144, nsb = K / 256, hs = high_stride(K);
    const int nbp = kq_nbp(K);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < N; r++) {
        uint8_t *h = high + r * kind * hs, *s = sc + r * 2 * nbp;
        if (kind) __builtin_memset(h, 0, (size_t)kind * hs);
        __builtin_memset(s, 0, (size_t)2 * nbp);  /* the planes' padding to 16 blocks */
        for (int u = 0; u < nsb; u++) {
            const uint8_t *x = blocks + (r * nsb + u) * size;
            uint8_t q[256];
            if (kind == KQ_Q6K) {  /* sub-scales per 16 columns: each block's first half, then its last */
                gguf_q6_k_block(x, q);
                for (int i = 0; i < 8; i++) s[8 * u + i] = x[192 + 2 * i], s[nbp + 8 * u + i] = x[193 + 2 * i];
                __builtin_memcpy(d + r * nsb + u, x + 208, 2);
            } else {
                gguf_kquant_block(x, kind == KQ_Q5K, q, s + 8 * u, s + nbp + 8 * u);
                __builtin_memcpy(d + (r * nsb + u) * 2, x, 4);  /* d, dmin */
            }
            for (int i = 0; i < 8; i++) kq_pack_block(K, kind, 8 * u + i, q + 32 * i, packed + r * (K / 2), h);
        }
    }
}

/* The K-quant loop built here: 1 AVX-512 VNNI, 2 AVX2, 3 AVX2 with 256-bit vpdpbusd (AVX-VNNI), 0 none
   (zen_kq_linear returns -2). */
int zen_kq_available(void) {
#if defined(ZEN_VNNI)
    return 1;
#elif defined(__AVX2__) && defined(KQ_DPBUSD)
    return 3;
#elif defined(__AVX2__)
    return 2;
#else
    return 0;
#endif
}

/* y (M, N) = x (M, K) W^T for W of `kind` (KQ_*) in kquant_kernel.pack's buffers; x and y float32 or
   bfloat16 (x_bf16, y_bf16). 0; -1 where memory runs out; -2 where not built (neither AVX-512 VNNI nor AVX2). */
int zen_kq_linear(int kind, int M, int N, int K, const void *x, int x_bf16, const uint8_t *codes, const uint8_t *high,
                  const uint8_t *sc, const uint16_t *d, void *y, int y_bf16, int n_threads) {
#if defined(ZEN_VNNI) || defined(__AVX2__)
    const int nbx = (K / 32 + 15) & ~15;
#ifdef ZEN_VNNI
    const int64_t plane = (int64_t)(K / 32 + 3) / 4 * 256;  /* two planes of bytes */
#else
    const int64_t plane = 2 * (int64_t)K;  /* bytes, per 32-byte read of codes 64 */
#endif
    int8_t *xp = calloc((size_t)M * plane, 1);
    float *sums = calloc((size_t)3 * M * nbx, sizeof(float));  /* per row: xd, first-half sums, last-half sums */
    kqx_t *xs = malloc((size_t)M * sizeof(kqx_t));
    if (!xp || !sums || !xs) { free(xp); free(sums); free(xs); return -1; }
    for (int m = 0; m < M; m++) {
        float *s = sums + (int64_t)3 * m * nbx;
        const void *xm = (const char *)x + (int64_t)m * K * (x_bf16 ? 2 : 4);
#ifdef ZEN_VNNI
        quantize_planes(K, 1, xm, x_bf16, xp + m * plane, s, 0, s + nbx);
#else
        quantize_bytes(K, xm, x_bf16, xp + m * plane, s, s + nbx);
#endif
        xs[m] = (kqx_t){xp + m * plane, s, s + nbx, s + 2 * nbx};
    }
    const kq_t w = {kind, codes, high, sc, d};
    if (M == 1) {  /* decode: four rows of W a tile */
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int n = 0; n < N; n += 4) {
            float out[4];
            const int rows = N - n < 4 ? N - n : 4;
            const kq_t wn = kq_row(&w, K, n);
            KQ_TILE(kind, 4, 1, rows, &wn, xs, out);
            for (int j = 0; j < rows; j++) store(y, y_bf16, n + j, out[j]);
        }
    } else {  /* rows of x: KQ_ROWS_W rows of W x four of x a tile, x in chunks that stay in L2 */
        const int chunk = KQ_X_BYTES / plane > 4 ? (int)(KQ_X_BYTES / plane) / 4 * 4 : 4;
        for (int c0 = 0; c0 < M; c0 += chunk) {
            const int c1 = M - c0 < chunk ? M : c0 + chunk;
            #pragma omp parallel for num_threads(n_threads) schedule(static)
            for (int n = 0; n < N; n += KQ_ROWS_W) {
                const kq_t wn = kq_row(&w, K, n);
                const int rw = N - n < KQ_ROWS_W ? N - n : KQ_ROWS_W;
                for (int m0 = c0; m0 < c1; m0 += 4) {
                    float out[4 * KQ_ROWS_W];
                    const int R = c1 - m0 < 4 ? c1 - m0 : 4;
                    switch (R) {
                        case 1: KQ_TILE(kind, KQ_ROWS_W, 1, rw, &wn, xs + m0, out); break;
                        case 2: KQ_TILE(kind, KQ_ROWS_W, 2, rw, &wn, xs + m0, out); break;
                        case 3: KQ_TILE(kind, KQ_ROWS_W, 3, rw, &wn, xs + m0, out); break;
                        default: KQ_TILE(kind, KQ_ROWS_W, 4, rw, &wn, xs + m0, out); break;
                    }
                    for (int j = 0; j < rw; j++)
                        for (int r = 0; r < R; r++) store(y, y_bf16, (int64_t)(m0 + r) * N + n + j, out[j * R + r]);
                }
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

/* Block b's float scale and offset of its first and last 16 columns (w = scale * code + offset), ggml's
   float32 products. */
INLINE void kq_block_scales(const kq_t *r, int K, int b, float *scale, float *offset) {
    const int nbp = kq_nbp(K);
    const float d = f16(r->d[b / 8 * kq_nd(r->kind)]);
    if (r->kind == KQ_Q6K) {
        scale[0] = d * (float)(int8_t)r->sc[b], scale[1] = d * (float)(int8_t)r->sc[nbp + b];
        offset[0] = -32.0f * scale[0], offset[1] = -32.0f * scale[1];
    } else {
        scale[0] = scale[1] = d * (float)r->sc[b];
        offset[0] = offset[1] = -(f16(r->d[b / 8 * 2 + 1]) * (float)r->sc[nbp + b]);
    }
}

/* Block b of a K-quant row as its 32 codes (0..63, one at a time through code_pos) and kq_block_scales'. */
INLINE void kq_block(const kq_t *r, int K, int b, uint8_t *q, float *scale, float *offset) {
    for (int j = 0; j < 16; j++) {
        const int64_t pos = code_pos(1, K, b, j);
        q[j] = r->codes[pos] & 15, q[j + 16] = r->codes[pos] >> 4;
        for (int i = 0; i < r->kind; i++) {
            int b0, b1;
            const uint8_t m0 = r->high[kq_high_at(K, r->kind, i, pos, 0, &b0)];
            const uint8_t m1 = r->high[kq_high_at(K, r->kind, i, pos, 1, &b1)];
            q[j] |= (m0 >> b0 & 1) << (4 + i), q[j + 16] |= (m1 >> b1 & 1) << (4 + i);
        }
    }
    kq_block_scales(r, K, b, scale, offset);
}

/* Rows of the dense weight, float32 or (out_bf16) bfloat16, as ggml computes them: Q6_K (d * sc) * (q - 32),
   Q4_K / Q5_K (d * sc) * q - dmin * m; rounded once. rows: the R row indices to give (out is (R, K)); NULL:
   all rows, in order. */
void zen_kq_dequant(int kind, int R, int K, const uint8_t *codes, const uint8_t *high, const uint8_t *sc,
                    const uint16_t *d, const int64_t *rows, void *out, int out_bf16, int n_threads) {
    const kq_t w = {kind, codes, high, sc, d};
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int i = 0; i < R; i++) {
        const kq_t r = kq_row(&w, K, rows ? rows[i] : i);
        uint8_t panel[512];  /* codes unpacked in vectors: VNNI whole panels (the last 8 blocks one by one), AVX2
                                8 blocks at a time */
        for (int b = 0; b < K / 32; b++) {
            uint8_t q[32];
            float scale[2], offset[2], v[32];
            const uint8_t *unpacked = 0;  /* block b's 32 codes in `panel`, where unpacked there */
#ifdef ZEN_VNNI
            if (K / 32 - b / 16 * 16 >= 16) {  /* in a whole panel */
                if (b % 16 == 0) kq_unpack_panel(&r, K, b, panel);
                unpacked = panel + b % 16 * 32;
            }
#elif defined(__AVX2__)
            if (b % 8 == 0) kq_unpack8(&r, K, b, panel);  /* K is whole super-blocks: 8 blocks at a time */
            unpacked = panel + b % 8 * 32;
#endif
            if (unpacked) {
                kq_block_scales(&r, K, b, scale, offset);
                __builtin_memcpy(q, unpacked, 32);
            } else {
                kq_block(&r, K, b, q, scale, offset);
            }
            if (kind == KQ_Q6K) for (int j = 0; j < 32; j++) v[j] = scale[j / 16] * (float)((int)q[j] - 32);
            else for (int j = 0; j < 32; j++) v[j] = scale[j / 16] * (float)q[j] + offset[j / 16];
            store32(out, out_bf16, (int64_t)i * K + b * 32, v);
        }
    }
}
"""

def loop() -> str | None:
    """The K-quant loop built here: "avx512-vnni" (x in 15 bits), "avx2" (x in 8 bits), "avx-vnni" (the AVX2
    loop with AVX-VNNI's 256-bit vpdpbusd) or None. Also the name `zen-eco bench` reports for our CPU loops."""
    lib = q4_kernel.library()
    return {1: "avx512-vnni", 2: "avx2", 3: "avx-vnni"}.get(lib.zen_kq_available()) if lib is not None else None


def available() -> bool:
    """Whether the K-quant kernel is built here (AVX-512 VNNI or AVX2): loaders keep K-quants as stored only then."""
    return loop() is not None


BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}  # one GGUF block of 256 weights


def empty_buffers(kind: str, n: int, k: int) -> tuple[torch.Tensor, ...]:
    """Uninitialised buffers of `pack`'s shapes for an (n, k) weight of `kind`."""
    if k % SUPER:
        raise ValueError(f"K-quant rows are whole blocks of {SUPER} columns, not {k}")
    return (native.huge_pages(torch.empty(n, k // 2, dtype=torch.uint8)),  # the codes: see native.huge_pages
            torch.empty(n, KINDS[kind], (k // 32 + 3) // 4 * 16, dtype=torch.uint8),
            torch.empty(n, 2, (k // 32 + 15) // 16 * 16, dtype=torch.uint8),
            torch.empty(n, k // SUPER, 1 if kind == "q6_k" else 2, dtype=torch.float16))


def pack(kind: str, codes: torch.Tensor, sub_scale: torch.Tensor, d: torch.Tensor, sub_min: torch.Tensor | None = None,
         dmin: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A `quant.KQuantWeight`'s fields -> the kernel's buffers: low four bits (N, K / 2) uint8; bit planes
    (N, planes, high bytes) uint8 (none for Q4_K); sub-scale planes (N, 2, K / 32 rounded up to 16) uint8
    (Q6_K: int8 bits of each block's first 16 columns' scale, then its last 16's; Q4_K / Q5_K: sc, then m);
    (N, K / 256, 1 or 2) float16 d (Q4_K / Q5_K: d, dmin pairs)."""
    n, k = codes.shape
    packed, high, _, _ = empty_buffers(kind, n, k)
    codes = codes.contiguous()
    q4_kernel.library().zen_kq_pack(n, k, KINDS[kind], codes.data_ptr(), packed.data_ptr(), high.data_ptr(),
                                    torch.get_num_threads())
    if kind == "q6_k":
        sc = sub_scale.view(n, k // 32, 2).transpose(1, 2).view(torch.uint8)  # (N, 2, K / 32)
        ds = d[..., None]
    else:
        sc = torch.stack([sub_scale, sub_min], 1)
        ds = torch.stack([d, dmin], -1)
    sc = torch.nn.functional.pad(sc, (0, -(k // 32) % 16)).contiguous()
    return packed, high.contiguous(), sc, ds.to(torch.float16).contiguous()


def pack_blocks(kind: str, blocks: np.ndarray, n: int, k: int,
                out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """A GGUF `kind` matrix's (n, k) blocks (bytes, row after row: a file's mapping) straight into `pack`'s
    buffers (the same bytes `pack` gives from the decoded codes), in one C pass: no (n, k) codes in between.
    out: buffers of `empty_buffers`' shapes to fill (rows of a fused matrix: row slices of larger ones)."""
    data = np.ascontiguousarray(blocks).view(np.uint8)  # a view of a contiguous mapping, never a copy
    if data.nbytes != n * k // SUPER * BLOCK_BYTES[kind]:
        raise ValueError(f"{data.nbytes} bytes are not the blocks of a {kind} ({n}, {k}) matrix")
    out = empty_buffers(kind, n, k) if out is None else out
    if not all(t.is_contiguous() for t in out):
        raise ValueError("pack_blocks writes into contiguous buffers only")
    q4_kernel.library().zen_kq_pack_blocks(KINDS[kind], n, k, data.ctypes.data, *(t.data_ptr() for t in out),
                                           torch.get_num_threads())
    return out


def dequantize(kind: str, packed: torch.Tensor, high: torch.Tensor, sc: torch.Tensor, d: torch.Tensor,
               dtype: torch.dtype, rows: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
    """`pack`'s buffers -> the dense weight (rows `rows`: an int64 index tensor; None: all) in `dtype` (float32 or
    bfloat16), ggml's float32 values rounded once. reuse: as `q4_kernel.dequantize_int4`."""
    k = packed.shape[1] * 2
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= packed.shape[0]):
            raise IndexError(f"row index out of range for a weight of {packed.shape[0]} rows")
    r = packed.shape[0] if rows is None else rows.numel()
    out = q4_kernel._weight_buffer(r, k, dtype, reuse and rows is None)
    q4_kernel.library().zen_kq_dequant(KINDS[kind], r, k, packed.data_ptr(), high.data_ptr(), sc.data_ptr(),
                                       d.data_ptr(), None if rows is None else rows.data_ptr(), out.data_ptr(),
                                       dtype == torch.bfloat16, torch.get_num_threads())
    return out


def _kq_linear(x: torch.Tensor, kind: int, packed: torch.Tensor, high: torch.Tensor, sc: torch.Tensor,
               d: torch.Tensor, out_dtype: torch.dtype, gemm: bool | None = None) -> torch.Tensor:
    (m, k), n = x.shape, packed.shape[0]
    run = q4_kernel._entry(m, "kq", gemm)  # the prompt GEMM from GEMM_MIN_ROWS rows, as the other layouts
    return q4_kernel._linear(x, n, out_dtype, lambda xp, xb, yp, yb: run(
        kind, m, n, k, xp, xb, packed.data_ptr(), high.data_ptr(), sc.data_ptr(), d.data_ptr(), yp, yb,
        torch.get_num_threads()))


_kq_op = torch.library.custom_op("zen_eco::kq_linear", _kq_linear, mutates_args=())


@_kq_op.register_fake
def _(x, kind, packed, high, sc, d, out_dtype, gemm=None):
    return x.new_empty((x.shape[0], packed.shape[0]), dtype=out_dtype)


def matmul(x: torch.Tensor, kind: str, packed: torch.Tensor, high: torch.Tensor, sc: torch.Tensor, d: torch.Tensor,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) x (CPU) @ W^T -> (M, N) in `out_dtype` for `pack`'s buffers of a `kind` weight (where `available()`)."""
    if torch.compiler.is_compiling():
        return torch.ops.zen_eco.kq_linear(x, KINDS[kind], packed, high, sc, d, out_dtype)
    return _kq_linear(x, KINDS[kind], packed, high, sc, d, out_dtype)
