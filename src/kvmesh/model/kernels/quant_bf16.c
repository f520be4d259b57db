/* y = x W^T (+ b) for bf16 models with int4 weights (AVX-512 BF16), decode-sized batches.
 *
 * W[n][k] = scale * q + min per group of 32 along k, q in 0..15, as in quant_linear.c.
 * Here the products run as bf16 dot products (vdpbf16ps, 32 per instruction): q is stored
 * so that two shifts-and-masks turn 8 nibbles into a bf16 pair lane, using
 * bf16(128 + q) = 0x4300 | q (exact for q < 128), and
 *   sum_k (s q_k + m) x_k = s * sum_k (128 + q_k) x_k + (m - 128 s) * sum_k x_k.
 * x is rounded to bf16 (as a bf16 model's activations are); products are exact in float32
 * and accumulate in float32, so results are no less exact than bf16's own matmul. That is
 * 3 instructions per 32 weights against 7 for the float32 kernel, whose int4 unpacking
 * otherwise bounds a one-row step below the memory bandwidth.
 *
 * Layout, per 16 output columns: q [N/16][K/8][16] uint32; lane j of chunk c holds
 * nibble i (bits 4i..4i+3) = q[8c + 2i][j] and nibble 4 + i = q[8c + 2i + 1][j], i < 4.
 * scale and min128 (= min - 128 scale): [N/16][K/group][16] float.
 * Returns non-zero on a shape it does not support, or where it was built without BF16.
 */
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

#define COLS 16
#define MAX_ROWS 16

int quant_i4bf16_max_rows(void) { return MAX_ROWS; }

int quant_i4bf16_available(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

struct bargs {
    const uint32_t *q, *xb; /* xb [rows][K/2]: bf16 pairs of x */
    const float *scale, *min128, *bias, *xsum; /* xsum [rows][groups], of the rounded x */
    float *y;
    int64_t k, group, groups, y_stride;
};

/* R rows x one 16-column block; U accumulators per row (U k-pair streams). */
static inline __attribute__((always_inline)) void tile(const struct bargs *a, int64_t nb,
                                                        int64_t row0, const int R,
                                                        const int U) {
    const __m512i mask = _mm512_set1_epi32(0x000F000F);
    const __m512i hi_bits = _mm512_set1_epi32(0x43004300); /* bf16(128) in both halves */
    const uint32_t *blk = a->q + nb * (a->k / 8) * COLS;
    const int64_t half = a->k / 2, chunks = a->group / 8;
    __m512 tot[R];
    for (int r = 0; r < R; r++) tot[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a->groups; g++) {
        __m512 acc[R][U];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < U; u++) acc[r][u] = _mm512_setzero_ps();
        for (int64_t c = g * chunks; c < (g + 1) * chunks; c++) {
            const __m512i lane = _mm512_loadu_si512(blk + c * COLS);
            for (int p = 0; p < 4; p++) {
                const __m512i v = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lane, 4 * p),
                                                            mask, hi_bits, 0xEA); /* a&b|c */
                const __m512bh w = (__m512bh)v;
                for (int r = 0; r < R; r++) {
                    const __m512bh xv = (__m512bh)_mm512_set1_epi32(
                        (int)a->xb[(row0 + r) * half + c * 4 + p]);
                    acc[r][p % U] = _mm512_dpbf16_ps(acc[r][p % U], w, xv);
                }
            }
        }
        const __m512 s = _mm512_loadu_ps(a->scale + (nb * a->groups + g) * COLS);
        const __m512 m = _mm512_loadu_ps(a->min128 + (nb * a->groups + g) * COLS);
        for (int r = 0; r < R; r++) {
            __m512 sum = acc[r][0];
            for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[r][u]);
            tot[r] = _mm512_fmadd_ps(sum, s, tot[r]);
            tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(a->xsum[(row0 + r) * a->groups + g]), m,
                                     tot[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 out = tot[r];
        if (a->bias) out = _mm512_add_ps(out, _mm512_loadu_ps(a->bias + nb * COLS));
        _mm512_storeu_ps(a->y + (row0 + r) * a->y_stride + nb * COLS, out);
    }
}

static void block(const struct bargs *a, int64_t nb, int64_t rows) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) tile(a, nb, r, 4, 1);
    if (rows - r >= 2) {
        tile(a, nb, r, 2, 2);
        r += 2;
    }
    if (r < rows) tile(a, nb, r, 1, 4);
}
#endif

int quant_linear_i4bf16(const float *x, int64_t rows, int64_t x_stride, const uint32_t *q,
                        const float *scale, const float *min128, const float *bias, int64_t n,
                        int64_t k, int64_t group, float *y, int64_t y_stride) {
    if (rows == 0) return 0;
    if (rows < 0 || rows > MAX_ROWS || n % COLS || group % 8 || group < 8 || k % group)
        return 1;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    const int64_t groups = k / group, half = k / 2;
    uint32_t *xb = malloc(sizeof(uint32_t) * (size_t)(rows * half));
    float *xsum = malloc(sizeof(float) * (size_t)(rows * groups));
    if (xb == NULL || xsum == NULL) {
        free(xb);
        free(xsum);
        return 2;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t i = g * group; i < (g + 1) * group; i += 2) {
                const uint16_t lo = f32_to_bf16(xr[i]), hi = f32_to_bf16(xr[i + 1]);
                xb[r * half + i / 2] = (uint32_t)lo | ((uint32_t)hi << 16);
                s += bf16_to_f32(lo) + bf16_to_f32(hi);
            }
            xsum[r * groups + g] = s;
        }
    }
    const struct bargs a = {q, xb, scale, min128, bias, xsum, y, k, group, groups, y_stride};
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < n / COLS; nb++) block(&a, nb, rows);
    free(xb);
    free(xsum);
    return 0;
#else
    (void)x, (void)x_stride, (void)q, (void)scale, (void)min128, (void)bias, (void)y;
    (void)y_stride;
    return 3;
#endif
}
