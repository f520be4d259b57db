/* y = x W^T (+ b) for affine int4 weights (quant_linear.c's packed layout, groups of 32)
 * with the activations rounded to int8 on the fly: integer dot products, as llama.cpp
 * runs its Q4 formats against Q8 activations.
 *
 * Per row and group g of 32 inputs: d_g = max|x| / 127 and xq = round(x / d_g) in -127..127,
 * so the layer sees x~ = d_g xq instead of x (relative error at most 1/254 of the group's
 * largest input). With W[c][k] = scale[c][g] q[c][k] + min[c][g]:
 *   y[c] = sum_g  d_g (scale[c][g] sum_k q[c][k] xq[k]  +  min[c][g] sum_k xq[k])  (+ bias[c])
 * which is exactly x~ W^T, the inner sums exact in integers (`round_activations` in
 * model/quant.py states it in torch). Every batch size runs this kernel, and a row's result
 * depends on that row alone.
 * At one row this reads the same bytes as the float kernel with about a third of the
 * instructions: a 256-bit multiply-add of unsigned 4-bit weights by signed 8-bit inputs
 * (vpmaddubsw) does 32 products, where the float kernel converts 8 weights to float first.
 *
 * Scales and minimums are float16 [N/16][K/32][16] (GGUF's Q4_1 stores them so), which
 * with the 4-bit weights makes 0.625 bytes per weight: decode at one stream is bound by
 * streaming them.
 * Weights [N/16][K/2][16] bytes (low nibble k even, high nibble k odd): one 32-byte load is
 * 16 columns x 4 inputs. Interleaving its low and high nibbles puts each column's pair
 * (k, k+1) side by side, which vpmaddubsw multiplies by the matching pair of inputs: the
 * row's 4 int8 inputs broadcast, then shuffled so each 128-bit lane repeats its pair. The
 * prepared rows stay compact (one byte per input), so a tile of rows sits in L1. 16-bit sums
 * stay exact over one group: |2 * 15 * 127| * 8 steps = 30480 < 32767.
 * AVX2 only (every AVX-512 CPU has it); `quant_a8_available` says 0 elsewhere and the
 * caller keeps the float kernel. Returns non-zero on a shape it does not support.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h" /* prefetch_lines */

#define A8_GROUP 32
#define A8_MAX_ROWS 256 /* rows per pass; quant_linear_i4a8 takes any number */

/* Bytes of prepared inputs for one row of k inputs: xq (int8), then per group d and
 * d * sum(xq) (floats). */
static int64_t row_bytes(int64_t k) { return k + 8 * (k / A8_GROUP); }

int64_t quant_a8_prepared_bytes(int64_t rows, int64_t k) { return rows * row_bytes(k); }

/* Quantize rows of x into `out` (quant_a8_prepared_bytes). */
int quant_a8_prepare(const float *x, int64_t rows, int64_t x_stride, int64_t k, void *out) {
    if (rows < 0 || k <= 0 || k % A8_GROUP) return 1;
    const int64_t groups = k / A8_GROUP;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        int8_t *xq = (int8_t *)out + r * row_bytes(k);
        float *d = (float *)(xq + k), *s = d + groups;
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = xr + g * A8_GROUP;
            float amax = 0.0f;
            int nan = 0; /* fmaxf drops NaNs: count them apart, so they reach the output */
            for (int i = 0; i < A8_GROUP; i++) {
                amax = fmaxf(amax, fabsf(xg[i]));
                nan |= xg[i] != xg[i];
            }
            const float inv = amax > 0.0f && isfinite(amax) ? 127.0f / amax : 0.0f;
            int8_t *q = xq + g * A8_GROUP;
            int32_t sum = 0;
            for (int i = 0; i < A8_GROUP; i++) {
                float v = nearbyintf(xg[i] * inv);
                v = v == v ? v : 0.0f; /* NaN or inf input: d below carries it */
                q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
                sum += q[i];
            }
            d[g] = isfinite(amax) && !nan ? amax / 127.0f : NAN;
            s[g] = d[g] * (float)sum;
        }
    }
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

int quant_a8_available(void) { return 1; }

struct a8args {
    const int8_t *prep;
    int64_t k, groups, rows;
    const uint8_t *q;
    const uint16_t *scale, *min; /* float16 */
    const float *bias;
    float *y;
    int64_t y_stride;
};

static inline __m256 half8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* R rows (a literal at each call) times one 16-column block. */
static inline __attribute__((always_inline)) void tile(const struct a8args *a, int64_t nb,
                                                       int64_t row0, const int R) {
    const int64_t pf = prefetch_distance();
    const uint8_t *blk = a->q + nb * a->k * 8;
    const uint16_t *sc = a->scale + nb * a->groups * 16;
    const uint16_t *mn = a->min ? a->min + nb * a->groups * 16 : NULL;
    const int64_t rb = row_bytes(a->k);
    const __m256i nib = _mm256_set1_epi8(15);
    /* lane 0 repeats inputs (0, 1) of a broadcast 4, lane 1 inputs (2, 3) */
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    __m256 tot[R][2];
    for (int r = 0; r < R; r++) tot[r][0] = tot[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < a->groups; g++) {
        prefetch_lines(blk + g * (A8_GROUP / 4) * 32, (A8_GROUP / 4) * 32, pf);
        prefetch_lines(sc + g * 16, 32, pf / 4);
        if (mn != NULL) prefetch_lines(mn + g * 16, 32, pf / 4);
        __m256i acc[R][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (int j = 0; j < A8_GROUP / 4; j++) {
            const int64_t step = g * (A8_GROUP / 4) + j;
            const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + step * 32));
            const __m256i lo = _mm256_and_si256(w, nib);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
            const __m256i c0 = _mm256_unpacklo_epi8(lo, hi), c1 = _mm256_unpackhi_epi8(lo, hi);
            for (int r = 0; r < R; r++) {
                int32_t four;
                memcpy(&four, a->prep + (row0 + r) * rb + step * 4, 4);
                const __m256i xv = _mm256_shuffle_epi8(_mm256_set1_epi32(four), pick);
                acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(c0, xv));
                acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(c1, xv));
            }
        }
        for (int r = 0; r < R; r++) {
            const float *d = (const float *)(a->prep + (row0 + r) * rb + a->k);
            const __m256 dg = _mm256_set1_ps(d[g]), sg = _mm256_set1_ps(d[a->groups + g]);
            for (int h = 0; h < 2; h++) {
                const __m256i v = acc[r][h];
                const __m256i sum = _mm256_add_epi32(
                    _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)),
                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
                const __m256 scale = _mm256_mul_ps(half8(sc + g * 16 + h * 8), dg);
                tot[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, tot[r][h]);
                if (mn != NULL)
                    tot[r][h] = _mm256_fmadd_ps(half8(mn + g * 16 + h * 8), sg, tot[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) {
            const __m256 b = a->bias ? _mm256_loadu_ps(a->bias + nb * 16 + h * 8)
                                     : _mm256_setzero_ps();
            _mm256_storeu_ps(a->y + (row0 + r) * a->y_stride + nb * 16 + h * 8,
                             _mm256_add_ps(tot[r][h], b));
        }
}

static void block(const struct a8args *a, int64_t nb) {
    int64_t r = 0;
    for (; r + 4 <= a->rows; r += 4) tile(a, nb, r, 4);
    switch (a->rows - r) {
    case 3: tile(a, nb, r, 3); break;
    case 2: tile(a, nb, r, 2); break;
    case 1: tile(a, nb, r, 1); break;
    default: break;
    }
}

/* The linear on prepared inputs (quant_a8_prepare). */
int quant_linear_i4a8_prepared(const void *prep, int64_t rows, const uint8_t *q,
                               const uint16_t *scale, const uint16_t *min, const float *bias,
                               int64_t n, int64_t k, int64_t group, float *y,
                               int64_t y_stride) {
    if (rows == 0) return 0;
    if (rows < 0 || rows > A8_MAX_ROWS || n % 16 || group != A8_GROUP || k % A8_GROUP)
        return 1;
    const struct a8args a = {prep, k, k / A8_GROUP, rows, q, scale, min, bias, y, y_stride};
    /* dynamic: on a busy machine a descheduled thread holds up only its own 4 blocks */
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t nb = 0; nb < n / 16; nb++) block(&a, nb);
    return 0;
}

#else
int quant_a8_available(void) { return 0; }

int quant_linear_i4a8_prepared(const void *prep, int64_t rows, const uint8_t *q,
                               const uint16_t *scale, const uint16_t *min, const float *bias,
                               int64_t n, int64_t k, int64_t group, float *y,
                               int64_t y_stride) {
    (void)prep, (void)rows, (void)q, (void)scale, (void)min, (void)bias, (void)n, (void)k;
    (void)group, (void)y, (void)y_stride;
    return 3;
}
#endif

/* Quantize x, then the linear, A8_MAX_ROWS rows at a time: any number of rows. Each row's
 * result depends on that row alone (exact integer sums, then the same float steps), so a
 * token gets the same output in a decode batch, a prefill chunk or a cache-hit suffix. */
int quant_linear_i4a8(const float *x, int64_t rows, int64_t x_stride, const uint8_t *q,
                      const uint16_t *scale, const uint16_t *min, const float *bias, int64_t n,
                      int64_t k, int64_t group, float *y, int64_t y_stride) {
    if (rows == 0) return 0;
    if (rows < 0 || group != A8_GROUP || k % A8_GROUP) return 1;
    const int64_t pass = rows < A8_MAX_ROWS ? rows : A8_MAX_ROWS;
    void *prep = malloc((size_t)quant_a8_prepared_bytes(pass, k));
    if (prep == NULL) return 2;
    int rc = 0;
    for (int64_t r = 0; r < rows && rc == 0; r += pass) {
        const int64_t now = rows - r < pass ? rows - r : pass;
        rc = quant_a8_prepare(x + r * x_stride, now, x_stride, k, prep);
        if (rc == 0)
            rc = quant_linear_i4a8_prepared(prep, now, q, scale, min, bias, n, k, group,
                                            y + r * y_stride, y_stride);
    }
    free(prep);
    return rc;
}
