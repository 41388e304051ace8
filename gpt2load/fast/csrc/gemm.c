/* Prompts in bfloat16: y = x w^T + bias (then tanh-GELU if asked), x [M, K] and w [N, K] bfloat16, float32 sums.

   On a CPU with AVX512-BF16 but no AMX, one bfloat16 pair product instruction does twice the arithmetic of a
   float32 multiply-add in the same time, so a bfloat16 prompt can be at most twice as fast as a float32 one, and
   only if its matmuls reach the same share of that peak. oneDNN's bfloat16 matmul reorders the whole weight at
   every call and then reaches about 87% of the peak here (float32: 90%). This kernel packs one panel of 64
   weight rows at a time (pairs of k interleaved, 16 rows by 16 pairs transposed in registers: well under 1% of
   the panel's arithmetic), keeps the panel in L2 while every 6 rows of x pass over it, and adds the bias and
   the GELU before rounding, in registers. Threads take panels. N must be a multiple of 16 and K even; only
   AVX512-BF16 builds have it (elsewhere gpt2load_gemm returns 2 and gpt2load uses torch's matmul). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__)
#include "vecmath.h"

#define MR 6  /* rows of x per tile */
#define NV 4  /* vectors of 16 output columns per panel */
#define NP 64 /* columns per panel */

/* 16 x 16 32-bit elements transposed: r[i] holds row i, afterwards column i. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + j], 128-bit lane L: rows 4i .. 4i + 3 of column 4L + j */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) { /* gather lane L of r[j], r[4 + j], r[8 + j], r[12 + j] into column 4L + j */
        const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
        const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
        const __m512i d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
        t[j] = _mm512_shuffle_i32x4(a, c, 0x88);
        t[8 + j] = _mm512_shuffle_i32x4(a, c, 0xdd);
        t[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(b, d, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Weight rows n0 .. n0 + 16 nv - 1 as pk[p][c] = (w[n0 + c][2p], w[n0 + c][2p + 1]), rows NP apart. */
static void pack(const uint16_t *w, int64_t K, int64_t n0, int nv, uint32_t *pk) {
    const int64_t K2 = K / 2, full = K2 / 16 * 16;
    for (int c0 = 0; c0 < 16 * nv; c0 += 16) {
        const uint32_t *src = (const uint32_t *)(w + (n0 + c0) * K);
        for (int64_t p0 = 0; p0 < full; p0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + i * K2 + p0);
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(pk + (p0 + i) * NP + c0, r[i]);
        }
        for (int64_t p = full; p < K2; p++) /* (memcpy: w may be only 2-byte aligned) */
            for (int i = 0; i < 16; i++) memcpy(pk + p * NP + c0 + i, src + i * K2 + p, 4);
    }
}

static inline __m512 exp_clamped(__m512 x) { /* e^x: 2^-127 at least, infinity past 2^128 (t clamped so that the
                                                 fraction stays finite) */
    /* MINPS and MAXPS return their second operand when either is NaN: x second, so NaN stays NaN */
    return exp2_of(_mm512_min_ps(_mm512_set1_ps(1000.0f),
                                 _mm512_max_ps(_mm512_set1_ps(-127.0f), _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)))));
}

/* GPT-2's GELU, 0.5 v (1 + tanh(u)) with u = sqrt(2/pi) (v + 0.044715 v^3), written as v / (1 + e^(-2u)): v far
   above 0, and -0 far below (e^(-2u) is infinite there). */
static inline __m512 gelu_tanh(__m512 v) {
    const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 u2 = _mm512_mul_ps(_mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v), _mm512_set1_ps(-1.5957691216f));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_clamped(u2)));
}

/* y rows r < mr, vectors c < nv of one tile: sums over all of K against the packed panel. */
static inline __attribute__((always_inline)) void tile(const int mr, const int nv, const uint16_t *x, int64_t xs,
                                                       const uint32_t *pk, int64_t K2, const float *bias, int gelu,
                                                       uint16_t *y, int64_t ys) {
    __m512 acc[MR][NV];
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K2; p++) {
        __m512i wv[NV];
        for (int c = 0; c < nv; c++) wv[c] = _mm512_loadu_si512(pk + p * NP + 16 * c);
        for (int r = 0; r < mr; r++) {
            int32_t pair;
            memcpy(&pair, x + r * xs + 2 * p, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            for (int c = 0; c < nv; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xb, (__m512bh)wv[c]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nv; c++) {
            __m512 v = bias ? _mm512_add_ps(acc[r][c], _mm512_loadu_ps(bias + 16 * c)) : acc[r][c];
            if (gelu) v = gelu_tanh(v);
            _mm256_storeu_si256((__m256i *)(y + r * ys + 16 * c), (__m256i)_mm512_cvtneps_pbh(v));
        }
}

#define BY_MR(NVV)                                                                                                   \
    switch (mr) {                                                                                                    \
    case 1: tile(1, NVV, xr, K, pk, K2, bp, gelu, yr, N); break;                                                     \
    case 2: tile(2, NVV, xr, K, pk, K2, bp, gelu, yr, N); break;                                                     \
    case 3: tile(3, NVV, xr, K, pk, K2, bp, gelu, yr, N); break;                                                     \
    case 4: tile(4, NVV, xr, K, pk, K2, bp, gelu, yr, N); break;                                                     \
    case 5: tile(5, NVV, xr, K, pk, K2, bp, gelu, yr, N); break;                                                     \
    default: tile(6, NVV, xr, K, pk, K2, bp, gelu, yr, N); break;                                                    \
    }

int gpt2load_gemm_supported(void) { return 1; }

/* x [M, K], w [N, K], y [M, N] contiguous bfloat16; bias [N] bfloat16 or NULL. N a multiple of 16, K even.
   Returns 0, or 1 when out of memory. */
int gpt2load_gemm(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
                  int64_t K, int gelu, int threads) {
    const int64_t K2 = K / 2, panels = (N + NP - 1) / NP;
    int failed = 0;
    if (M <= 0 || N <= 0) return 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        uint32_t *pk = (uint32_t *)aligned_alloc(64, (size_t)(K2 * NP) * 4 + 64);
        if (!pk) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t panel = 0; panel < panels; panel++) {
            if (!pk) continue;
            const int64_t n0 = panel * NP;
            const int nv = (int)((N - n0 < NP ? N - n0 : NP) / 16);
            float b32[NP];
            const float *bp = NULL;
            if (bias) {
                for (int c = 0; c < 16 * nv; c++) {
                    const uint32_t bits = (uint32_t)bias[n0 + c] << 16;
                    memcpy(b32 + c, &bits, 4);
                }
                bp = b32;
            }
            pack(w, K, n0, nv, pk);
            /* while this panel is used, the next one (this thread's: static schedule) is fetched into L2, a share
               per tile: its weight rows are contiguous (2% on the 124M shapes' prompts) */
            const int64_t tiles = (M + MR - 1) / MR, rest = N - n0 - NP;
            const int64_t ahead = rest > 0 ? (rest < NP ? rest : NP) * K * 2 : 0;
            const int64_t share = ((ahead + tiles - 1) / tiles + 63) / 64 * 64;
            const char *next = (const char *)(w + (n0 + NP) * K);
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                const int mr = (int)(M - m0 < MR ? M - m0 : MR);
                const int64_t from = m0 / MR * share, to = from + share < ahead ? from + share : ahead;
                for (int64_t off = from; off < to; off += 64) _mm_prefetch(next + off, _MM_HINT_T1);
                const uint16_t *xr = x + m0 * K;
                uint16_t *yr = y + m0 * N + n0;
                if (nv == 4) {
                    BY_MR(4)
                } else if (nv == 3) {
                    BY_MR(3)
                } else if (nv == 2) {
                    BY_MR(2)
                } else {
                    BY_MR(1)
                }
            }
        }
        free(pk);
    }
    return failed;
}

#else

int gpt2load_gemm_supported(void) { return 0; }

int gpt2load_gemm(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M, int64_t N,
                  int64_t K, int gelu, int threads) {
    (void)x, (void)w, (void)bias, (void)y, (void)M, (void)N, (void)K, (void)gelu, (void)threads;
    return 2;
}

#endif
