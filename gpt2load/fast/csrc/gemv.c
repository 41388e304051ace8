/* A few rows of activations times a weight matrix, streaming the weight from memory once.

   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] + bias[n], for M <= 16 rows: decoding one token, a few beams or a
   small batch. The weight is float32, bfloat16 or int8 (per-row scales); x, bias and y are float32 or bfloat16;
   sums are float32. Threads (OpenMP: torch's own runtime, the same libgomp.so.1) take contiguous runs of weight
   rows, so each reads its share of the weight once, front to back; the x rows stay in L1.
   Built by gpt2load/native.py for the CPU it runs on (-march=native), loaded with ctypes. */

#include "rowdot.h"

/* y[m, n] for j < mb rows from m0: scale, bias, and the output dtype. */
static void store(int at, const float *scale, const void *bias, void *y, int64_t N, int64_t n, int64_t m0, int mb,
                  const float *out) {
    float add = 0.0f;
    if (bias) add = at == BF16 ? bf16_to_f32(((const uint16_t *)bias)[n]) : ((const float *)bias)[n];
    for (int j = 0; j < mb; j++) {
        const float v = (scale ? out[j] * scale[n] : out[j]) + add;
        const int64_t at_y = (m0 + j) * N + n;
        if (at == BF16)
            ((uint16_t *)y)[at_y] = f32_to_bf16(v);
        else
            ((float *)y)[at_y] = v;
    }
}

/* Returns 0, or 1 when out of memory (for x converted to float32). */
int gpt2load_gemv(int wt, const void *w, const float *scale, int at, const void *bias, const void *x, void *y,
                  int64_t M, int64_t N, int64_t K, int threads) {
    const float *xf = (const float *)x;
    float *owned = NULL;
    if (at == BF16) {
        owned = (float *)malloc((size_t)(M * K) * sizeof(float) + 1);
        if (!owned) return 1;
        for (int64_t i = 0; i < M * K; i++) owned[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = owned;
    }
    /* Threads take contiguous runs of row pairs. */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t pair = 0; pair < (N + 1) / 2; pair++) {
        const int64_t n = 2 * pair;
        const int two = n + 1 < N;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mb = (int)(M - m0 < MB ? M - m0 : MB);
            float out0[MB], out1[MB];
            rows(wt, mb, two, w, n, K, K, PREFETCH_BYTES, xf + m0 * K, out0, out1);
            store(at, scale, bias, y, N, n, m0, mb, out0);
            if (two) store(at, scale, bias, y, N, n + 1, m0, mb, out1);
        }
    }
    free(owned);
    return 0;
}
