/* Small vector math shared by the kernels (included, never compiled on its own). */
#ifndef KVMESH_VEC_MATH_H
#define KVMESH_VEC_MATH_H
#include <stdint.h>

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e), an integer power
 * built in the exponent bits times a degree-6 polynomial on [-0.5, 0.5]. Relative error
 * below 2e-7; inputs under -87 give 0. */
#pragma omp declare simd
static inline float exp_neg(float x) {
    float t = x * 1.44269504088896341f;
    if (t < -126.0f) return 0.0f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 trick */
    float f = t - n;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { int32_t i; float f; } s = {.i = ((int32_t)n + 127) << 23};
    return p * s.f;
}

/* Software prefetch for the linears' weight streams: kv_prefetch_dist bytes ahead of the
 * packed weights being read, a quarter as far ahead of their scales (which advance a
 * quarter as fast or less); 0 turns it off (kernels_set_prefetch, KVMESH_PREFETCH). With
 * the hardware prefetchers alone, a one-row int4 layer streamed its weights at 13.5 GB/s
 * on a 2-core Xeon (AMX) whose memory reads 23 GB/s; 2048 bytes ahead, at 19-21 GB/s
 * (benchmarks/decode_step.py has the whole step, on and off). */
extern int64_t kv_prefetch_dist;

/* Prefetch the `bytes` from p + dist on, a line at a time (a hint: it never faults, even
 * past the end of an array). */
static inline void prefetch_lines(const void *p, int64_t bytes, int64_t dist) {
    if (dist <= 0) return;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + dist + i, 0, 3);
}

/* The distance in force: read once per block or tile call, outside the loops over the
 * weights (read inside them, GCC dropped the prefetches). small_linear.c's fixed 1 KiB
 * prefetch follows it too (dense bf16, one row, from memory: 18.3-18.6 GB/s without,
 * 20.5-21.3 at 1 KiB, 21.5-22.0 at 2 KiB). */
static inline int64_t prefetch_distance(void) {
    return __atomic_load_n(&kv_prefetch_dist, __ATOMIC_RELAXED);
}

/* The 64-byte tile configuration AMX's ldtilecfg reads (palette 1): per tile register, its
 * rows and bytes per row. Shared by the kernels that use the tiles. */
struct amx_tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)h << 16};
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    union { uint32_t u; float f; } c = {.f = f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* For _mm512_permutexvar_epi16: the words of a vector's two halves interleaved (a[0], b[0],
 * a[1], b[1], ...), which makes bf16 pairs of two 16-word rows for a tile product. */
static inline __m512i interleave_halves16(void) {
    uint16_t order[32];
    for (int c = 0; c < 16; c++) order[2 * c] = (uint16_t)c, order[2 * c + 1] = (uint16_t)(16 + c);
    return _mm512_loadu_si512(order);
}

/* e^x for x <= 0, 16 lanes: 2^(x log2 e) = 2^n * 2^f, a degree-6 polynomial for 2^f. */
static inline __m512 exp_neg16(__m512 x) {
    const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _mm512_set1_ps(-150.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#endif
