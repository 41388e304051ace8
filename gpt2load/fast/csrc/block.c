/* One decoding step of a GPT-2 transformer block, for M <= 16 rows of one new token each, in one call.

   y = x2 + fc2(gelu(fc1(ln2(x2)))),  x2 = x + proj(attention(qkv(ln1(x)))), the new keys and values written into
   the cache at position `pos` and attended to with the `pos` before them (where the mask allows).

   Why one call: a decoding step of a small model is a few dozen matrix-vector products of well under a millisecond
   each; run as separate torch operations, every one pays the dispatch, an OpenMP fork and join, and on a 2-core
   machine the Python between them (the idle worker is descheduled meanwhile). Here the threads enter once per
   block and meet at six barriers; each streams its own contiguous share of every weight (rowdot.h), the
   LayerNorms, the softmax and the GELU run in float32 on data already in cache.

   Activations, biases and LayerNorm parameters arrive as float32 (x may be bfloat16: `at`), sums are float32;
   the cache is float32 or bfloat16 (`at`), the weights float32, bfloat16 or int8 with per-row scales (`wt`).
   Built by gpt2load/fast/native_build.py for the CPU it runs on, loaded with ctypes (gpt2load/fast/fused.py). */

#include <math.h>
#include <omp.h>

#include "rowdot.h"

enum { QKV = 0, PROJ = 1, FC1 = 2, FC2 = 3 };

typedef struct {
    int64_t d, heads, hd, ff; /* width, heads, head size, feed-forward width */
    int64_t wt;               /* dtype of the four weights */
    float eps1, eps2;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const void *w[4];      /* qkv [3d, d], proj [d, d], fc1 [ff, d], fc2 [d, ff] */
    const float *scale[4]; /* int8 per-row scales, else NULL */
    const float *bias[4];  /* or NULL */
} block_params;

/* e^x for x <= 88.7 (overflow: inf), to about 1e-7 relative: 2^n * e^f with n the nearest integer to x log2(e) and
   a degree-6 polynomial on |f| <= ln(2)/2. NaN stays NaN (max/min return their second operand on NaN). */
static inline vec vexp(vec x) {
    x = vmin(vset1(88.7f), vmax(vset1(-87.3f), x));
    const vec n = vround(vmul(x, vset1(1.44269504f)));
    const vec f = vsub(x, vmul(n, vset1(0.693147181f)));
    vec p = vset1(1.0f / 720);
    p = vfma(p, f, vset1(1.0f / 120));
    p = vfma(p, f, vset1(1.0f / 24));
    p = vfma(p, f, vset1(1.0f / 6));
    p = vfma(p, f, vset1(0.5f));
    p = vfma(p, f, vset1(1.0f));
    p = vfma(p, f, vset1(1.0f));
    return vmul(p, vpow2i(n));
}

/* GPT-2's tanh GELU: 0.5 u (1 + tanh(z)) = u / (1 + e^(-2z)), z = sqrt(2/pi) (u + 0.044715 u^3). */
static inline vec vgelu(vec u) {
    const vec u3 = vmul(vmul(u, u), u);
    const vec z2 = vmul(vset1(-1.5957691216f), vfma(vset1(0.044715f), u3, u));
    return vdiv(u, vadd(vset1(1.0f), vexp(z2)));
}

/* GELU of n < VL values through the vector code, so every value gets the same bits whichever thread's share
   (and so whichever thread count) it falls at the end of. */
static inline void gelu_tail(float *y, int64_t n) {
    float buf[VL] = {0};
    memcpy(buf, y, (size_t)n * sizeof(float));
    vstore(buf, vgelu(vload_f32(buf)));
    memcpy(y, buf, (size_t)n * sizeof(float));
}

/* y[m] = (x[m] - mean) / sqrt(var + eps) * w + b for M rows of d (biased variance, as torch). */
static void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t M, int64_t d, float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * d;
        float mean = 0.0f, var = 0.0f;
        for (int64_t i = 0; i < d; i++) mean += xr[i];
        mean /= (float)d;
        for (int64_t i = 0; i < d; i++) var += (xr[i] - mean) * (xr[i] - mean);
        const float rstd = 1.0f / sqrtf(var / (float)d + eps);
        for (int64_t i = 0; i < d; i++) y[m * d + i] = (xr[i] - mean) * rstd * w[i] + b[i];
    }
}

/* This thread's contiguous share [lo, hi) of n items. */
static inline void share(int64_t n, int64_t *lo, int64_t *hi) {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

/* x rows of more than this many bytes (several rows of a long input: the second feed-forward matmul's) are taken
   in chunks of k: read whole, they would leave L1 at every weight row pair and come back from L2 (8 rows of 3072:
   the 124M fc2 took 2.4x its one-row time, mostly waiting on L2). */
#define X_CHUNK_BYTES 24576

/* y[m, n] = scale[n] * x[m] . w[n] + bias[n] (+ res[m, n]) for this thread's share of the weight rows (taken in
   pairs, see rowdot.h), then GELU over those columns when asked. The caller places the barrier. */
static void matmul(int wt, const void *w, const float *scale, const float *bias, const float *x, int64_t M,
                   int64_t N, int64_t K, const float *res, int gelu, float *y) {
    int64_t lo, hi;
    share((N + 1) / 2, &lo, &hi);
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = (int)(M - m0 < MB ? M - m0 : MB);
        int64_t kc = K, pf = PREFETCH_BYTES;
        if (mb > 2 && (int64_t)mb * K * 4 > X_CHUNK_BYTES) { /* chunks of whole vectors; the next pair prefetched */
            kc = X_CHUNK_BYTES / (4 * mb) / (4 * VL) * (4 * VL);
            pf = 2 * K * WSIZE(wt);
        }
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            const int64_t len = K - k0 < kc ? K - k0 : kc;
            const void *wk = WADDR(wt, w, k0);
            for (int64_t pair = lo; pair < hi; pair++) {
                const int64_t n = 2 * pair;
                const int two = n + 1 < N;
                float out[2][MB];
                rows(wt, mb, two, wk, n, K, len, pf, x + m0 * K + k0, out[0], out[1]);
                for (int i = 0; i <= two; i++) {
                    const int64_t c = n + i;
                    for (int j = 0; j < mb; j++) {
                        const int64_t at = (m0 + j) * N + c;
                        if (k0 == 0)
                            y[at] = out[i][j];
                        else
                            y[at] += out[i][j];
                    }
                }
            }
        }
        for (int64_t pair = lo; pair < hi; pair++) /* scale, bias and residual once the sums are whole */
            for (int64_t c = 2 * pair; c < 2 * pair + 2 && c < N; c++) {
                const float sc = scale ? scale[c] : 1.0f, add = bias ? bias[c] : 0.0f;
                for (int j = 0; j < mb; j++) {
                    const int64_t at = (m0 + j) * N + c;
                    y[at] = y[at] * sc + add + (res ? res[at] : 0.0f);
                }
            }
    }
    if (!gelu) return;
    const int64_t c0 = 2 * lo, c1 = 2 * hi < N ? 2 * hi : N;
    for (int64_t m = 0; m < M; m++) {
        float *yr = y + m * N;
        int64_t c = c0;
        for (; c + VL <= c1; c += VL) vstore(yr + c, vgelu(vload_f32(yr + c)));
        if (c < c1) gelu_tail(yr + c, c1 - c);
    }
}

static inline float at_load(int at, const void *p, int64_t i) {
    return at == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void at_store(int at, void *p, int64_t i, float v) {
    if (at == BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline vec at_vload(int at, const void *p, int64_t i) {
    return at == BF16 ? vload_bf16((const uint16_t *)p + i) : vload_f32((const float *)p + i);
}

/* One row and head: the new key and value into the cache at `pos`, then softmax(q . k / sqrt(hd)) . v over the
   keys `seen` allows (all when NULL); a row that sees none gets zeros. s: scratch for pos + 1 scores. */
static void attend(int at, const float *q, const float *knew, const float *vnew, void *kc, void *vc, int64_t ts,
                   int64_t pos, int64_t hd, const uint8_t *seen, float *s, float *out) {
    for (int64_t i = 0; i < hd; i++) {
        at_store(at, kc, pos * ts + i, knew[i]);
        at_store(at, vc, pos * ts + i, vnew[i]);
    }
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t hv = hd - hd % VL;
    float mx = -INFINITY;
    int any = 0;
    for (int64_t t = 0; t <= pos; t++) {
        if (seen && !seen[t]) continue;
        vec acc = vzero();
        for (int64_t i = 0; i < hv; i += VL) acc = vfma(vload_f32(q + i), at_vload(at, kc, t * ts + i), acc);
        float dot = vsum(acc);
        for (int64_t i = hv; i < hd; i++) dot += q[i] * at_load(at, kc, t * ts + i);
        s[t] = dot * scale;
        mx = any && !(s[t] > mx) ? mx : s[t]; /* (a NaN score makes the row NaN, as torch's softmax does) */
        any = 1;
    }
    for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
    if (!any) return;
    float total = 0.0f;
    for (int64_t t = 0; t <= pos; t++) {
        if (seen && !seen[t]) continue;
        s[t] = expf(s[t] - mx);
        total += s[t];
    }
    const float inv = 1.0f / total;
    for (int64_t t = 0; t <= pos; t++) {
        if (seen && !seen[t]) continue;
        const vec p = vset1(s[t] * inv);
        for (int64_t i = 0; i < hv; i += VL) vstore(out + i, vfma(p, at_vload(at, vc, t * ts + i), vload_f32(out + i)));
        for (int64_t i = hv; i < hd; i++) out[i] += s[t] * inv * at_load(at, vc, t * ts + i);
    }
}

/* The block for M rows of x (dtype `at`) into y (same dtype). kc/vc: this layer's cache [B, H, max, hd] in `at`,
   cs its strides (row, head, position). mask: bool [B or 1, H or 1, 1, pos + 1] with strides ms (0 for a broadcast
   dimension), or NULL. Returns 0, or 1 when out of memory. */
int gpt2load_block(const block_params *p, int at, const void *x, void *y, int64_t M, void *kc, void *vc,
                   const int64_t *cs, int64_t pos, const uint8_t *mask, const int64_t *ms, int threads) {
    const int64_t d = p->d, H = p->heads, hd = p->hd, ff = p->ff;
    const int wt = (int)p->wt;
    const size_t floats = (size_t)(M * (5 * d + 3 * d + ff) + (int64_t)threads * (pos + 1 + 16));
    float *buf = (float *)malloc(floats * sizeof(float));
    if (!buf) return 1;
    float *xf = buf, *h = xf + M * d, *qkv = h + M * d, *att = qkv + M * 3 * d, *x2 = att + M * d;
    float *f = x2 + M * d, *out = f + M * ff, *scores = out + M * d;
    const char esize = at == BF16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        {
            for (int64_t i = 0; i < M * d; i++) xf[i] = at_load(at, x, i);
            layer_norm(xf, p->ln1_w, p->ln1_b, p->eps1, M, d, h);
        }
        matmul(wt, p->w[QKV], p->scale[QKV], p->bias[QKV], h, M, 3 * d, d, NULL, 0, qkv);
#pragma omp barrier
        float *s = scores + (int64_t)omp_get_thread_num() * (pos + 1 + 16);
#pragma omp for schedule(static)
        for (int64_t mh = 0; mh < M * H; mh++) {
            const int64_t m = mh / H, hh = mh % H;
            const float *row = qkv + m * 3 * d + hh * hd;
            const int64_t cache_at = (m * cs[0] + hh * cs[1]) * esize;
            const uint8_t *seen = mask ? mask + m * ms[0] + hh * ms[1] : NULL;
            attend(at, row, row + d, row + 2 * d, (char *)kc + cache_at, (char *)vc + cache_at, cs[2], pos, hd, seen,
                   s, att + m * d + hh * hd);
        }
        matmul(wt, p->w[PROJ], p->scale[PROJ], p->bias[PROJ], att, M, d, d, xf, 0, x2);
#pragma omp barrier
#pragma omp single
        layer_norm(x2, p->ln2_w, p->ln2_b, p->eps2, M, d, h);
        matmul(wt, p->w[FC1], p->scale[FC1], p->bias[FC1], h, M, ff, d, NULL, 1, f);
#pragma omp barrier
        matmul(wt, p->w[FC2], p->scale[FC2], p->bias[FC2], f, M, d, ff, x2, 0, out);
#pragma omp barrier
        int64_t lo, hi;
        share(M * d, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) at_store(at, y, i, out[i]);
    }
    free(buf);
    return 0;
}
