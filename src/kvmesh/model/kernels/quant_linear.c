/* y = x W^T (+ b) with W stored as weight-only int8 or int4, affine per group:
 *   W[n][k] = scale[n][g] * q[n][k] + min[n][g],   g = k / group
 * float32 activations and accumulation, for batches of up to MAX_ROWS rows (the caller
 * dequantizes for larger ones). At small batch a linear is bound by streaming its weights,
 * so int8 reads a quarter of float32's bytes and int4 an eighth.
 *
 * Packed layout, 16 output columns per block (one zmm, or two ymm on AVX2):
 *   int8: q   [N/16][K][16]    int8
 *   int4: q   [N/16][K/2][16]  uint8, low nibble k even, high nibble k odd (values 0..15)
 *   scale, min [N/16][K/group][16] float (min may be NULL: symmetric)
 * One source builds for every ISA level that cpu_isa.py selects (-march=native narrowed by
 * -mno-* flags): a 16-column block is one AVX-512 vector, two AVX2 ones, or 16 scalars.
 * Output column blocks are split across OpenMP threads. Returns non-zero on a shape it does
 * not support.
 */
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h" /* prefetch_lines */

#define INLINE_DECL static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#include <immintrin.h>
#define W 16
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET1(x) _mm512_set1_ps(x)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
INLINE_DECL vf q8(const uint8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
INLINE_DECL void q4(const uint8_t *p, vf *lo, vf *hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define W 8
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VSET1(x) _mm256_set1_ps(x)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
INLINE_DECL vf q8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
INLINE_DECL void q4(const uint8_t *p, vf *lo, vf *hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#else /* generic: one lane at a time, left to the compiler */
#define W 1
typedef float vf;
#define VZERO() 0.0f
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VSET1(x) (x)
#define VMUL(a, b) ((a) * (b))
#define VADD(a, b) ((a) + (b))
#define VFMA(a, b, c) ((a) * (b) + (c))
INLINE_DECL vf q8(const uint8_t *p) { return (float)*(const int8_t *)p; }
INLINE_DECL void q4(const uint8_t *p, vf *lo, vf *hi) {
    *lo = (float)(*p & 15);
    *hi = (float)(*p >> 4);
}
#endif

#define COLS 16
#define H (COLS / W) /* vectors per 16-column block */
/* Larger batches are dequantized to float32 for torch's matmul. Where 8 floats are the
 * vector (AVX2), the tiles on the scaled scratch (below) match or beat that up to 256
 * rows (Zen 1, 2 threads: 129 against 150 ms for 256 x 4096 x 4096, 417 against 414 for
 * 256 x 4096 x 11008, not counting the dequantization), while at 512 rows oneDNN's
 * matmul is 7-10% faster on layers that wide. AVX-512 keeps 64: not measured there. */
#if W == 8
#define MAX_ROWS 256
#else
#define MAX_ROWS 64
#endif

int64_t kv_prefetch_dist = 2048; /* see vec_math.h */

/* Set how far ahead the linears prefetch their weights, in bytes (0: not at all); returns
 * the previous distance. */
int64_t kernels_set_prefetch(int64_t dist) {
    return __atomic_exchange_n(&kv_prefetch_dist, dist < 0 ? 0 : dist, __ATOMIC_RELAXED);
}

struct qargs {
    const float *x;
    int64_t x_stride, n, k, group;
    const uint8_t *q;
    const float *scale, *min, *bias, *xsum; /* xsum [rows][K/group], only with min */
    const float *xt; /* AVX-512: the rows interleaved per tile (interleave_tiles) */
    float *y;
    int64_t y_stride, groups;
};

/* R rows times one 16-column block, with U independent accumulators per row (U k-streams,
 * so a one-row tile still has enough FMA chains in flight). Scales are folded into the
 * weight vector once per k and shared by the R rows; R and U are literals at each call. */
INLINE_DECL void tile(const struct qargs *a, const uint8_t *blk, int64_t nb, int64_t row0,
                      const int bits, const int R, const int U) {
    const int64_t pf = prefetch_distance();
    const float *sc = a->scale + nb * a->groups * COLS;
    const float *mn = a->min ? a->min + nb * a->groups * COLS : NULL;
#if W == 16 /* the tile's rows interleaved, [k][R] (interleave_tiles): one base register */
    const float *x = a->xt + row0 * a->k;
#define XAT(r, kk) x[(kk) * R + (r)]
#else
    const float *x = a->x + row0 * a->x_stride;
#define XAT(r, kk) x[(r) * a->x_stride + (kk)]
#endif
    vf acc[U][R][H];
    for (int u = 0; u < U; u++)
        for (int r = 0; r < R; r++)
            for (int h = 0; h < H; h++) acc[u][r][h] = VZERO();
    for (int64_t g = 0; g < a->groups; g++) {
        const int64_t k0 = g * a->group;
        if (bits != 32) { /* the scaled floats are in cache: scaled_block just wrote them */
            prefetch_lines(blk + k0 * COLS * bits / 8, a->group * COLS * bits / 8, pf);
            prefetch_lines(sc + g * COLS, 64, pf / 4);
            if (mn != NULL) prefetch_lines(mn + g * COLS, 64, pf / 4);
        }
        vf s[H];
        for (int h = 0; h < H; h++) s[h] = VLOAD(sc + g * COLS + h * W);
        if (bits == 32) { /* weights already scaled to float: scaled_block() */
            const float *wf = (const float *)blk;
            for (int64_t k = k0; k < k0 + a->group; k += U)
                for (int u = 0; u < U; u++)
                    for (int h = 0; h < H; h++) {
                        const vf w = VLOAD(wf + (k + u) * COLS + h * W);
                        for (int r = 0; r < R; r++)
                            acc[u][r][h] = VFMA(VSET1(XAT(r, k + u)), w,
                                                acc[u][r][h]);
                    }
        } else if (bits == 8) {
            for (int64_t k = k0; k < k0 + a->group; k += U)
                for (int u = 0; u < U; u++)
                    for (int h = 0; h < H; h++) {
                        const vf w = VMUL(q8(blk + (k + u) * COLS + h * W), s[h]);
                        for (int r = 0; r < R; r++)
                            acc[u][r][h] = VFMA(VSET1(XAT(r, k + u)), w,
                                                acc[u][r][h]);
                    }
        } else {
            for (int64_t k = k0; k < k0 + a->group; k += 2) { /* k even: the low nibble */
                const int ulo = 0, uhi = U - 1; /* literals, so acc stays in registers */
                for (int h = 0; h < H; h++) {
                    vf lo, hi;
                    q4(blk + (k / 2) * COLS + h * W, &lo, &hi);
                    lo = VMUL(lo, s[h]);
                    hi = VMUL(hi, s[h]);
                    for (int r = 0; r < R; r++) {
                        acc[ulo][r][h] = VFMA(VSET1(XAT(r, k)), lo, acc[ulo][r][h]);
                        acc[uhi][r][h] = VFMA(VSET1(XAT(r, k + 1)), hi, acc[uhi][r][h]);
                    }
                }
            }
        }
        if (mn != NULL)
            for (int h = 0; h < H; h++) {
                const vf m = VLOAD(mn + g * COLS + h * W);
                for (int r = 0; r < R; r++)
                    acc[0][r][h] = VFMA(VSET1(a->xsum[(row0 + r) * a->groups + g]), m,
                                        acc[0][r][h]);
            }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < H; h++) {
            vf sum = a->bias ? VLOAD(a->bias + nb * COLS + h * W) : VZERO();
            for (int u = 0; u < U; u++) sum = VADD(sum, acc[u][r][h]);
            VSTORE(a->y + (row0 + r) * a->y_stride + nb * COLS + h * W, sum);
        }
#undef XAT
}

#if W == 16
/* Two adjacent blocks (bstride bytes apart) for R rows: each row's input is broadcast once
 * per k for two FMAs. One k-stream per row (2 R chains): the arithmetic of tile(.., 1). */
INLINE_DECL void tile2(const struct qargs *a, const uint8_t *blk, int64_t bstride, int64_t nb,
                       int64_t row0, const int bits, const int R) {
    const int64_t pf = prefetch_distance(), gs = a->groups * COLS;
    const float *sc = a->scale + nb * gs;
    const float *mn = a->min ? a->min + nb * gs : NULL;
    const float *x = a->xt + row0 * a->k;
    vf acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = VZERO();
    for (int64_t g = 0; g < a->groups; g++) {
        const int64_t k0 = g * a->group;
        if (bits != 32)
            for (int b = 0; b < 2; b++) {
                prefetch_lines(blk + b * bstride + k0 * COLS * bits / 8,
                               a->group * COLS * bits / 8, pf);
                prefetch_lines(sc + b * gs + g * COLS, 64, pf / 4);
                if (mn != NULL) prefetch_lines(mn + b * gs + g * COLS, 64, pf / 4);
            }
        const vf s0 = VLOAD(sc + g * COLS), s1 = VLOAD(sc + gs + g * COLS);
        for (int64_t k = k0; k < k0 + a->group; k += 2) {
            vf w00, w01, w10, w11; /* w[k + i][block] */
            if (bits == 32) {
                const float *f0 = (const float *)blk, *f1 = (const float *)(blk + bstride);
                w00 = VLOAD(f0 + k * COLS), w10 = VLOAD(f0 + (k + 1) * COLS);
                w01 = VLOAD(f1 + k * COLS), w11 = VLOAD(f1 + (k + 1) * COLS);
            } else if (bits == 8) {
                w00 = VMUL(q8(blk + k * COLS), s0), w10 = VMUL(q8(blk + (k + 1) * COLS), s0);
                w01 = VMUL(q8(blk + bstride + k * COLS), s1);
                w11 = VMUL(q8(blk + bstride + (k + 1) * COLS), s1);
            } else {
                q4(blk + (k / 2) * COLS, &w00, &w10);
                q4(blk + bstride + (k / 2) * COLS, &w01, &w11);
                w00 = VMUL(w00, s0), w10 = VMUL(w10, s0);
                w01 = VMUL(w01, s1), w11 = VMUL(w11, s1);
            }
            for (int r = 0; r < R; r++) {
                const vf xa = VSET1(x[k * R + r]);
                acc[r][0] = VFMA(xa, w00, acc[r][0]);
                acc[r][1] = VFMA(xa, w01, acc[r][1]);
            }
            for (int r = 0; r < R; r++) {
                const vf xb = VSET1(x[(k + 1) * R + r]);
                acc[r][0] = VFMA(xb, w10, acc[r][0]);
                acc[r][1] = VFMA(xb, w11, acc[r][1]);
            }
        }
        if (mn != NULL) {
            const vf m0 = VLOAD(mn + g * COLS), m1 = VLOAD(mn + gs + g * COLS);
            for (int r = 0; r < R; r++) {
                const vf xs = VSET1(a->xsum[(row0 + r) * a->groups + g]);
                acc[r][0] = VFMA(xs, m0, acc[r][0]);
                acc[r][1] = VFMA(xs, m1, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < 2; b++) {
            vf sum = a->bias ? VLOAD(a->bias + (nb + b) * COLS) : VZERO();
            VSTORE(a->y + (row0 + r) * a->y_stride + (nb + b) * COLS, VADD(sum, acc[r][b]));
        }
}
#endif

/* One row (single-stream decode): four k-streams of unscaled sums per group, scaled once
 * at the group's end, so no multiply per weight vector. */
INLINE_DECL void row1(const struct qargs *a, const uint8_t *blk, int64_t nb, int64_t row,
                      const int bits) {
    const int64_t pf = prefetch_distance();
    const float *sc = a->scale + nb * a->groups * COLS;
    const float *mn = a->min ? a->min + nb * a->groups * COLS : NULL;
    const float *x = a->x + row * a->x_stride;
    vf tot[H];
    for (int h = 0; h < H; h++) tot[h] = VZERO();
    for (int64_t g = 0; g < a->groups; g++) {
        const int64_t k0 = g * a->group;
        prefetch_lines(blk + k0 * COLS * bits / 8, a->group * COLS * bits / 8, pf);
        prefetch_lines(sc + g * COLS, 64, pf / 4);
        if (mn != NULL) prefetch_lines(mn + g * COLS, 64, pf / 4);
        vf acc[4][H];
        for (int u = 0; u < 4; u++)
            for (int h = 0; h < H; h++) acc[u][h] = VZERO();
        for (int64_t k = k0; k < k0 + a->group; k += 4)
            for (int h = 0; h < H; h++) {
                if (bits == 8) {
                    for (int u = 0; u < 4; u++)
                        acc[u][h] = VFMA(VSET1(x[k + u]), q8(blk + (k + u) * COLS + h * W),
                                         acc[u][h]);
                } else {
                    for (int p = 0; p < 2; p++) {
                        vf lo, hi;
                        q4(blk + ((k + 2 * p) / 2) * COLS + h * W, &lo, &hi);
                        acc[2 * p][h] = VFMA(VSET1(x[k + 2 * p]), lo, acc[2 * p][h]);
                        acc[2 * p + 1][h] = VFMA(VSET1(x[k + 2 * p + 1]), hi, acc[2 * p + 1][h]);
                    }
                }
            }
        for (int h = 0; h < H; h++) {
            const vf sum = VADD(VADD(acc[0][h], acc[1][h]), VADD(acc[2][h], acc[3][h]));
            tot[h] = VFMA(sum, VLOAD(sc + g * COLS + h * W), tot[h]);
            if (mn != NULL)
                tot[h] = VFMA(VSET1(a->xsum[row * a->groups + g]), VLOAD(mn + g * COLS + h * W),
                              tot[h]);
        }
    }
    for (int h = 0; h < H; h++) {
        const vf b = a->bias ? VLOAD(a->bias + nb * COLS + h * W) : VZERO();
        VSTORE(a->y + row * a->y_stride + nb * COLS + h * W, VADD(tot[h], b));
    }
}

#if W == 16
/* AVX-512 (one vector per 16-column block): column blocks taken in pairs (PAIR; an odd last
 * one alone), so each row's input, broadcast once per k, feeds two FMAs (tile2), and the
 * rows in as few tiles of at most TILE_MAX as there can be, split evenly. One k-stream a
 * row: a tile of R rows has 2 R FMA chains, and its 2 R accumulators with four weight
 * vectors fit the 32 registers. Tiles of 4 rows on one block, as on AVX2, were latency
 * bound (4 chains), decoded each weight once per 4 rows and broadcast an input for every
 * FMA (a load each: ~2.7 G FMA/s a core where 4.2 is the peak). On an Ice Lake Xeon (2
 * threads, the default model's 30 layers of int4 linears and its int8 head, medians of 8
 * alternating runs) 9 rows took 25 against 39 ms, 16 rows 43 against 67, 64 rows 146
 * against 219; 2 rows 9.0 against 7.8. Every row of every tile runs the same arithmetic in
 * the same order, so from 2 rows a row's result does not depend on its batch (a row alone
 * takes row1; batches above MAX_ROWS are dequantized for torch's matmul). */
#define PAIR 2
#define TILE_MAX 10
static inline int64_t tile_count(int64_t rows) { return (rows + TILE_MAX - 1) / TILE_MAX; }
/* The even split that tiles() and interleave_tiles() share: the size of the next tile when
 * `left` rows remain for `tiles_left` tiles (sizes differ by one at most, each >= 2). */
static inline int64_t tile_size(int64_t left, int64_t tiles_left) { return left / tiles_left; }
#define CASE(n)                                                                            \
    case n: {                                                                              \
        if (B == 2) tile2(a, src, bstride, nb, row0, bits, n);                             \
        else tile(a, src, nb, row0, bits, n, 1);                                           \
        break;                                                                             \
    }
INLINE_DECL void tile_of(const struct qargs *a, const uint8_t *src, int64_t bstride, int64_t nb,
                         int64_t row0, const int bits, int64_t rows, const int B) {
    _Static_assert(TILE_MAX == 10, "a case for every tile size below TILE_MAX");
    switch (rows) { /* 2..TILE_MAX */
    CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9)
    default:
        if (B == 2) tile2(a, src, bstride, nb, row0, bits, TILE_MAX);
        else tile(a, src, nb, row0, bits, TILE_MAX, 1);
    }
}
#undef CASE
INLINE_DECL int64_t tiles(const struct qargs *a, const uint8_t *src, int64_t bstride,
                          int64_t nb, int64_t rows, const int bits, const int B) {
    if (rows < 2) return 0; /* returns the rows done: all but a lone row */
    int64_t r = 0;
    for (int64_t t = 0, count = tile_count(rows); t < count; t++) {
        const int64_t size = tile_size(rows - r, count - t);
        tile_of(a, src, bstride, nb, r, bits, size, B);
        r += size;
    }
    return r;
}
/* x's rows as the tiles read them: tile by tile (the split tiles() makes), each [K][R],
 * so a tile addresses its rows' inputs from one pointer. NULL without memory. */
static float *interleave_tiles(const float *x, int64_t rows, int64_t x_stride, int64_t k) {
    float *xt = malloc(sizeof(float) * (size_t)(rows * k));
    if (xt == NULL) return NULL;
    int64_t r = 0;
    for (int64_t t = 0, count = tile_count(rows); t < count; t++) {
        const int64_t size = tile_size(rows - r, count - t);
        float *dst = xt + r * k;
        for (int64_t i = 0; i < size; i++)
            for (int64_t kk = 0; kk < k; kk++) dst[kk * size + i] = x[(r + i) * x_stride + kk];
        r += size;
    }
    return xt;
}
#else
/* AVX2 and generic: rows in tiles of 4, 3 or 2 (a last row: row1): a tile decodes the
 * block's weights once for all its rows, where one pass per row would decode them again. A
 * tile of 2 rows runs two k-streams per row so that enough FMA chains are in flight; 3 and
 * 4 rows (two vectors per block on AVX2) have enough, and with two streams the registers
 * would not hold them. */
#define PAIR 1 /* B is 1 here, bstride unused */
INLINE_DECL int64_t tiles(const struct qargs *a, const uint8_t *src, int64_t bstride,
                          int64_t nb, int64_t rows, const int bits, const int B) {
    (void)bstride, (void)B; /* returns the rows done: all but a last one */
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) tile(a, src, nb, r, bits, 4, 1);
    if (rows - r == 3) tile(a, src, nb, r, bits, 3, 1), r += 3;
    else if (rows - r == 2) tile(a, src, nb, r, bits, 2, 2), r += 2;
    return r;
}

#endif

/* B adjacent 16-column blocks for every row: the tiles read the scaled floats `wf` where
 * the caller made them (scaled_block, below), else the packed ints; a row the tiles leave
 * (AVX2 and generic: a last odd one) runs row1. */
INLINE_DECL void block(const struct qargs *a, const uint8_t *blk, const float *wf, int64_t nb,
                       int64_t rows, const int bits, const int B) {
    const int64_t bytes = a->k * COLS * bits / 8; /* one block's packed ints */
    const int64_t r = wf != NULL
        ? tiles(a, (const uint8_t *)wf, a->k * COLS * 4, nb, rows, 32, B)
        : tiles(a, blk, bytes, nb, rows, bits, B);
    if (r < rows)
        for (int b = 0; b < B; b++) row1(a, blk + b * bytes, nb + b, r, bits);
}

/* Batches of batch_rows rows or more: each block's weights are converted once into a
 * float scratch [K][16], already multiplied by their scales (the very floats a tile
 * computes from the packed ints, so the results are bit for bit the same), and the tiles
 * read those: the conversion is paid once per block and step rather than once per tile,
 * and a tile is its multiply-adds. A last single row (row1) reads the packed ints. With
 * AVX2, below 16 rows converting costs more than it saves: on the Xeon (2 threads, int8
 * lm_head of the default model, 576 x 49152) the packed tiles took 2.4 against 3.9 ms at
 * 5 rows and 4.2 against 5.2 at 9; from 24 rows the scratch wins (23 against 37 ms at
 * 64). */
#if W == 16 /* AVX-512's paired tiles: the packed ints win below 32 rows (Ice Lake, same run:
             * 16 rows 42 against 46 ms), the scratch from there (64 rows 150 against 166) */
static int batch_rows = 32;
#else
static int batch_rows = 16;
#endif

/* Set the batch size from which the float scratch is used (for A/B runs and tests);
 * returns the previous value. */
int quant_linear_set_batch_rows(int rows) {
    return __atomic_exchange_n(&batch_rows, rows < 1 ? 1 : rows, __ATOMIC_RELAXED);
}

static void scaled_block(const struct qargs *a, const uint8_t *blk, int64_t nb, int bits,
                         float *out) {
    const int64_t pf = prefetch_distance();
    const float *sc = a->scale + nb * a->groups * COLS;
    for (int64_t g = 0; g < a->groups; g++) {
        prefetch_lines(blk + g * a->group * COLS * bits / 8, a->group * COLS * bits / 8, pf);
        prefetch_lines(sc + g * COLS, 64, pf / 4);
        vf s[H];
        for (int h = 0; h < H; h++) s[h] = VLOAD(sc + g * COLS + h * W);
        for (int64_t k = g * a->group; k < (g + 1) * a->group; k += 2)
            for (int h = 0; h < H; h++) {
                vf lo, hi;
                if (bits == 8) {
                    lo = q8(blk + k * COLS + h * W);
                    hi = q8(blk + (k + 1) * COLS + h * W);
                } else {
                    q4(blk + (k / 2) * COLS + h * W, &lo, &hi);
                }
                VSTORE(out + k * COLS + h * W, VMUL(lo, s[h]));
                VSTORE(out + (k + 1) * COLS + h * W, VMUL(hi, s[h]));
            }
    }
}

static float *group_sums(const float *x, int64_t rows, int64_t x_stride, int64_t k,
                         int64_t group) {
    const int64_t groups = k / group;
    float *sums = malloc(sizeof(float) * (size_t)(rows * groups));
    if (sums == NULL) return NULL;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t i = 0; i < group; i++) s += x[r * x_stride + g * group + i];
            sums[r * groups + g] = s;
        }
    return sums;
}

/* One row (single-stream decode) in a function of its own: inside the batched loop's, with
 * its many inlined tiles, the compiler laid it out ~10% slower (Ice Lake, same run). */
__attribute__((noinline)) static void one_row(const struct qargs *a, int64_t bits) {
    const int64_t bytes = a->k * COLS * bits / 8;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < a->n / COLS; nb++) {
        if (bits == 8) row1(a, a->q + nb * bytes, nb, 0, 8); /* literal bits: inlined */
        else row1(a, a->q + nb * bytes, nb, 0, 4);
    }
}

int quant_linear_f32(const float *x, int64_t rows, int64_t x_stride, const uint8_t *q,
                     const float *scale, const float *min, const float *bias, int64_t n,
                     int64_t k, int64_t group, int64_t bits, float *y, int64_t y_stride) {
    if (rows == 0) return 0;
    if (rows < 0 || rows > MAX_ROWS || n % COLS || group < 4 || group % 4 || k % group ||
        (bits != 8 && bits != 4))
        return 1;
    struct qargs a = {.x = x, .x_stride = x_stride, .n = n, .k = k, .group = group, .q = q,
                      .scale = scale, .min = min, .bias = bias, .y = y, .y_stride = y_stride,
                      .groups = k / group};
    float *sums = NULL, *xt = NULL;
    if (min != NULL && (sums = group_sums(x, rows, x_stride, k, group)) == NULL) return 2;
#if W == 16
    if (rows >= 2 && (xt = interleave_tiles(x, rows, x_stride, k)) == NULL) {
        free(sums);
        return 2;
    }
#endif
    a.xsum = sums;
    a.xt = xt;
    if (rows == 1) {
        one_row(&a, bits);
        free(sums);
        return 0;
    }
    const int64_t blocks = n / COLS, bytes = k * COLS * bits / 8;
#pragma omp parallel
    {
        /* without its scratch (no memory), a thread tiles on the packed ints: the same
         * results, only slower */
        const int first = __atomic_load_n(&batch_rows, __ATOMIC_RELAXED);
        float *scaled = rows >= first ? malloc(sizeof(float) * (size_t)(PAIR * k * COLS))
                                      : NULL;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < (blocks + PAIR - 1) / PAIR; p++) {
            const int64_t nb = p * PAIR;
            const uint8_t *blk = q + nb * bytes;
            const int two = PAIR == 2 && nb + 1 < blocks; /* else an odd last block */
            if (scaled != NULL)
                for (int b = 0; b < 1 + two; b++)
                    scaled_block(&a, blk + b * bytes, nb + b, (int)bits, scaled + b * k * COLS);
            if (two && bits == 8) block(&a, blk, scaled, nb, rows, 8, 2); /* literals: */
            else if (two) block(&a, blk, scaled, nb, rows, 4, 2);        /* inlined */
            else if (bits == 8) block(&a, blk, scaled, nb, rows, 8, 1);
            else block(&a, blk, scaled, nb, rows, 4, 1);
        }
        free(scaled);
    }
    free(sums);
    free(xt);
    return 0;
}

/* The float32 weight [N][K] back from the packed form (for batches above MAX_ROWS). */
int quant_dequantize_f32(const uint8_t *q, const float *scale, const float *min, int64_t n,
                         int64_t k, int64_t group, int64_t bits, float *w) {
    if (n % COLS || group < 4 || group % 4 || k % group || (bits != 8 && bits != 4)) return 1;
    const int64_t groups = k / group, bytes_per_k = bits == 8 ? COLS : COLS / 2;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < n / COLS; nb++) {
        const uint8_t *blk = q + nb * k * bytes_per_k;
        for (int64_t kk = 0; kk < k; kk++) {
            const int64_t g = kk / group, at = (nb * groups + g) * COLS;
            for (int c = 0; c < COLS; c++) {
                float v;
                if (bits == 8) v = (float)(int8_t)blk[kk * COLS + c];
                else v = (float)((blk[(kk / 2) * COLS + c] >> (4 * (kk & 1))) & 15);
                w[(nb * COLS + c) * k + kk] = v * scale[at + c] + (min ? min[at + c] : 0.0f);
            }
        }
    }
    return 0;
}

int quant_linear_max_rows(void) { return MAX_ROWS; }
