/* y = x W^T (+ b) for a few rows of x (decode batches of up to 16 tokens), bf16 weights
 * streamed once from a packed layout, AVX-512 BF16.
 *
 * At small M a linear layer is bound by streaming its weights; here each 64-byte weight
 * vector holds (W[n][k], W[n][k+1]) for 16 outputs n, and feeds one dot-product
 * instruction per input row, with all rows' accumulators in registers. The packed layout
 * is [N/16][K/2][16][2] bf16 (`pack_bf16`). Output columns are split across OpenMP
 * threads. Returns 1 where the shape or the host is not supported; the caller keeps the
 * oneDNN path then.
 */
#include <stdint.h>
#include <string.h>

#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_DOT 1
#else
#define HAVE_BF16_DOT 0
#endif

#define MAX_ROWS 16

int small_linear_pack_bf16(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed) {
    if (n % 16 != 0 || k % 2 != 0) return 1;
    for (int64_t nb = 0; nb < n / 16; nb++)
        for (int64_t kp = 0; kp < k / 2; kp++)
            for (int64_t lane = 0; lane < 16; lane++) {
                const uint16_t *src = w + (nb * 16 + lane) * k + 2 * kp;
                uint16_t *dst = packed + ((nb * (k / 2) + kp) * 16 + lane) * 2;
                dst[0] = src[0];
                dst[1] = src[1];
            }
    return 0;
}

#if HAVE_BF16_DOT
/* One block of 16 outputs for `rows` input rows (a literal at each call site). */
static inline __attribute__((always_inline)) void block16(
    const uint32_t *x, int64_t x_stride, const uint16_t *wb, int64_t k, const float *bias,
    uint16_t *y, int64_t y_stride, const int rows) {
    __m512 acc[MAX_ROWS];
    for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    const __m512i *wv = (const __m512i *)wb;
    const int64_t pf = prefetch_distance();
    for (int64_t kp = 0; kp < k / 2; kp++) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)(wv + kp));
        prefetch_lines(wv + kp, 64, pf);
        for (int m = 0; m < rows; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32((int)x[m * x_stride + kp]), w);
    }
    const __m512 b = bias != NULL ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int m = 0; m < rows; m++) {
        float out[16];
        _mm512_storeu_ps(out, _mm512_add_ps(acc[m], b));
        for (int j = 0; j < 16; j++) y[m * y_stride + j] = f32_to_bf16(out[j]);
    }
}

#define ROWS_CASE(R) \
    case R: block16(x, x_stride, wb, k, bb, yb, n, R); break;
#endif

int small_linear_bf16(const uint16_t *x, int64_t rows, int64_t x_row_stride,
                      const uint16_t *packed, const float *bias, int64_t n, int64_t k,
                      uint16_t *y) {
#if HAVE_BF16_DOT
    if (rows < 1 || rows > MAX_ROWS || n % 16 != 0 || k % 2 != 0 || x_row_stride % 2 != 0)
        return 1;
    const uint32_t *x32 = (const uint32_t *)x;
    const int64_t x_stride = x_row_stride / 2;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < n / 16; nb++) {
        const uint16_t *wb = packed + nb * (k / 2) * 32;
        const float *bb = bias != NULL ? bias + nb * 16 : NULL;
        uint16_t *yb = y + nb * 16;
        const uint32_t *x = x32;
        switch (rows) {
            ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
            ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12)
            ROWS_CASE(13) ROWS_CASE(14) ROWS_CASE(15) default: block16(x, x_stride, wb, k, bb, yb, n, 16);
        }
    }
    return 0;
#else
    (void)x, (void)rows, (void)x_row_stride, (void)packed, (void)bias, (void)n, (void)k, (void)y;
    return 1;
#endif
}

int small_linear_available(void) { return HAVE_BF16_DOT; }
