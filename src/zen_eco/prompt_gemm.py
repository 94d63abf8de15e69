"""The C source of the prompt GEMM: y = x W^T for many rows of x and a quantized W, in integers.

`q4_kernel` compiles it with its own source (whose helpers it uses) and calls it for a prompt's rows
(`q4_kernel.GEMM_MIN_ROWS` and up) where the CPU has AVX-512 VNNI. It takes every weight layout of the
decode kernels (int4 / int5 groups, int8 per row, int8 with block scales and offsets, K-quants as stored):
no weight is rounded to bfloat16 (what the dense GEMM needed), and the integer dot products are exact. x is
rounded to bytes, as llama.cpp rounds it, where the AVX-512 row kernels keep 15-16 bits: one instruction per
64 products instead of two, for +0.1-0.2% of perplexity (docs/benchmarks.md). Int8 weights with a scale per
row (`--quant int8`, whose point is to stay within 0.5% of the unquantized model) keep x in 16 bits, as two
byte planes and two instructions.

How it is laid out, unlike the decode loops (which reduce each dot product along K inside a vector):
- the 16 lanes of a vector are 16 rows of x. x is rounded per block of 32 columns to signed bytes (max |x|
  -> 127, as llama.cpp's Q8 activations and our AVX2 loops), stored per 16 rows and 4 columns as 64 bytes
  (lane j: row j's 4 columns), once per call;
- four consecutive codes of a row of W are one 32-bit word broadcast to all lanes: `vpdpbusd` multiplies
  them as unsigned bytes (int4 / int5 / K-quant codes as they are, int8 codes + 128, whose 128 x (sum of x)
  comes back from x's side) by x's signed ones. One instruction serves 16 rows x 4 columns, and no sum over
  W's codes is needed. A register tile holds 8 rows of W x 16 rows of x (8 int32 accumulators);
  per block of 32 (or 16) columns the sums become floats times (scale of W's block) x (x's block scale),
  plus offset x (sum of x as rounded over the block) where W has offsets. Int8 with a scale per row: x in 16
  bits, x = 256 h + l (h signed, l unsigned), codes + 128 times h (less 128 x (sum of h)) plus l times the
  codes as stored (the signed operand), 16 accumulators.
Loops: K in chunks of even size whose slice of x (all rows) stays in L2; per chunk, each thread unpacks its
panels of 8 rows of W (as bytes, L1; the next panel's rows prefetched) and runs every 16 rows of x past them;
the sums accumulate in a float (N, rows) buffer, transposed into y at the end in blocks.
"""

C_SOURCE = r"""
#ifdef ZEN_VNNI
#define GM_NR 8           /* rows of W per register tile (x 16 rows of x) */
#define GM_KC 4096        /* the most columns of a chunk of K */
#define GM_ROW (GM_KC + 64)  /* a panel row's bytes: a constant, so a tile addresses its 8 rows from one register;
                                not 4096, whose rows would share L1 sets */
#define GM_X_BYTES 393216 /* bytes of x's planes per chunk of K: what stays in L2 */
#define GM_Y_BYTES (32 << 20)  /* at most this many bytes of float sums at a time: N in pieces */

typedef struct {
    int nmv, nb, nsb;      /* 16-row vectors of x, blocks of 32, sub-blocks (of 16 or 32 columns) */
    int wide;              /* x in 16 bits: two planes */
    int8_t *planes;        /* (nmv, K / 4, 64): per 4 columns, lane j = row 16 v + j, x's bytes;
                              wide: (nmv, K / 4, 2, 64), h then l */
    float *xd, *xs;        /* (nmv, nb, 16) block scales; (nmv, nsb, 16) sums of x as rounded per sub-block */
    int32_t *qs;           /* (nmv, nsb, 16) sums of x's bytes (wide: of h) per sub-block (for int8 codes) */
} gx_t;

static void gemm_free_x(gx_t *g) { free(g->planes); free(g->xd); }

static int gemm_prepare_x(int M, int K, const void *x, int x_bf16, int sb, int wide, gx_t *g, int n_threads) {
    g->nmv = (M + 15) / 16, g->nb = K / 32, g->nsb = K / sb, g->wide = wide;
    const int64_t stride = (int64_t)K * 16 * (wide ? 2 : 1);  /* bytes per 16 rows of x */
    g->planes = aligned_alloc(64, (size_t)g->nmv * stride);
    g->xd = calloc((size_t)g->nmv * 16 * (g->nb + 2 * g->nsb), sizeof(float));
    if (!g->planes || !g->xd) { gemm_free_x(g); return 0; }
    g->xs = g->xd + (int64_t)g->nmv * g->nb * 16;
    g->qs = (int32_t *)(g->xs + (int64_t)g->nmv * g->nsb * 16);
    const float qmax = wide ? 32767.0f : 127.0f;  /* as the row kernel / as the AVX2 loops (round_block, in vectors) */
    #pragma omp parallel for num_threads(n_threads) schedule(static) collapse(2)
    for (int v = 0; v < g->nmv; v++) {
        for (int j = 0; j < 16; j++) {
            int8_t *pv = g->planes + (int64_t)v * stride + j * 4;
            const int64_t m = (int64_t)v * 16 + j;
            for (int b = 0; b < g->nb; b++) {
                __m512 a[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  /* rows past M: zeros */
                for (int h = 0; h < 2 && m < M; h++) {
                    const int64_t at = m * K + b * 32 + h * 16;
                    a[h] = x_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                        _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + at))), 16))
                                  : _mm512_loadu_ps((const float *)x + at);
                }
                const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a[0]), _mm512_abs_ps(a[1])));
                const float d = amax / qmax, id = d > 0.0f ? 1.0f / d : 0.0f;
                g->xd[((int64_t)v * g->nb + b) * 16 + j] = d;
                int32_t sum[2], hsum[2];
                for (int h = 0; h < 2; h++) {  /* columns 16 h ..: lrintf's rounding (to nearest even) */
                    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(a[h], _mm512_set1_ps(id)));
                    const __m512i hi = _mm512_srai_epi32(q, 8);  /* wide: x = 256 h + l, h = floor(q / 256) */
                    int32_t words[4], low[4];  /* vpmovdb keeps each lane's low byte: q itself, h, or l */
                    _mm_storeu_si128((__m128i *)words, _mm512_cvtepi32_epi8(wide ? hi : q));
                    if (wide) _mm_storeu_si128((__m128i *)low, _mm512_cvtepi32_epi8(q));
                    for (int w = 0; w < 4; w++) {
                        const int64_t quad = (int64_t)(b * 8 + h * 4 + w) * (wide ? 128 : 64);
                        __builtin_memcpy(pv + quad, words + w, 4);
                        if (wide) __builtin_memcpy(pv + quad + 64, low + w, 4);
                    }
                    sum[h] = _mm512_reduce_add_epi32(q), hsum[h] = wide ? _mm512_reduce_add_epi32(hi) : 0;
                }
                for (int s = 0; s < 32 / sb; s++) {
                    const int32_t total = sb == 32 ? sum[0] + sum[1] : sum[s];
                    const int32_t htotal = sb == 32 ? hsum[0] + hsum[1] : hsum[s];
                    const int64_t at = ((int64_t)v * g->nsb + b * (32 / sb) + s) * 16 + j;
                    g->xs[at] = (float)total * d;  /* x as rounded, for the offsets too (wide: unused, no offsets) */
                    g->qs[at] = wide ? htotal : total;
                }
            }
        }
    }
    return 1;
}

/* A panel of W for one chunk of K: GM_NR rows of `kc` codes as bytes (`wp`, rows GM_ROW apart; int8 + 128,
   and with `wide` x then as stored from row GM_NR), their sub-blocks' scales `ps` and offsets `pz` (kc / sb,
   GM_NR) as floats. Rows past N: zeros (their sums are dropped). */
typedef struct {
    int kind;                    /* GM_INT4: `codes` packed (q4_kernel.pack), `high` its fifth bits or NULL; */
    const uint8_t *codes, *high; /* GM_INT8: int8 codes (N, K) with `scale` per row or block scales */
    const uint16_t *sz;          /* int4: scale_zero (N, 2, ngp), or (N, 1, ngp) with `flags` set (Q4_MID_ZERO);
                                    K-quants: d (N, K / 256, 1 or 2: d, dmin) */
    int G, ngp;
    const float *scale;          /* int8 per row */
    const uint16_t *bscale;      /* int8 blocks: (N, planes, nbs), `flags` as zen_q8b_linear */
    int flags, nbs;              /* K-quants: flags = their KQ_* kind; int4: 1 where Q4_MID_ZERO (no zero plane) */
    const uint8_t *sc;           /* K-quants: sub-scale planes (N, 2, nbs); `high` their bit planes (kquant_kernel.pack) */
} gw_t;
enum { GM_INT4 = 0, GM_INT8 = 1, GM_KQ = 2 };

/* A K-quant block's scales and offsets (kq_block_scales) as the panel's sub-block ones at block b of the
   chunk: Q6_K per 16 columns, Q4_K / Q5_K per 32. */
INLINE void kq_panel_scales(int kind, const float *scale, const float *offset, int b, float *s, float *z) {
    if (kind == KQ_Q6K) {
        s[2 * b * GM_NR] = scale[0], s[(2 * b + 1) * GM_NR] = scale[1];
        z[2 * b * GM_NR] = offset[0], z[(2 * b + 1) * GM_NR] = offset[1];
    } else {
        s[b * GM_NR] = scale[0], z[b * GM_NR] = offset[0];
    }
}

/* kq_block_scales of the 16 blocks of a whole panel (from block bk; kq_scale_vectors, as kq_tile takes them) into
   the panel's slots from block b. */
INLINE void kq_panel_scales16(const kq_t *r, int K, int bk, int b, float *s, float *z) {
    __m512 v[4];  /* sa, sb, za, zb */
    if (r->kind == KQ_Q6K) kq_scale_vectors(KQ_Q6K, r, kq_nbp(K), bk, 16, v, v + 1, v + 2, v + 3);
    else kq_scale_vectors(KQ_Q4K, r, kq_nbp(K), bk, 16, v, v + 1, v + 2, v + 3);  /* Q5_K's scales are Q4_K's */
    float t[4][16];
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(t[i], v[i]);
    for (int i = 0; i < 16; i++) {
        const float scale[2] = {t[0][i], t[1][i]}, offset[2] = {t[2][i], t[3][i]};
        kq_panel_scales(r->kind, scale, offset, b + i, s, z);
    }
}

static void gemm_panel(const gw_t *w, int N, int K, int n0, int c0, int kc, int sb, int wide, uint8_t *wp,
                       float *ps, float *pz) {
    const int nsbc = kc / sb;
    for (int r = 0; r < GM_NR; r++) {
        const int64_t n = n0 + r;
        uint8_t *dst = wp + r * GM_ROW;
        float *s = ps + r, *z = pz + r;  /* [i * GM_NR]: sub-block i */
        if (n >= N) {
            __builtin_memset(dst, 0, kc);
            if (wide) __builtin_memset(dst + GM_NR * GM_ROW, 0, kc);
            for (int i = 0; i < nsbc; i++) s[i * GM_NR] = z[i * GM_NR] = 0.0f;
            continue;
        }
        if (w->kind == GM_INT4) {  /* per block: byte j holds column j (low nibble) and j + 16 */
            const uint8_t *c = w->codes + n * (K / 2) + c0 / 2;
            const uint8_t *h = w->high ? w->high + n * high_stride(K) : 0;
            const uint16_t *sz = w->sz + n * (w->flags ? 1 : 2) * w->ngp;
            const int gs = __builtin_ctz(w->G / 32);  /* block -> group: G is 32, 64 or 128 */
            for (int b = 0; b < kc / 32; b++) {
                const int bk = c0 / 32 + b;
                if ((b & 3) == 0 && n + GM_NR < N)  /* the next panel's row (a thread's panels are consecutive): */
                    _mm_prefetch((const char *)(c + b * 16 + GM_NR * (K / 2)), _MM_HINT_T0);  /* DRAM latency */
                const __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
                __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(15));
                __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(15));
                if (h) {
                    lo = _mm_mask_add_epi8(lo, (__mmask16)high_bits16(h, bk, 0), lo, _mm_set1_epi8(16));
                    hi = _mm_mask_add_epi8(hi, (__mmask16)high_bits16(h, bk, 1), hi, _mm_set1_epi8(16));
                }
                _mm_storeu_si128((__m128i *)(dst + b * 32), lo);
                _mm_storeu_si128((__m128i *)(dst + b * 32 + 16), hi);
                const float sc = f16(sz[bk >> gs]);
                s[b * GM_NR] = sc;
                z[b * GM_NR] = w->flags ? q4_mid(h) * sc : f16(sz[w->ngp + (bk >> gs)]);
            }
        } else if (w->kind == GM_KQ) {  /* low nibbles plus the kind's bit planes; per sub-block the float scale
                                           and offset (Q6_K: -32 d sc per 16 columns; Q4_K / Q5_K: -dmin m per 32) */
            const kq_t wk = {w->flags, w->codes, w->high, w->sc, w->sz}, r = kq_row(&wk, K, n);
            const kq_t next = kq_row(&wk, K, n + GM_NR < N ? n + GM_NR : n);
            float scale[2], offset[2];
            for (int b = 0; b < kc / 32; b++) {
                const int bk = c0 / 32 + b;
                if (bk % 16 == 0 && K / 32 - bk >= 16 && kc / 32 - b >= 16) {  /* a whole panel in this chunk: in vectors */
                    /* the next panel's row, as for int4: its codes and bit planes here (Q6_K at 16 rows: -25%) */
                    for (int i = 0; i < 256; i += 64)
                        _mm_prefetch((const char *)(next.codes + bk * 16 + i), _MM_HINT_T0);
                    for (int i = 0; i < r.kind; i++)
                        _mm_prefetch((const char *)(next.high + i * high_stride(K) + bk * 4), _MM_HINT_T0);
                    kq_unpack_panel(&r, K, bk, dst + b * 32);
                    kq_panel_scales16(&r, K, bk, b, s, z);
                    b += 15;
                    continue;
                }
                kq_block(&r, K, bk, dst + b * 32, scale, offset);  /* the last panel of 8 blocks: block by block */
                kq_panel_scales(r.kind, scale, offset, b, s, z);
            }
        } else {  /* int8: + 128, as unsigned bytes */
            const uint8_t *c = w->codes + n * K + c0;
            for (int i = 0; i < kc; i += 32) {
                if ((i & 63) == 0 && n + GM_NR < N)  /* the next panel's row, as for int4 */
                    _mm_prefetch((const char *)(c + i + GM_NR * K), _MM_HINT_T0);
                const __m256i v = _mm256_loadu_si256((const __m256i *)(c + i));
                _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)));
                if (wide) _mm256_storeu_si256((__m256i *)(dst + GM_NR * GM_ROW + i), v);
            }
            if (w->scale) {
                for (int i = 0; i < nsbc; i++) s[i * GM_NR] = w->scale[n], z[i * GM_NR] = 0.0f;
            } else {
                const bscale_t bs = block_planes(w->bscale + n * block_stride(w->flags, w->nbs), w->flags, w->nbs);
                for (int i = 0; i < nsbc; i++) {
                    const int bk = (c0 + i * sb) / 32, second = sb == 16 && (i & 1);
                    s[i * GM_NR] = f16(second && bs.b ? bs.b[bk] : bs.a[bk]);
                    z[i * GM_NR] = bs.z ? f16(second && bs.zb ? bs.zb[bk] : bs.z[bk]) : 0.0f;
                }
            }
        }
    }
}

/* acc[r * stride + j] += (row r of the panel) . (row 16 v + j of x) over the chunk of kc columns from c0.
   Always inlined with constant SB, SIGNED (int8 codes + 128), OFFSETS and WIDE (int8 only: x in 16 bits,
   x = 256 h + l, the codes + 128 times h and l times the codes as stored, from row GM_NR of the panel). */
INLINE void gemm_tile(const int SB, const int SIGNED, const int OFFSETS, const int WIDE, const gx_t *g, int v,
                      int c0, int kc, const uint8_t *wp, const float *ps, const float *pz, float *acc, int64_t stride) {
    const int nsbc = kc / SB, K4 = g->nb * 8;  /* K / 4 */
    const int8_t *xp = g->planes + ((int64_t)v * K4 + c0 / 4) * (WIDE ? 128 : 64);
    const float *xd = g->xd + ((int64_t)v * g->nb + c0 / 32) * 16;
    const float *xs = g->xs + ((int64_t)v * g->nsb + c0 / SB) * 16;
    const int32_t *qs = g->qs + ((int64_t)v * g->nsb + c0 / SB) * 16;
    __m512 f[GM_NR];
    for (int r = 0; r < GM_NR; r++) f[r] = _mm512_loadu_ps(acc + r * stride);
    for (int s = 0; s < nsbc; s++) {
        __m512i a[GM_NR], al[GM_NR];  /* int8 codes: (w + 128) . x - 128 (sum of x), or of h */
        const __m512i qsum = _mm512_loadu_si512(qs + s * 16);
        const __m512i init = SIGNED ? _mm512_slli_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), qsum), 7)
                                    : _mm512_setzero_si512();
        for (int r = 0; r < GM_NR; r++) a[r] = init, al[r] = _mm512_setzero_si512();
        for (int q = 0; q < SB / 4; q++) {
            const int col = s * SB + 4 * q;
            const __m512i xv = _mm512_load_si512(xp + (int64_t)col * (WIDE ? 32 : 16));
            const __m512i xl = WIDE ? _mm512_load_si512(xp + (int64_t)col * 32 + 64) : xv;
            for (int r = 0; r < GM_NR; r++) {
                int32_t word, ws;
                __builtin_memcpy(&word, wp + r * GM_ROW + col, 4);
                a[r] = _mm512_dpbusd_epi32(a[r], _mm512_set1_epi32(word), xv);
                if (WIDE) {
                    __builtin_memcpy(&ws, wp + (GM_NR + r) * GM_ROW + col, 4);
                    al[r] = _mm512_dpbusd_epi32(al[r], xl, _mm512_set1_epi32(ws));
                }
            }
        }
        const __m512 xdv = _mm512_loadu_ps(xd + (s * SB / 32) * 16);
        for (int r = 0; r < GM_NR; r++) {
            const __m512 t = _mm512_cvtepi32_ps(WIDE ? _mm512_add_epi32(_mm512_slli_epi32(a[r], 8), al[r]) : a[r]);
            f[r] = _mm512_fmadd_ps(t, _mm512_mul_ps(_mm512_set1_ps(ps[s * GM_NR + r]), xdv), f[r]);
            if (OFFSETS) f[r] = _mm512_fmadd_ps(_mm512_set1_ps(pz[s * GM_NR + r]), _mm512_loadu_ps(xs + s * 16), f[r]);
        }
    }
    for (int r = 0; r < GM_NR; r++) _mm512_storeu_ps(acc + r * stride, f[r]);
}

/* gemm_tile with the layout's constants. */
static void gemm_tile_for(int sb, int signed_codes, int offsets, int wide, const gx_t *g, int v, int c0, int kc,
                          const uint8_t *wp, const float *ps, const float *pz, float *acc, int64_t stride) {
    #define GM_TILE(SB, SIGNED, OFFSETS, WIDE) \
        if (sb == SB && signed_codes == SIGNED && offsets == OFFSETS && wide == WIDE) { \
            gemm_tile(SB, SIGNED, OFFSETS, WIDE, g, v, c0, kc, wp, ps, pz, acc, stride); return; }
    GM_TILE(16, 0, 1, 0) GM_TILE(16, 1, 1, 0) GM_TILE(16, 1, 0, 0) GM_TILE(32, 1, 1, 0) GM_TILE(32, 1, 0, 0)
    GM_TILE(32, 0, 1, 0) GM_TILE(32, 1, 0, 1)
    #undef GM_TILE
}

static int gemm(int M, int N, int K, const void *x, int x_bf16, const gw_t *w, void *y, int y_bf16, int n_threads) {
    const int sb = (w->kind == GM_INT8 && w->bscale && (w->flags & 5)) || (w->kind == GM_KQ && w->flags == KQ_Q6K)
                   ? 16 : 32;  /* a scale or offset per 16 */
    const int offsets = w->kind == GM_INT4 || w->kind == GM_KQ || (w->bscale && (w->flags & 2));
    const int signed_codes = w->kind == GM_INT8;
    const int wide = signed_codes && w->scale;  /* --quant int8: x in 16 bits */
    if (M <= 0 || N <= 0) return 0;
    gx_t g;
    if (!gemm_prepare_x(M, K, x, x_bf16, sb, wide, &g, n_threads)) return -1;
    const int MP = g.nmv * 16;
    int kc = GM_X_BYTES / (MP * (wide ? 2 : 1)) / 32 * 32;  /* x's bytes */
    kc = kc < 32 ? 32 : kc > GM_KC ? GM_KC : kc;
    const int unit = w->kind == GM_KQ && kc >= 512 ? 512 : 32;  /* whole K-quant panels (16 blocks) where it can */
    const int chunks = (K + kc - 1) / kc;
    kc = ((K + chunks - 1) / chunks + unit - 1) / unit * unit;  /* as many chunks, of even sizes */
    kc = kc > K ? K : kc;
    int nch = (int)(GM_Y_BYTES / ((int64_t)MP * 4)) / (GM_NR * n_threads) * (GM_NR * n_threads);
    nch = nch < GM_NR * n_threads ? GM_NR * n_threads : nch;
    nch = nch > (N + GM_NR - 1) / GM_NR * GM_NR ? (N + GM_NR - 1) / GM_NR * GM_NR : nch;
    float *yt = calloc((size_t)nch * MP, sizeof(float));  /* (nch, MP): sums per row of W, rows of x */
    int failed = !yt;
    #pragma omp parallel num_threads(n_threads)
    {
        uint8_t *wp = aligned_alloc(64, (size_t)GM_NR * GM_ROW * (wide ? 2 : 1));
        float *ps = malloc(sizeof(float) * 2 * GM_NR * (kc / 16));  /* scales, then offsets */
        if (!wp || !ps) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        for (int n1 = 0; n1 < N && !failed; n1 += nch) {
            const int nn = N - n1 < nch ? N - n1 : nch, panels = (nn + GM_NR - 1) / GM_NR;
            #pragma omp for schedule(static)
            for (int i = 0; i < nch * MP; i++) yt[i] = 0.0f;
            for (int c0 = 0; c0 < K; c0 += kc) {
                const int k = K - c0 < kc ? K - c0 : kc;
                float *pz = ps + GM_NR * (k / sb);
                #pragma omp for schedule(static) nowait
                for (int p = 0; p < panels; p++) {
                    gemm_panel(w, n1 + nn, K, n1 + p * GM_NR, c0, k, sb, wide, wp, ps, pz);
                    for (int v = 0; v < g.nmv; v++) {
                        float *acc = yt + (int64_t)p * GM_NR * MP + v * 16;
                        gemm_tile_for(sb, signed_codes, offsets, wide, &g, v, c0, k, wp, ps, pz, acc, MP);
                    }
                }
            }
            #pragma omp barrier
            #pragma omp for schedule(static) collapse(2)
            for (int m0 = 0; m0 < M; m0 += 16)  /* transposed in blocks of 16 x 64: yt's lines read once */
                for (int b0 = 0; b0 < nn; b0 += 64)
                    for (int m = m0; m < (M < m0 + 16 ? M : m0 + 16); m++)
                        for (int n = b0; n < (nn < b0 + 64 ? nn : b0 + 64); n++)
                            store(y, y_bf16, (int64_t)m * N + n1 + n, yt[(int64_t)n * MP + m]);
        }
        free(wp);
        free(ps);
    }
    free(yt);
    gemm_free_x(&g);
    return failed ? -1 : 0;
}
#endif

/* 1 where the prompt GEMM is built (AVX-512 VNNI), else 0: the zen_*_gemm calls then return -2. */
int zen_gemm_available(void) {
#ifdef ZEN_VNNI
    return 1;
#else
    return 0;
#endif
}

/* The prompt GEMM for zen_q4_linear's, zen_q8_linear's and zen_q8b_linear's buffers (same arguments):
   0, -1 (no memory) or -2 (not built here). */
int zen_q4_gemm(int M, int N, int K, int G, const void *x, int x_bf16, const uint8_t *codes, const uint8_t *high,
                const uint16_t *scale_zero, void *y, int y_bf16, int n_threads) {
#ifdef ZEN_VNNI
    const int mid_zero = q4_planes(G) == 1;
    G &= ~Q4_MID_ZERO;
    const gw_t w = {GM_INT4, codes, high, scale_zero, G, (K / G + 7) & ~7, 0, 0, mid_zero, 0};
    return gemm(M, N, K, x, x_bf16, &w, y, y_bf16, n_threads);
#else
    return -2;
#endif
}

int zen_q8_gemm(int M, int N, int K, const void *x, int x_bf16, const int8_t *codes, const float *scale,
                void *y, int y_bf16, int n_threads) {
#ifdef ZEN_VNNI
    const gw_t w = {GM_INT8, (const uint8_t *)codes, 0, 0, 0, 0, scale, 0, 0, 0};
    return gemm(M, N, K, x, x_bf16, &w, y, y_bf16, n_threads);
#else
    return -2;
#endif
}

/* The prompt GEMM for zen_kq_linear's buffers (kquant_kernel.py; same arguments). */
int zen_kq_gemm(int kind, int M, int N, int K, const void *x, int x_bf16, const uint8_t *codes, const uint8_t *high,
                const uint8_t *sc, const uint16_t *d, void *y, int y_bf16, int n_threads) {
#ifdef ZEN_VNNI
    const gw_t w = {GM_KQ, codes, high, d, 0, 0, 0, 0, kind, kq_nbp(K), sc};
    return gemm(M, N, K, x, x_bf16, &w, y, y_bf16, n_threads);
#else
    return -2;
#endif
}

int zen_q8b_gemm(int M, int N, int K, const void *x, int x_bf16, const int8_t *codes, const uint16_t *bscale,
                 int flags, void *y, int y_bf16, int n_threads) {
#ifdef ZEN_VNNI
    const gw_t w = {GM_INT8, (const uint8_t *)codes, 0, 0, 0, 0, 0, bscale, flags, (K / 32 + 7) & ~7};
    return gemm(M, N, K, x, x_bf16, &w, y, y_bf16, n_threads);
#else
    return -2;
#endif
}
"""
