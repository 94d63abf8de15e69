"""The C source of the prompt GEMM: y = x W^T for many rows of x and a quantized W, in integers.

`q4_kernel` compiles it with its own source (whose helpers it uses) and calls it for a prompt's rows
(`q4_kernel.GEMM_MIN_ROWS` and up) where the CPU has AVX-512 VNNI. It takes every weight layout of the
decode kernels (int4 / int5 groups, int8 per row, int8 with block scales and offsets) and gives what
they give to float rounding: no weight is rounded to bfloat16 (what the dense GEMM needed), and the
integer dot products are exact.

How it is laid out, unlike the decode loops (which reduce each dot product along K inside a vector):
- the 16 lanes of a vector are 16 rows of x. x is rounded per block of 32 columns to int16 exactly as
  the row kernel does (max |x| -> 32767) and split as x = 256 h + l: h signed bytes, l unsigned, two
  planes stored per 16 rows and 4 columns as 64 bytes (lane j: row j's 4 columns), once per call;
- four consecutive codes of a row of W are one 32-bit word broadcast to all lanes. `vpdpbusd` takes
  unsigned bytes times signed ones: codes times h (codes unsigned: int4 / int5 as they are, int8 + 128,
  whose 128 x (sum of h) comes back from x's side) and l times codes (signed: as stored). Per 4 columns
  two instructions serve 16 rows x 4 columns, and the integer dot products are the row kernel's. A register tile holds 8 rows of W x 16 rows of x (16 int32 accumulators); per block of 32
  (or 16) columns the sums become floats times (scale of W's block) x (x's block scale), plus
  offset x (float sum of x over the block) where W has offsets.
Loops: K in chunks whose slice of x (all rows) stays in L2; per chunk, each thread unpacks its panels
of 8 rows of W (as unsigned bytes, L1) and runs every 16 rows of x past them; the sums accumulate in
a float (N, rows) buffer, transposed into y at the end.
"""

C_SOURCE = r"""
#ifdef ZEN_VNNI
#define GM_NR 8           /* rows of W per register tile (x 16 rows of x) */
#define GM_X_BYTES 393216 /* bytes of x's planes per chunk of K: what stays in L2 */
#define GM_Y_BYTES (32 << 20)  /* at most this many bytes of float sums at a time: N in pieces */

typedef struct {
    int nmv, nb, nsb;      /* 16-row vectors of x, blocks of 32, sub-blocks (of 16 or 32 columns) */
    int8_t *planes;        /* (nmv, K / 4, 2, 64): per 4 columns, h then l, lane j = row 16 v + j */
    float *xd, *xs;        /* (nmv, nb, 16) block scales; (nmv, nsb, 16) float sums of x per sub-block */
    int32_t *hs;           /* (nmv, nsb, 16) sums of h per sub-block (for int8 codes) */
} gx_t;

static void gemm_free_x(gx_t *g) { free(g->planes); free(g->xd); }

static int gemm_prepare_x(int M, int K, const void *x, int x_bf16, int sb, gx_t *g, int n_threads) {
    g->nmv = (M + 15) / 16, g->nb = K / 32, g->nsb = K / sb;
    g->planes = aligned_alloc(64, (size_t)g->nmv * K * 32);
    g->xd = calloc((size_t)g->nmv * 16 * (g->nb + 2 * g->nsb), sizeof(float));
    if (!g->planes || !g->xd) { gemm_free_x(g); return 0; }
    g->xs = g->xd + (int64_t)g->nmv * g->nb * 16;
    g->hs = (int32_t *)(g->xs + (int64_t)g->nmv * g->nsb * 16);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int v = 0; v < g->nmv; v++) {
        int8_t *pv = g->planes + (int64_t)v * K * 32;
        for (int j = 0; j < 16; j++) {
            const int64_t m = (int64_t)v * 16 + j;
            for (int b = 0; b < g->nb; b++) {
                float xr[32] = {0};  /* rows past M: zeros */
                int32_t q[32];
                if (m < M) load_block(x, x_bf16, m * K + b * 32, xr);
                g->xd[((int64_t)v * g->nb + b) * 16 + j] = round_block(xr, 32767.0f, q, 0);  /* as zen_q4_quantize_x */
                for (int s = 0; s < 32 / sb; s++) {
                    float sum = 0.0f;
                    int32_t hsum = 0;
                    for (int i = s * sb; i < (s + 1) * sb; i++) {
                        const int col = b * 32 + i;
                        int8_t *quad = pv + (int64_t)(col / 4) * 128 + j * 4 + col % 4;
                        quad[0] = (int8_t)(q[i] >> 8);  /* arithmetic shift: floor(q / 256) */
                        quad[64] = (int8_t)(q[i] & 255);
                        sum += xr[i];
                        hsum += q[i] >> 8;
                    }
                    const int64_t at = ((int64_t)v * g->nsb + b * (32 / sb) + s) * 16 + j;
                    g->xs[at] = sum;
                    g->hs[at] = hsum;
                }
            }
        }
    }
    return 1;
}

/* A panel of W for one chunk of K: GM_NR rows of `kc` codes (`wp`; int8: `kc` codes + 128, then `kc` as
   stored, a row 2 kc bytes), their sub-blocks' scales `ps` and offsets `pz` (GM_NR, kc / sb) as floats.
   Rows past N: zeros (their sums are dropped). */
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
    if (kind == KQ_Q6K) s[2 * b] = scale[0], s[2 * b + 1] = scale[1], z[2 * b] = offset[0], z[2 * b + 1] = offset[1];
    else s[b] = scale[0], z[b] = offset[0];
}

static void gemm_panel(const gw_t *w, int N, int K, int n0, int c0, int kc, int sb, uint8_t *wp, float *ps,
                       float *pz) {
    const int nsbc = kc / sb, row = w->kind == GM_INT8 ? 2 * kc : kc;
    for (int r = 0; r < GM_NR; r++) {
        const int64_t n = n0 + r;
        uint8_t *dst = wp + (int64_t)r * row;
        float *s = ps + (int64_t)r * nsbc, *z = pz + (int64_t)r * nsbc;
        if (n >= N) {
            __builtin_memset(dst, 0, row);
            for (int i = 0; i < nsbc; i++) s[i] = z[i] = 0.0f;
            continue;
        }
        if (w->kind == GM_INT4) {  /* per block: byte j holds column j (low nibble) and j + 16 */
            const uint8_t *c = w->codes + n * (K / 2) + c0 / 2;
            const uint8_t *h = w->high ? w->high + n * high_stride(K) : 0;
            const uint16_t *sz = w->sz + n * (w->flags ? 1 : 2) * w->ngp;
            for (int b = 0; b < kc / 32; b++) {
                const int bk = c0 / 32 + b;
                const __m128i raw = _mm_loadu_si128((const __m128i *)(c + b * 16));
                __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(15));
                __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(15));
                if (h) {
                    lo = _mm_mask_add_epi8(lo, (__mmask16)high_bits16(h, bk, 0), lo, _mm_set1_epi8(16));
                    hi = _mm_mask_add_epi8(hi, (__mmask16)high_bits16(h, bk, 1), hi, _mm_set1_epi8(16));
                }
                _mm_storeu_si128((__m128i *)(dst + b * 32), lo);
                _mm_storeu_si128((__m128i *)(dst + b * 32 + 16), hi);
                s[b] = f16(sz[bk * 32 / w->G]);
                z[b] = w->flags ? q4_mid(h) * s[b] : f16(sz[w->ngp + bk * 32 / w->G]);
            }
        } else if (w->kind == GM_KQ) {  /* low nibbles plus the kind's bit planes; per sub-block the float scale
                                           and offset (Q6_K: -32 d sc per 16 columns; Q4_K / Q5_K: -dmin m per 32) */
            const kq_t wk = {w->flags, w->codes, w->high, w->sc, w->sz}, r = kq_row(&wk, K, n);
            float scale[2], offset[2];
            for (int b = 0; b < kc / 32; b++) {
                const int bk = c0 / 32 + b;
                if (bk % 16 == 0 && K / 32 - bk >= 16 && kc / 32 - b >= 16) {  /* a whole panel in this chunk: in vectors */
                    kq_unpack_panel(&r, K, bk, dst + b * 32);
                    for (int i = 0; i < 16; i++) {
                        kq_block_scales(&r, K, bk + i, scale, offset);
                        kq_panel_scales(r.kind, scale, offset, b + i, s, z);
                    }
                    b += 15;
                    continue;
                }
                kq_block(&r, K, bk, dst + b * 32, scale, offset);  /* the last panel of 8 blocks: block by block */
                kq_panel_scales(r.kind, scale, offset, b, s, z);
            }
        } else {  /* int8: + 128 (unsigned bytes), then as stored */
            const int8_t *c = (const int8_t *)w->codes + n * K + c0;
            for (int i = 0; i < kc; i += 32) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(c + i));
                _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)));
                _mm256_storeu_si256((__m256i *)(dst + kc + i), v);
            }
            if (w->scale) {
                for (int i = 0; i < nsbc; i++) s[i] = w->scale[n], z[i] = 0.0f;
            } else {
                const bscale_t bs = block_planes(w->bscale + n * block_stride(w->flags, w->nbs), w->flags, w->nbs);
                for (int i = 0; i < nsbc; i++) {
                    const int bk = (c0 + i * sb) / 32, second = sb == 16 && (i & 1);
                    s[i] = f16(second && bs.b ? bs.b[bk] : bs.a[bk]);
                    z[i] = bs.z ? f16(second && bs.zb ? bs.zb[bk] : bs.z[bk]) : 0.0f;
                }
            }
        }
    }
}

/* acc[r * stride + j] += (row r of the panel) . (row 16 v + j of x) over the chunk of kc columns from c0.
   Always inlined with constant SB, SIGNED (int8 codes + 128) and OFFSETS. */
INLINE void gemm_tile(const int SB, const int SIGNED, const int OFFSETS, const gx_t *g, int v, int c0, int kc,
                      const uint8_t *wp, const float *ps, const float *pz, float *acc, int64_t stride) {
    const int nsbc = kc / SB, K4 = g->nb * 8;  /* K / 4 */
    const int8_t *xp = g->planes + ((int64_t)v * K4 + c0 / 4) * 128;
    const float *xd = g->xd + ((int64_t)v * g->nb + c0 / 32) * 16;
    const float *xs = g->xs + ((int64_t)v * g->nsb + c0 / SB) * 16;
    const int32_t *hs = g->hs + ((int64_t)v * g->nsb + c0 / SB) * 16;
    const int64_t row = SIGNED ? 2 * kc : kc;  /* a panel row's bytes */
    __m512 f[GM_NR];
    for (int r = 0; r < GM_NR; r++) f[r] = _mm512_loadu_ps(acc + r * stride);
    for (int s = 0; s < nsbc; s++) {
        __m512i ah[GM_NR], al[GM_NR];
        /* int8 codes: h . w = h . (w + 128) - 128 (sum of h) */
        const __m512i init = SIGNED ? _mm512_slli_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(hs + s * 16)), 7)
                                    : _mm512_setzero_si512();
        for (int r = 0; r < GM_NR; r++) ah[r] = init, al[r] = _mm512_setzero_si512();
        for (int q = 0; q < SB / 4; q++) {
            const int col = s * SB + 4 * q;
            const __m512i xh = _mm512_load_si512(xp + (int64_t)col * 32), xl = _mm512_load_si512(xp + (int64_t)col * 32 + 64);
            for (int r = 0; r < GM_NR; r++) {
                int32_t wu, ws;  /* the codes as unsigned bytes (times h) and as signed ones (times l) */
                __builtin_memcpy(&wu, wp + r * row + col, 4);
                if (SIGNED) __builtin_memcpy(&ws, wp + r * row + kc + col, 4);
                const __m512i u = _mm512_set1_epi32(wu), v = SIGNED ? _mm512_set1_epi32(ws) : u;
                ah[r] = _mm512_dpbusd_epi32(ah[r], u, xh);
                al[r] = _mm512_dpbusd_epi32(al[r], xl, v);
            }
        }
        const __m512 xdv = _mm512_loadu_ps(xd + (s * SB / 32) * 16);
        for (int r = 0; r < GM_NR; r++) {
            const __m512 t = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(ah[r], 8), al[r]));
            f[r] = _mm512_fmadd_ps(t, _mm512_mul_ps(_mm512_set1_ps(ps[r * nsbc + s]), xdv), f[r]);
            if (OFFSETS) f[r] = _mm512_fmadd_ps(_mm512_set1_ps(pz[r * nsbc + s]), _mm512_loadu_ps(xs + s * 16), f[r]);
        }
    }
    for (int r = 0; r < GM_NR; r++) _mm512_storeu_ps(acc + r * stride, f[r]);
}

static int gemm(int M, int N, int K, const void *x, int x_bf16, const gw_t *w, void *y, int y_bf16, int n_threads) {
    const int sb = (w->kind == GM_INT8 && w->bscale && (w->flags & 5)) || (w->kind == GM_KQ && w->flags == KQ_Q6K)
                   ? 16 : 32;  /* a scale or offset per 16 */
    const int offsets = w->kind == GM_INT4 || w->kind == GM_KQ || (w->bscale && (w->flags & 2));
    const int signed_codes = w->kind == GM_INT8;
    if (M <= 0 || N <= 0) return 0;
    gx_t g;
    if (!gemm_prepare_x(M, K, x, x_bf16, sb, &g, n_threads)) return -1;
    const int MP = g.nmv * 16;
    int kc = GM_X_BYTES / (MP * 2) / 32 * 32;  /* x's planes: 2 bytes an element */
    kc = kc >= 512 ? kc / 512 * 512 : kc;  /* whole K-quant panels (16 blocks) where the chunk holds some */
    kc = kc < 32 ? 32 : kc > K ? K : kc;
    int nch = (int)(GM_Y_BYTES / ((int64_t)MP * 4)) / (GM_NR * n_threads) * (GM_NR * n_threads);
    nch = nch < GM_NR * n_threads ? GM_NR * n_threads : nch;
    nch = nch > (N + GM_NR - 1) / GM_NR * GM_NR ? (N + GM_NR - 1) / GM_NR * GM_NR : nch;
    float *yt = calloc((size_t)nch * MP, sizeof(float));  /* (nch, MP): sums per row of W, rows of x */
    int failed = !yt;
    #pragma omp parallel num_threads(n_threads)
    {
        uint8_t *wp = aligned_alloc(64, (size_t)GM_NR * 2 * kc + 64);
        float *ps = malloc(sizeof(float) * 2 * GM_NR * (kc / 16));
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
                    gemm_panel(w, n1 + nn, K, n1 + p * GM_NR, c0, k, sb, wp, ps, pz);
                    for (int v = 0; v < g.nmv; v++) {
                        float *acc = yt + (int64_t)p * GM_NR * MP + v * 16;
                        if (sb == 16 && !signed_codes) {
                            gemm_tile(16, 0, 1, &g, v, c0, k, wp, ps, pz, acc, MP);
                        } else if (sb == 16) {
                            if (offsets) gemm_tile(16, 1, 1, &g, v, c0, k, wp, ps, pz, acc, MP);
                            else gemm_tile(16, 1, 0, &g, v, c0, k, wp, ps, pz, acc, MP);
                        } else if (signed_codes) {
                            if (offsets) gemm_tile(32, 1, 1, &g, v, c0, k, wp, ps, pz, acc, MP);
                            else gemm_tile(32, 1, 0, &g, v, c0, k, wp, ps, pz, acc, MP);
                        } else {
                            gemm_tile(32, 0, 1, &g, v, c0, k, wp, ps, pz, acc, MP);
                        }
                    }
                }
            }
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < nn; n++) store(y, y_bf16, (int64_t)m * N + n1 + n, yt[(int64_t)n * MP + m]);
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
