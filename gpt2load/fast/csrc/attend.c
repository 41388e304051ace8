/* Causal attention over bfloat16 queries, keys and values (prompts, chunks after a cache, new tokens): float32 sums.

   y[b, i, h, :] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j]) v[b, h, j], over keys j <= i + (Tk - Tq).
   torch's CPU flash attention gains little from bfloat16 (a 500-token prompt of the 124M shape: 6.1 ms per layer
   against 5.7 in float32), so a bfloat16 prompt spent a quarter of its time there. This kernel multiplies pairs
   of bfloat16 values into float32 sums (AVX512-BF16's dot-product instruction, or the same products in two
   float32 multiply-adds on AVX-512 without it): keys and values are first repacked so that one vector holds 16
   keys (or 16 dimensions) by 2, then each block of 8 queries takes its scores, an exact softmax over its row
   (probabilities rounded to bfloat16 for the second product, as flash attention does) and the weighted sum of
   values. Threads share the repacking, then take (head, query block) pairs, the longest rows first.
   Only AVX-512 builds have it; elsewhere gpt2load_attend returns 2 and gpt2load uses torch's attention. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include "vecmath.h"

#define QB 8 /* queries per block */

static inline __m512 even_f32(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
static inline __m512 odd_f32(__m512i pairs) {
    return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) { /* acc[l] += a[2l] b[2l] + a[2l+1] b[2l+1] */
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
    return _mm512_fmadd_ps(odd_f32(a), odd_f32(b), _mm512_fmadd_ps(even_f32(a), even_f32(b), acc));
#endif
}

static inline __m256i to_bf16(__m512 x) { /* round to nearest even; NaN stays NaN */
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

static inline __m512 exp_neg(__m512 x) { /* e^x for x <= 0 (2^-127 at least) */
    /* MAXPS returns its second operand when either is NaN: x second, so a NaN score stays NaN */
    return exp2_of(_mm512_max_ps(_mm512_set1_ps(-127.0f), _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f))));
}

static inline __m512i pair_at(const uint16_t *p) { /* two bfloat16 values, in every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Keys of one head as [key block of 16][D/2 pairs][16 keys][2], values as [key pair][D][2]; zeros past Tk. */
static void repack(const uint16_t *k, const uint16_t *v, int64_t kt, int64_t vt, int64_t Tk, int64_t D,
                   int64_t nkb, uint16_t *kp, uint16_t *vp) {
    memset(kp, 0, (size_t)(nkb * 16 * D) * 2);
    memset(vp, 0, (size_t)(nkb * 16 * D) * 2);
    for (int64_t j = 0; j < Tk; j++) {
        const uint16_t *kr = k + j * kt, *vr = v + j * vt;
        uint16_t *kb = kp + (j / 16) * 16 * D + (j % 16) * 2, *vb = vp + (j / 2) * 2 * D + (j % 2);
        for (int64_t p = 0; p < D / 2; p++) {
            kb[p * 32] = kr[2 * p];
            kb[p * 32 + 1] = kr[2 * p + 1];
        }
        for (int64_t d = 0; d < D; d++) vb[2 * d] = vr[d];
    }
}

/* Scores of queries i0 .. i0 + nq - 1 against one block of 16 keys, scaled, into s (rows `width` apart). With nq
   a constant once inlined, the sums stay in registers. */
static inline __attribute__((always_inline)) void scores(const int nq, const uint16_t *q, int64_t qt,
                                                         const uint16_t *kv, int64_t i0, int64_t D, float scale,
                                                         float *s, int64_t width) {
    __m512 acc[QB];
    for (int r = 0; r < nq; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < D / 2; p++) {
        const __m512i kk = _mm512_loadu_si512(kv + p * 32);
        for (int r = 0; r < nq; r++) acc[r] = dot_pairs(acc[r], pair_at(q + (i0 + r) * qt + 2 * p), kk);
    }
    for (int r = 0; r < nq; r++) _mm512_storeu_ps(s + r * width, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
}

/* y rows (yt apart) = probabilities (rows `width` apart, bfloat16) times values, nr <= 4 rows by nv <= 4 blocks
   of 16 dimensions, each row times its 1 / sum. Row r sees keys 0 .. n0 + r - 1: key pairs all rows see go
   through the pair products; past them each row adds only the keys it sees, so a NaN or infinity in a value it
   does not see cannot reach it (0 times NaN is NaN). */
static inline __attribute__((always_inline)) void values(const int nr, const int nv, const uint16_t *pr, int64_t width,
                                                         const uint16_t *vp, int64_t n0, int64_t D,
                                                         const float *inv, uint16_t *y, int64_t yt) {
    __m512 acc[4][4];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < n0 / 2; jp++) {
        __m512i vv[4];
        for (int c = 0; c < nv; c++) vv[c] = _mm512_loadu_si512(vp + (jp * D + c * 16) * 2);
        for (int r = 0; r < nr; r++) {
            const __m512i pp = pair_at(pr + r * width + 2 * jp);
            for (int c = 0; c < nv; c++) acc[r][c] = dot_pairs(acc[r][c], pp, vv[c]);
        }
    }
    for (int64_t j = n0 / 2 * 2; j < n0 + nr - 1; j++) { /* the keys only some rows see */
        for (int c = 0; c < nv; c++) {
            const __m512i vv = _mm512_loadu_si512(vp + ((j / 2) * D + c * 16) * 2);
            const __m512 vj = j % 2 ? odd_f32(vv) : even_f32(vv);
            for (int r = 0; r < nr; r++)
                if (j < n0 + r) {
                    const uint32_t bits = (uint32_t)pr[r * width + j] << 16;
                    float pj;
                    memcpy(&pj, &bits, 4);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(pj), vj, acc[r][c]);
                }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nv; c++)
            _mm256_storeu_si256((__m256i *)(y + r * yt + c * 16), to_bf16(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]))));
}

/* Queries i0 .. i0 + nq - 1 of one head; s: QB x (16 nkb) floats, pr: QB x (16 nkb) bfloat16 values. */
static void block(const uint16_t *q, int64_t qt, const uint16_t *kp, const uint16_t *vp, uint16_t *y, int64_t yt,
                  int64_t i0, int nq, int64_t off, int64_t D, float scale, float *s, uint16_t *pr) {
    const int64_t last = i0 + nq - 1 + off; /* the last key any of these queries sees */
    const int64_t nkb = last / 16 + 1, width = nkb * 16;
    for (int64_t kb = 0; kb < nkb; kb++) { /* scores: 16 keys by nq queries at a time */
        if (nq == QB)
            scores(QB, q, qt, kp + kb * 16 * D, i0, D, scale, s + kb * 16, width);
        else
            scores(nq, q, qt, kp + kb * 16 * D, i0, D, scale, s + kb * 16, width);
    }
    float inv[QB];
    for (int r = 0; r < nq; r++) { /* softmax over keys 0 .. n - 1 (the values product reads no further) */
        const float *sr = s + r * width;
        uint16_t *pr_r = pr + r * width;
        const int64_t n = i0 + r + off + 1, full = n / 16 * 16;
        const __mmask16 tail = (__mmask16)((1u << (n - full)) - 1);
        const __m512 none = _mm512_set1_ps(-__builtin_inff());
        __m512 mx = _mm512_mask_loadu_ps(none, tail, sr + full);
        for (int64_t j = 0; j < full; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < full; j += 16) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pr_r + j), to_bf16(e));
        }
        if (tail) {
            const __m512 e = _mm512_maskz_mov_ps(tail, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + full), m)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pr_r + full), to_bf16(e));
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    for (int64_t d0 = 0; d0 < D; d0 += 64) { /* weighted values: 4 x 16 dimensions by 4 queries at a time */
        const int nv = D - d0 >= 64 ? 4 : (int)((D - d0) / 16);
        for (int r0 = 0; r0 < nq; r0 += 4) {
            const int nr = nq - r0 < 4 ? nq - r0 : 4;
            const uint16_t *p0 = pr + r0 * width;
            uint16_t *y0 = y + (i0 + r0) * yt + d0;
            const int64_t n0 = i0 + r0 + off + 1; /* keys the tile's first row sees */
            if (nr == 4 && nv == 4)
                values(4, 4, p0, width, vp + d0 * 2, n0, D, inv + r0, y0, yt);
            else
                values(nr, nv, p0, width, vp + d0 * 2, n0, D, inv + r0, y0, yt);
        }
    }
}

int gpt2load_attend_supported(void) { return 1; }

/* q [B, H, Tq, D], k and v [B, H, Tk, D] given by element strides (b, h, t; the last dimension contiguous);
   y [B, Tq, H, D] contiguous. D a multiple of 16, Tk >= Tq. Returns 0, 1 when out of memory. */
int gpt2load_attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *y, int64_t B, int64_t H,
                    int64_t Tq, int64_t Tk, int64_t D, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                    float scale, int threads) {
    const int64_t nkb = (Tk + 15) / 16, head = nkb * 16 * D, nqb = (Tq + QB - 1) / QB, off = Tk - Tq;
    uint16_t *packed = (uint16_t *)malloc((size_t)(2 * B * H * head) * 2);
    if (!packed) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            repack(k + b * ks[0] + h * ks[1], v + b * vs[0] + h * vs[1], ks[2], vs[2], Tk, D, nkb,
                   packed + 2 * bh * head, packed + (2 * bh + 1) * head);
        }
        float *s = (float *)malloc((size_t)(QB * nkb * 16) * sizeof(float));
        uint16_t *pr = (uint16_t *)malloc((size_t)(QB * nkb * 16) * 2);
        if (!s || !pr) { /* this thread's blocks are left unwritten: the caller raises on the status */
#pragma omp atomic write
            failed = 1;
        }
        /* the last query blocks have the longest rows: they go first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < B * H * nqb; t++) {
            if (!s || !pr) continue;
            const int64_t qb = nqb - 1 - t / (B * H), bh = t % (B * H), b = bh / H, h = bh % H, i0 = qb * QB;
            const int nq = (int)(Tq - i0 < QB ? Tq - i0 : QB);
            block(q + b * qs[0] + h * qs[1], qs[2], packed + 2 * bh * head, packed + (2 * bh + 1) * head,
                  y + (b * Tq * H + h) * D, H * D, i0, nq, off, D, scale, s, pr);
        }
        free(s);
        free(pr);
    }
    free(packed);
    return failed;
}


/* Decoding in float32: one query per (batch row, head) over Tk keys, with an optional mask of the keys each row
   sees (mask[b * ms[0] + h * ms[1] + j] != 0; left-padded batches). torch's attention takes 90 us for 8 rows of
   12 heads over 60 keys and 0.3-0.4 ms inside a decoding step (the keys and values come from memory); this one
   streams them once per (row, head): scores, an exact softmax in float32, the weighted sum of the values (a key
   the row does not see is skipped, so a NaN there cannot reach it; a row that sees no key gets zeros, as
   torch's does). q [B, H, 1, D], k and v [B, H, Tk, D] by element strides (b, h[, t]), y [B, 1, H, D]
   contiguous; D a multiple of 16 up to 256. Returns 0, or 1 when out of memory. */
int gpt2load_attend_one(const float *q, const float *k, const float *v, const uint8_t *mask, float *y, int64_t B,
                        int64_t H, int64_t Tk, int64_t D, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                        const int64_t *ms, float scale, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *s = (float *)malloc((size_t)(Tk + 16) * sizeof(float));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!s) continue;
            const int64_t b = bh / H, h = bh % H;
            const float *qr = q + b * qs[0] + h * qs[1];
            const float *kh = k + b * ks[0] + h * ks[1], *vh = v + b * vs[0] + h * vs[1];
            const uint8_t *seen = mask ? mask + b * ms[0] + h * ms[1] : NULL;
            const __m512 none = _mm512_set1_ps(-__builtin_inff());
            __m512 mx = none;
            for (int64_t j0 = 0; j0 < Tk; j0 += 16) { /* scores, 16 keys at a time; unseen ones -inf */
                const int n = Tk - j0 < 16 ? (int)(Tk - j0) : 16;
                for (int i = 0; i < n; i++) {
                    const int64_t j = j0 + i;
                    if (seen && !seen[j]) {
                        s[j] = -__builtin_inff();
                        continue;
                    }
                    const float *kr = kh + j * ks[2];
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t d = 0; d < D; d += 16)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + d), _mm512_loadu_ps(kr + d), acc);
                    s[j] = scale * _mm512_reduce_add_ps(acc);
                }
                const __mmask16 lanes = (__mmask16)((1u << n) - 1);
                mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(none, lanes, s + j0));
            }
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j0 = 0; j0 < Tk; j0 += 16) { /* probabilities, exactly 0 for unseen keys */
                const __mmask16 lanes = (__mmask16)((1u << (Tk - j0 < 16 ? Tk - j0 : 16)) - 1);
                const __m512 sj = _mm512_mask_loadu_ps(none, lanes, s + j0);
                const __mmask16 seen16 = _mm512_cmp_ps_mask(sj, none, _CMP_NEQ_UQ); /* (NaN counts as seen) */
                const __m512 e = _mm512_maskz_mov_ps(seen16, exp_neg(_mm512_sub_ps(sj, m)));
                sum = _mm512_add_ps(sum, e);
                _mm512_mask_storeu_ps(s + j0, lanes, e);
            }
            const float total = _mm512_reduce_add_ps(sum);
            __m512 acc[16];
            for (int c = 0; c < D / 16; c++) acc[c] = _mm512_setzero_ps();
            for (int64_t j = 0; j < Tk; j++) {
                if (s[j] == 0.0f) continue;
                const float *vr = vh + j * vs[2];
                const __m512 p = _mm512_set1_ps(s[j]);
                for (int c = 0; c < D / 16; c++) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * c), acc[c]);
            }
            const __m512 inv = _mm512_set1_ps(total > 0.0f || total != total ? 1.0f / total : 0.0f);
            float *yr = y + (b * H + h) * D;
            for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(yr + 16 * c, _mm512_mul_ps(acc[c], inv));
        }
        free(s);
    }
    return failed;
}

#else

int gpt2load_attend_supported(void) { return 0; }

int gpt2load_attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *y, int64_t B, int64_t H,
                    int64_t Tq, int64_t Tk, int64_t D, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                    float scale, int threads) {
    (void)q, (void)k, (void)v, (void)y, (void)B, (void)H, (void)Tq, (void)Tk, (void)D, (void)qs, (void)ks, (void)vs;
    (void)scale, (void)threads;
    return 2;
}

int gpt2load_attend_one(const float *q, const float *k, const float *v, const uint8_t *mask, float *y, int64_t B,
                        int64_t H, int64_t Tk, int64_t D, const int64_t *qs, const int64_t *ks, const int64_t *vs,
                        const int64_t *ms, float scale, int threads) {
    (void)q, (void)k, (void)v, (void)mask, (void)y, (void)B, (void)H, (void)Tk, (void)D, (void)qs, (void)ks;
    (void)vs, (void)ms, (void)scale, (void)threads;
    return 2;
}

#endif
