/* RMSNorm and rotary embeddings over bf16 rows, for a bf16 model's torch path (prefill
 * chunks and mixed steps, model/llama.py through model/native_ops.py). torch runs them as
 * slow bf16 kernels (rms_norm) or several of them (rope: a multiply, a negation, a
 * concatenation, a second multiply and an add); here each is one pass over the rows. On a
 * 512-token chunk of the default model (2 Xeon threads, benchmarks/prefill_cpu.py): RMSNorm
 * 65 against 246 us, rope 127 against 303.
 *
 * rmsnorm_bf16: per row, inv = 1 / sqrt(mean(x^2) + eps) and out = (x * inv) * w, in
 * float32, rounded to bf16 once: torch's fused rms_norm's arithmetic, up to the order of
 * the sum of squares (so a value may land one bf16 step away, rarely).
 * rope_bf16: out = x * cos + rotate_half(x) * sin with a bf16 rounding after each multiply
 * and after the add, exactly as torch evaluates `apply_rope` on bf16 tensors (a product of
 * two bf16 values is exact in float32, so the result is bit for bit torch's).
 * Rows are split across threads where there are enough of them. Returns non-zero on a shape
 * it does not support.
 */
#include <math.h>
#include <stdint.h>

#include "vec_math.h" /* bf16_to_f32, f32_to_bf16 */

#define MIN_PARALLEL 16384 /* elements: fewer run on one thread */
/* 512-bit vectors where the ISA has them (-march=native prefers 256): about 1.4x and 1.6x
 * faster RMSNorm and rope than with 256-bit ones on the Xeon */
#if defined(__GNUC__) && !defined(__clang__)
#define WIDE __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE
#endif

static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

WIDE int rmsnorm_bf16(const uint16_t *x, int64_t rows, int64_t n, const uint16_t *w, float eps,
                      uint16_t *out) {
    if (rows < 0 || n <= 0) return 1;
#pragma omp parallel for schedule(static) if (rows * n >= MIN_PARALLEL)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n;
        uint16_t *yr = out + r * n;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) {
            const float v = bf16_to_f32(xr[i]);
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++)
            yr[i] = f32_to_bf16((bf16_to_f32(xr[i]) * inv) * bf16_to_f32(w[i]));
    }
    return 0;
}

/* x [tokens][heads][dim] with `x_stride` elements between tokens (heads contiguous), cos
 * and sin [tokens][dim], out [tokens][heads][dim] contiguous. */
WIDE int rope_bf16(const uint16_t *x, int64_t tokens, int64_t x_stride, int64_t heads,
                   int64_t dim, const uint16_t *cos, const uint16_t *sin, uint16_t *out) {
    if (tokens < 0 || heads <= 0 || dim <= 0 || dim % 2 || x_stride < heads * dim) return 1;
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens * heads * dim >= MIN_PARALLEL)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *v = x + t * x_stride + h * dim;
            uint16_t *o = out + (t * heads + h) * dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = round_bf16(bf16_to_f32(v[i]) * bf16_to_f32(c[i]));
                const float b = round_bf16(-bf16_to_f32(v[i + half]) * bf16_to_f32(s[i]));
                o[i] = f32_to_bf16(a + b);
            }
#pragma omp simd
            for (int64_t i = half; i < dim; i++) {
                const float a = round_bf16(bf16_to_f32(v[i]) * bf16_to_f32(c[i]));
                const float b = round_bf16(bf16_to_f32(v[i - half]) * bf16_to_f32(s[i]));
                o[i] = f32_to_bf16(a + b);
            }
        }
    }
    return 0;
}
