/* y = x W^T (+ b) for bf16 models' int8 linears on AMX tiles (the lm_head above all), for
 * the few rows of a verify step of speculative decoding or a small decode batch.
 *
 * W[n][k] = scale[n][g] * q[n][k], q int8, g = k / group: quant_linear.c's int8 layout
 * (q [N/16][K][16], scale [N/16][K/group][16] float). x is rounded to bf16 (a bf16 model's
 * activations are bf16 already), and q is exact in bf16, so each product is exact in
 * float32; sums run in float32 over 32 inputs at a time (one tile product) and are then
 * scaled by their group's scale. So the output is quant_linear_f32's for the same inputs
 * up to float32 summation order: no bf16 rounding of the weights (a dense bf16 copy rounds
 * scale * q), and float32 logits with no ties from bf16 outputs (model/logits.py).
 *
 * Per 16-column block and 32 inputs, the int8 weights are converted into a B tile of bf16
 * pairs (16 k-pairs x 16 columns) in L1, and one tile product serves every row: its cost
 * does not grow with the rows, where the float32 kernel's multiply-adds do (at 9 rows its
 * int8 lm_head is compute-bound: 3.3 ms against 1.4 ms at one row). Software-pipelined: the
 * next slice is converted and the slice before is scaled into the sums while a slice's
 * tile products run. Up to 32 rows (two row tiles). Returns non-zero where it does not
 * apply (3: not built here or AMX off: the caller keeps its other paths).
 */
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

#define COLS 16
#define SLICE 32     /* inputs per tile product */
#define TILE_ROWS 16 /* rows per row tile */
#define I8AMX_MAX_ROWS 32

int quant_amx_enabled(void); /* quant_bf16.c: AMX granted and on (KVMESH_AMX) */

int quant_i8amx_max_rows(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
    return quant_amx_enabled() ? I8AMX_MAX_ROWS : 0;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
#include <immintrin.h>

struct i8args {
    const int8_t *q;
    const uint16_t *xb; /* [rows padded to RT * R][K] bf16 */
    const float *scale, *bias;
    float *y;
    int64_t k, group, groups, y_stride, rows, R;
    int RT;
};

/* C 0-3 (R x 16 float: [slice parity][row tile]), A 4-5 (R x 32 bf16, a row tile each),
 * B 6-7 (16 pair-rows x 16 columns, by slice parity). */
static void configure(int64_t R) {
    struct amx_tile_config c = {0};
    c.palette = 1;
    for (int t = 0; t < 6; t++) c.rows[t] = (uint8_t)R, c.colsb[t] = 64;
    for (int t = 6; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* Slice s (inputs 32 s .. 32 s + 31) of a column block's int8 weights as bf16 pairs: pair
 * row j holds, per column c, q[2j][c] and q[2j + 1][c] (the two k rows are the adjacent 32
 * bytes of the [K][16] layout; converting puts the first's 16 columns before the second's,
 * and one permutation interleaves them). */
static inline void convert(const int8_t *blk, int64_t s, uint16_t *b, int64_t pf,
                           __m512i interleave) {
    const int8_t *src = blk + s * SLICE * COLS;
    prefetch_lines(src, SLICE * COLS, pf);
    for (int j = 0; j < SLICE / 2; j++) {
        const __m256i two = _mm256_loadu_si256((const __m256i *)(src + 2 * j * COLS));
        const __m512 even = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(two)));
        const __m512 odd = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(two, 1)));
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
        _mm512_store_si512(b + j * 2 * COLS, _mm512_permutexvar_epi16(interleave, both));
    }
}

/* Slice s's tile products for every row tile: B tile BT (from buffer P), C tiles C0 and
 * C1 (literals: tile registers are named in the instructions). */
#define ISSUE(P, BT, C0, C1)                                                               \
    do {                                                                                   \
        _tile_loadd(BT, bbuf + (P) * SLICE * COLS, 64);                                   \
        _tile_zero(C0);                                                                    \
        _tile_loadd(4, a->xb + s * SLICE, a->k * 2);                                       \
        _tile_dpbf16ps(C0, 4, BT);                                                         \
        if (a->RT == 2) {                                                                  \
            _tile_zero(C1);                                                                \
            _tile_loadd(5, a->xb + a->R * a->k + s * SLICE, a->k * 2);                     \
            _tile_dpbf16ps(C1, 5, BT);                                                     \
        }                                                                                  \
    } while (0)

/* Slice S's C tiles C0 and C1 out and scaled by their group's scales into the sums. */
#define FOLD(C0, C1, S)                                                                    \
    do {                                                                                   \
        _tile_stored(C0, cbuf, 64);                                                        \
        if (a->RT == 2) _tile_stored(C1, cbuf + TILE_ROWS * COLS, 64);                     \
        fold(a, nb, (S), cbuf, tot);                                                       \
    } while (0)

static inline void fold(const struct i8args *a, int64_t nb, int64_t s, const float *cbuf,
                        float *tot) {
    const __m512 sc = _mm512_loadu_ps(a->scale + (nb * a->groups + s * SLICE / a->group) * COLS);
    for (int rt = 0; rt < a->RT; rt++)
        for (int64_t r = 0; r < a->R; r++) {
            const int64_t at = (rt * TILE_ROWS + r) * COLS;
            _mm512_store_ps(tot + at, _mm512_fmadd_ps(_mm512_load_ps(cbuf + at), sc,
                                                      _mm512_load_ps(tot + at)));
        }
}

static void run_block(const struct i8args *a, int64_t nb, uint16_t *bbuf, float *cbuf,
                      float *tot, __m512i interleave) {
    const int64_t slices = a->k / SLICE, pf = prefetch_distance();
    const int8_t *blk = a->q + nb * a->k * COLS;
    for (int64_t i = 0; i < 2 * TILE_ROWS * COLS; i++) tot[i] = 0.0f;
    convert(blk, 0, bbuf, pf, interleave);
    for (int64_t s = 0; s < slices; s++) {
        if (s & 1) ISSUE(1, 7, 2, 3);
        else ISSUE(0, 6, 0, 1);
        if (s + 1 < slices) convert(blk, s + 1, bbuf + ((s + 1) & 1) * SLICE * COLS, pf, interleave);
        if (s >= 1) {
            if (s & 1) FOLD(0, 1, s - 1);
            else FOLD(2, 3, s - 1);
        }
    }
    if ((slices - 1) & 1) FOLD(2, 3, slices - 1);
    else FOLD(0, 1, slices - 1);
    for (int rt = 0; rt < a->RT; rt++)
        for (int64_t r = 0; r < a->R && rt * a->R + r < a->rows; r++) {
            __m512 out = _mm512_load_ps(tot + (rt * TILE_ROWS + r) * COLS);
            if (a->bias) out = _mm512_add_ps(out, _mm512_loadu_ps(a->bias + nb * COLS));
            _mm512_storeu_ps(a->y + (rt * a->R + r) * a->y_stride + nb * COLS, out);
        }
}

static int run(const struct i8args *a, int64_t n) {
#pragma omp parallel
    {
        uint16_t bbuf[2 * SLICE * COLS] __attribute__((aligned(64)));
        float cbuf[2 * TILE_ROWS * COLS] __attribute__((aligned(64)));
        float tot[2 * TILE_ROWS * COLS] __attribute__((aligned(64)));
        const __m512i interleave = interleave_halves16();
        configure(a->R);
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < n / COLS; nb++) run_block(a, nb, bbuf, cbuf, tot, interleave);
        _tile_release();
    }
    return 0;
}
#endif

int quant_linear_i8amx(const float *x, int64_t rows, int64_t x_stride, const int8_t *q,
                       const float *scale, const float *bias, int64_t n, int64_t k,
                       int64_t group, float *y, int64_t y_stride) {
    if (rows == 0) return 0;
    if (rows < 0 || rows > I8AMX_MAX_ROWS || n % COLS || k % SLICE || group % SLICE ||
        group <= 0 || k % group)
        return 1;
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
    if (!quant_amx_enabled()) return 3;
    const int RT = rows > TILE_ROWS ? 2 : 1;
    const int64_t R = (rows + RT - 1) / RT;
    uint16_t *xb = aligned_alloc(64, (size_t)((RT * R * k * 2 + 63) / 64 * 64));
    if (xb == NULL) return 2;
    for (int64_t r = 0; r < RT * R; r++)
        for (int64_t i = 0; i < k; i++)
            xb[r * k + i] = r < rows ? f32_to_bf16(x[r * x_stride + i]) : 0;
    const struct i8args a = {q, xb, scale, bias, y, k, group, k / group, y_stride, rows, R, RT};
    run(&a, n);
    free(xb);
    return 0;
#else
    (void)x, (void)x_stride, (void)q, (void)scale, (void)bias, (void)y, (void)y_stride;
    return 3;
#endif
}
