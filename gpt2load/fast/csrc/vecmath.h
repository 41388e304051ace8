/* Vector math shared by gemm.c and attend.c (AVX-512 builds). */
#ifndef GPT2LOAD_VECMATH_H
#define GPT2LOAD_VECMATH_H
#include <immintrin.h>

/* 2^t for t already clamped by the caller (NaN stays NaN): 2^n * e^(f ln 2) with n the nearest integer, |f| <= 1/2,
   and a degree-6 polynomial (relative error about 1e-7). */
static inline __m512 exp2_of(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#endif
