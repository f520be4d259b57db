/* int4 linears of bf16 models at large decode batches on the AMX tiles, with the weights
 * dequantized to bf16 on the fly (called by quant_bf16.c's quant_linear_i4bf16).
 *
 * quant_bf16.c's tile paths multiply the inputs by the exact nibbles (bf16(128 + q)) and
 * scale each group's float32 sums afterwards: a fold of every output row per group of 32
 * k, whose cost grows with the rows while a tile product's does not. From a few tiles of
 * rows that fold is most of the time (a 64-row batch: two stores, two FMAs and a load per
 * row, column block and group). Here each 32-k chunk of a 16-column block is turned into
 * bf16 weights once, w = bf16(scale * q + min), and every row tile accumulates over the
 * whole of k in its C tile: no fold. The weights are a bf16 model's: the same values as
 * the dense bf16 copy that larger batches use (model/quant_dense.py); products are exact
 * in float32 and sums float32.
 *
 * Tiles: C 0-3 (one per row tile, R rows x 16 floats), A 4 and 5 (R rows x 32 bf16), B 6
 * and 7 (16 pair-rows x 16 columns), alternating by chunk so that chunk c + 1's weights are
 * converted while chunk c's products run. Layout of q and scale as in quant_bf16.c, min as
 * scale.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define DEQ_BUILT 1
#else
#define DEQ_BUILT 0
#endif

#define COLS 16
#define TILE_K 32   /* k per tile product */
#define MAX_RT 4    /* row tiles: C tiles 0-3 */
#define TILE_ROWS 16

/* The fewest rows that take this path (quant_bf16.c asks): from two tiles of rows, where the
 * folds start to cost more than the conversion. The default model's decode step on a 2-core
 * Xeon with AMX (in process, short contexts, 4 rounds): 8 rows 0.95x, 12 and 16 rows 1.0x,
 * 20 rows 1.11x, 24 1.10-1.19x, 32 1.16x, 48 1.24x, 64 1.15-1.20x the time of quant_bf16.c's paths. */
static int deq_min_rows = 17;

int quant_i4bf16_deq_min_rows(void) { return __atomic_load_n(&deq_min_rows, __ATOMIC_RELAXED); }

/* For A/B runs and tests: the fewest rows that take the dequantizing path (a value over 64
 * turns it off); returns the previous value. */
int quant_i4bf16_set_deq_min_rows(int rows) {
    return __atomic_exchange_n(&deq_min_rows, rows < 1 ? 1 : rows, __ATOMIC_RELAXED);
}

#if DEQ_BUILT
#include <immintrin.h>

/* Chunk c (k in [32c, 32c + 32)) of column block blk as a B tile: 16 pair-rows x 16
 * columns of bf16 pairs (k even, k odd) in bt. Each weight is fma(q, scale, min) rounded
 * to bf16 (nearest even): quant_dequantize_f32's float32 value, which the dense bf16 copy
 * rounds the same way. */
static inline void deq_chunk(const uint32_t *blk, const float *scale, const float *min,
                             int64_t c, int64_t group, uint32_t *bt, int64_t pf) {
    const __m512i nibble = _mm512_set1_epi32(0xF);
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                           25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                           18, 2, 17, 1, 16, 0);
    for (int64_t ch = 0; ch < TILE_K / 8; ch++) {
        const int64_t at = 4 * c + ch, g = (8 * at) / group;
        prefetch_lines(blk + at * COLS, 64, pf);
        const __m512i lane = _mm512_loadu_si512(blk + at * COLS);
        const __m512 s = _mm512_loadu_ps(scale + g * COLS);
        const __m512 m = _mm512_loadu_ps(min + g * COLS);
        for (int p = 0; p < 4; p++) { /* nibble p: k = 8 at + 2p; nibble 4 + p: k + 1 */
            const __m512 even = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(lane, 4 * p), nibble)),
                s, m);
            const __m512 odd = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(lane, 4 * p + 16),
                                                    nibble)),
                s, m);
            /* [even 0..15 | odd 0..15] as bf16, then interleaved into (even, odd) pairs */
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
            _mm512_store_si512(bt + (4 * ch + p) * COLS, _mm512_permutexvar_epi16(inter, both));
        }
    }
}

static void deq_configure(int64_t R) {
    struct amx_tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 6; t++) cfg.rows[t] = (uint8_t)R, cfg.colsb[t] = 64;
    for (int t = 6; t < 8; t++) cfg.rows[t] = TILE_K / 2, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* Row tile RT_'s product for this chunk: A in tile AT_, B in BT_ (tile ids are literals:
 * they go into the instructions). */
#define DEQ_DP(RT_, AT_, BT_)                                                               \
    do {                                                                                    \
        if ((RT_) < RT) {                                                                   \
            _tile_loadd(AT_, xa + (c * RT * R + (RT_) * R) * (TILE_K / 2), 64);              \
            _tile_dpbf16ps(RT_, AT_, BT_);                                                  \
        }                                                                                   \
    } while (0)

#define DEQ_CHUNK(BT_)                                                                      \
    do {                                                                                    \
        _tile_loadd(BT_, b + (c & 1) * TILE_ROWS * COLS, 64);                               \
        DEQ_DP(0, 4, BT_);                                                                  \
        DEQ_DP(1, 5, BT_);                                                                  \
        DEQ_DP(2, 4, BT_);                                                                  \
        DEQ_DP(3, 5, BT_);                                                                  \
    } while (0)

#define DEQ_STORE(RT_)                                                                      \
    do {                                                                                    \
        if ((RT_) < RT) _tile_stored(RT_, cs + (RT_) * TILE_ROWS * COLS, 64);               \
    } while (0)

/* All rows x column block nb: RT row tiles of R rows, over the whole of k. */
static void deq_block(const uint32_t *q, const uint32_t *xa, const float *scale,
                      const float *min, const float *bias, float *y, int64_t rows,
                      int64_t R, int64_t RT, int64_t nb, int64_t k, int64_t group,
                      int64_t y_stride, uint32_t *b, float *cs, int64_t pf) {
    const int64_t chunks = k / TILE_K, groups = k / group;
    const uint32_t *blk = q + nb * (k / 8) * COLS;
    const float *sc = scale + nb * groups * COLS, *mn = min + nb * groups * COLS;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    deq_chunk(blk, sc, mn, 0, group, b, pf);
    for (int64_t c = 0; c < chunks; c++) {
        if (c & 1) DEQ_CHUNK(7);
        else DEQ_CHUNK(6);
        if (c + 1 < chunks)
            deq_chunk(blk, sc, mn, c + 1, group, b + ((c + 1) & 1) * TILE_ROWS * COLS, pf);
    }
    DEQ_STORE(0);
    DEQ_STORE(1);
    DEQ_STORE(2);
    DEQ_STORE(3);
    const __m512 bv = bias ? _mm512_loadu_ps(bias + nb * COLS) : _mm512_setzero_ps();
    for (int64_t rt = 0; rt < RT; rt++)
        for (int64_t r = 0; r < R && rt * R + r < rows; r++)
            _mm512_storeu_ps(y + (rt * R + r) * y_stride + nb * COLS,
                             _mm512_add_ps(_mm512_load_ps(cs + (rt * TILE_ROWS + r) * COLS), bv));
}
#endif

#if DEQ_BUILT
/* Rows [0, rows_a) of x rounded to bf16 (nearest even) into xa chunk-major: row r's k in
 * [32c, 32c + 32) at xa + (c * rows_a + r) * 16 (uint32 pairs); rows past `rows` zero. */
static void inputs_chunk_major(const float *x, int64_t x_stride, int64_t rows, int64_t rows_a,
                               int64_t k, uint32_t *xa) {
    const int64_t chunks = k / TILE_K;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows_a; r++)
        for (int64_t c = 0; c < chunks; c++) {
            __m512i v = _mm512_setzero_si512();
            if (r < rows) {
                const float *src = x + r * x_stride + c * TILE_K;
                v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
            }
            _mm512_store_si512(xa + (c * rows_a + r) * (TILE_K / 2), v);
        }
}
#endif

/* y[rows][n] = x W^T (+ bias), x float32 rounded to bf16 here (as a bf16 model's
 * activations are). Returns 0 if done, 1 where this path does not apply (not built, shape,
 * over 64 rows, no memory); the caller has checked the tiles are granted. */
int quant_i4bf16_deq_amx(const float *x, int64_t x_stride, int64_t rows, const uint32_t *q,
                         const float *scale, const float *min, const float *bias, int64_t n,
                         int64_t k, int64_t group, float *y, int64_t y_stride) {
#if DEQ_BUILT
    const int64_t RT = (rows + TILE_ROWS - 1) / TILE_ROWS;
    const int64_t R = RT < 1 ? 1 : (rows + RT - 1) / RT; /* as few and as even as fit */
    if (rows < 1 || RT > MAX_RT || n % COLS || k % TILE_K || group % 8 || k % group)
        return 1;
    const int64_t pf = prefetch_distance(), chunks = k / TILE_K, rows_a = RT * R;
    /* the inputs chunk-major, [chunk][row][32 bf16]: a tile of A is 1 KiB in a row */
    uint32_t *xa = aligned_alloc(64, (size_t)(chunks * rows_a * (TILE_K / 2)) * 4);
    if (xa == NULL) return 1;
#pragma omp parallel
    {
        uint32_t b[2 * TILE_ROWS * COLS] __attribute__((aligned(64)));
        float cs[MAX_RT * TILE_ROWS * COLS] __attribute__((aligned(64)));
        inputs_chunk_major(x, x_stride, rows, rows_a, k, xa); /* ends in a barrier */
        deq_configure(R);
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < n / COLS; nb++)
            deq_block(q, xa, scale, min, bias, y, rows, R, RT, nb, k, group, y_stride, b,
                      cs, pf);
        _tile_release();
    }
    free(xa);
    return 0;
#else
    (void)x, (void)x_stride, (void)rows, (void)q, (void)scale, (void)min, (void)bias;
    (void)n, (void)k, (void)group, (void)y, (void)y_stride;
    return 1;
#endif
}
