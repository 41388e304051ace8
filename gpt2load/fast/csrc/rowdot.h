/* Weight rows against a few rows of activations, streaming each weight row once: the vector types, dtype
   conversions and row kernels shared by gemv.c (one matmul) and block.c (a whole decoding block). For the CPU the
   library is built for: AVX-512, else AVX2 with FMA, else plain C. */
#ifndef GPT2LOAD_ROWDOT_H
#define GPT2LOAD_ROWDOT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline vec vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n for integral n in [-126, 127] */
static inline vec vpow2i(vec n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VL 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline vec vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2i(vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#else
#define VL 1
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vload_f32(const float *p) { return *p; }
static inline vec vload_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline vec vload_i8(const int8_t *p) { return (float)*p; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline vec vadd(vec a, vec b) { return a + b; }
static inline float vsum(vec a) { return a; }
static inline vec vset1(float a) { return a; }
static inline vec vmul(vec a, vec b) { return a * b; }
static inline vec vsub(vec a, vec b) { return a - b; }
static inline vec vdiv(vec a, vec b) { return a / b; }
static inline vec vmax(vec a, vec b) { return a > b ? a : b; }
static inline vec vmin(vec a, vec b) { return a < b ? a : b; }
static inline void vstore(float *p, vec a) { *p = a; }
static inline vec vround(vec a) { return __builtin_roundevenf(a); }
static inline vec vpow2i(vec n) {
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

enum { F32 = 0, BF16 = 1, I8 = 2 };
#define MB 8 /* activation rows per pass over a weight row */
#define PREFETCH_BYTES 8192

static inline float bf16_to_f32(uint16_t u) {
    uint32_t bits = (uint32_t)u << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline __attribute__((always_inline)) vec load_w(const int wt, const void *w, int64_t off) {
    if (wt == F32) return vload_f32((const float *)w + off);
    if (wt == BF16) return vload_bf16((const uint16_t *)w + off);
    return vload_i8((const int8_t *)w + off);
}

#define WSIZE(wt) ((wt) == F32 ? 4 : (wt) == BF16 ? 2 : 1)
#define WADDR(wt, w, off) ((const char *)(w) + (off) * WSIZE(wt))

static inline float scalar_w(const int wt, const void *w, int64_t off) {
    if (wt == F32) return ((const float *)w)[off];
    if (wt == BF16) return bf16_to_f32(((const uint16_t *)w)[off]);
    return (float)((const int8_t *)w)[off];
}

/* Software prefetch into L2 (_MM_HINT_T1), 8 KB ahead of each weight row being read. Measured on an AVX-512
   EPYC: without it, a pass with several x rows computes and waits for memory in turn (8 rows: 31 ms for the
   124M matmuls, 23 ms with it); prefetching into L1 instead, or 2 KB ahead, gained little. */
#define PREFETCH(wt, w, off) __builtin_prefetch(WADDR(wt, w, off) + pf, 0, 2)

/* out[j] = sum_k x[j, k] * w[n, k] over k < K for j < mb (a constant once inlined); rows of w and x are `ld` apart
   (ld > K: one chunk of longer rows), and each weight row is prefetched `pf` bytes ahead. The row is read front to back, so each
   thread's share of the weight is one sequential stream; with few x rows, partial sums over U chunks at a time
   keep enough multiply-adds in flight. */
static inline __attribute__((always_inline)) void row(const int wt, const int mb, const void *w, int64_t n, int64_t ld,
                                                      int64_t K, int64_t pf, const float *x, float *out) {
    enum { U_MAX = 8 };
    const int U = mb == 1 ? 8 : mb == 2 ? 2 : 1;
    vec acc[U_MAX][MB];
    for (int u = 0; u < U; u++)
        for (int j = 0; j < mb; j++) acc[u][j] = vzero();
    const int64_t base = n * ld, step = (int64_t)VL * U, ku = K - K % step, kv = K - K % VL;
    for (int64_t k = 0; k < ku; k += step) {
        for (int u = 0; u < U; u++) {
            if (u * VL * WSIZE(wt) % 64 == 0) PREFETCH(wt, w, base + k + u * VL);
            vec wv = load_w(wt, w, base + k + u * VL);
            for (int j = 0; j < mb; j++) acc[u][j] = vfma(wv, vload_f32(x + j * ld + k + u * VL), acc[u][j]);
        }
    }
    for (int64_t k = ku; k < kv; k += VL) {
        vec wv = load_w(wt, w, base + k);
        for (int j = 0; j < mb; j++) acc[0][j] = vfma(wv, vload_f32(x + j * ld + k), acc[0][j]);
    }
    for (int j = 0; j < mb; j++) {
        for (int u = 1; u < U; u++) acc[0][j] = vadd(acc[0][j], acc[u][j]);
        float s = vsum(acc[0][j]);
        for (int64_t k = kv; k < K; k++) s += scalar_w(wt, w, base + k) * x[j * ld + k];
        out[j] = s;
    }
}

/* Rows n and n + 1 at once, for mb >= 2: each x load feeds two multiply-adds, which with 8 x rows is what keeps
   the arithmetic ahead of memory (8 rows: 20.5 ms instead of 23.8; 16 rows: 34 instead of 56). */
static inline __attribute__((always_inline)) void row_pair(const int wt, const int mb, const void *w, int64_t n,
                                                           int64_t ld, int64_t K, int64_t pf, const float *x,
                                                           float *out0, float *out1) {
    vec a[MB], b[MB];
    for (int j = 0; j < mb; j++) a[j] = b[j] = vzero();
    const int64_t base0 = n * ld, base1 = base0 + ld, kv = K - K % VL;
    for (int64_t k = 0; k < kv; k += VL) {
        PREFETCH(wt, w, base0 + k);
        PREFETCH(wt, w, base1 + k);
        const vec w0 = load_w(wt, w, base0 + k), w1 = load_w(wt, w, base1 + k);
        for (int j = 0; j < mb; j++) {
            const vec xv = vload_f32(x + j * ld + k);
            a[j] = vfma(w0, xv, a[j]);
            b[j] = vfma(w1, xv, b[j]);
        }
    }
    for (int j = 0; j < mb; j++) {
        float s0 = vsum(a[j]), s1 = vsum(b[j]);
        for (int64_t k = kv; k < K; k++) {
            s0 += scalar_w(wt, w, base0 + k) * x[j * ld + k];
            s1 += scalar_w(wt, w, base1 + k) * x[j * ld + k];
        }
        out0[j] = s0;
        out1[j] = s1;
    }
}

#define BY_MB(call)                                                            \
    switch (mb) {                                                              \
    case 1: call(1); break;                                                    \
    case 2: call(2); break;                                                    \
    case 3: call(3); break;                                                    \
    case 4: call(4); break;                                                    \
    case 5: call(5); break;                                                    \
    case 6: call(6); break;                                                    \
    case 7: call(7); break;                                                    \
    default: call(8); break;                                                   \
    }
#define BY_WT(call)                                                            \
    if (wt == F32) {                                                           \
        BY_MB(call##_F32)                                                      \
    } else if (wt == BF16) {                                                   \
        BY_MB(call##_BF16)                                                     \
    } else {                                                                   \
        BY_MB(call##_I8)                                                       \
    }
#define ONE_F32(m) row(F32, m, w, n, ld, K, pf, x, out0)
#define ONE_BF16(m) row(BF16, m, w, n, ld, K, pf, x, out0)
#define ONE_I8(m) row(I8, m, w, n, ld, K, pf, x, out0)
#define TWO_F32(m) row_pair(F32, m, w, n, ld, K, pf, x, out0, out1)
#define TWO_BF16(m) row_pair(BF16, m, w, n, ld, K, pf, x, out0, out1)
#define TWO_I8(m) row_pair(I8, m, w, n, ld, K, pf, x, out0, out1)

/* Weight rows n (and n + 1 when `two`) against mb <= MB rows of x: every case compiled with constants. */
static inline void rows(int wt, int mb, int two, const void *w, int64_t n, int64_t ld, int64_t K, int64_t pf,
                        const float *x, float *out0, float *out1) {
    if (two && mb > 1) {
        BY_WT(TWO)
    } else {
        BY_WT(ONE)
        if (two) {
            n += 1;
            out0 = out1;
            BY_WT(ONE)
        }
    }
}

#endif
