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
 *
 * AMX (Sapphire Rapids and later, built where the compiler targets AMX-BF16): from
 * amx_min_rows rows, each group's 16 columns are unpacked the same way into a 16-pair-row
 * B tile in L1 and multiplied by the rows' bf16 inputs with one tile dot product, whose
 * cost does not grow with the rows; the group's float32 sums are then scaled as above.
 * Where the column blocks pair up, two row tiles and two column blocks go together (four
 * C tiles): each unpacked B tile serves both row tiles and each loaded A tile both
 * blocks, a fifth less time at 32 and 64 rows than a block and a tile at a time.
 * Same products, float32 sums (in another order). Linux must grant the tile state first
 * (arch_prctl); `quant_i4bf16_use_amx` asks, or turns the path off (KVMESH_AMX=0).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

#define COLS 16
#define MAX_ROWS 16

#define AMX_MAX_ROWS 64 /* with AMX: batches in tiles of up to 16 rows */

static int use_amx = 0; /* read once per call: toggling it mid-run is safe */

/* quant_deq_amx.c: the largest batches, weights dequantized to bf16 on the tiles */
int quant_i4bf16_deq_min_rows(void);
int quant_i4bf16_deq_amx(const float *x, int64_t x_stride, int64_t rows, const uint32_t *q,
                         const float *scale, const float *min, const float *bias, int64_t n,
                         int64_t k, int64_t group, float *y, int64_t y_stride);

int quant_i4bf16_max_rows(void) {
    return __atomic_load_n(&use_amx, __ATOMIC_RELAXED) ? AMX_MAX_ROWS : MAX_ROWS;
}

/* AMX granted and on (quant_i8amx.c asks too) */
int quant_amx_enabled(void) { return __atomic_load_n(&use_amx, __ATOMIC_RELAXED); }

int quant_i4bf16_available(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
#define AMX_BUILT 1
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define AMX_BUILT 0
#endif
/* From 3 rows: on the Xeon with AMX, the default model's verify steps of 2 rows (one
 * drafted token) took 8.44 ms with 2-row batches on the tiles and 8.07 on AVX-512
 * (benchmarks/verify_step.py, variant linears_from_2), though these linears alone, called
 * back to back, were faster on the tiles (4.24 against 4.72 ms); at 1 row AVX-512 is as
 * fast or faster either way. */
static int amx_min_rows = 3;

/* The fewest rows that take the tiles (for A/B runs); returns the previous value. */
int quant_i4bf16_set_amx_min_rows(int rows) {
    return __atomic_exchange_n(&amx_min_rows, rows < 1 ? 1 : rows, __ATOMIC_RELAXED);
}

static int64_t amx_calls = 0;  /* calls that took the tile path (tests ask) */
static int use_pipe = 1;       /* the pipelined one-row-tile path (amx_pipe21); 0 for A/B */

/* want 1: one row tile of the paired AMX path runs pipelined over the groups (the
 * default), 0: as the two-row-tile path does. Same results; returns the previous value. */
int quant_i4bf16_use_pipe(int want) {
    return __atomic_exchange_n(&use_pipe, want != 0, __ATOMIC_RELAXED);
}

int quant_i4bf16_amx_built(void) { return AMX_BUILT; }

int64_t quant_i4bf16_amx_calls(void) { return __atomic_load_n(&amx_calls, __ATOMIC_RELAXED); }

/* want 1: use AMX where it is built and Linux grants the tile state (asked once per
 * process; every thread inherits it); 0: don't. Returns 1 if it is on now, 0 if off by
 * request or not built, -errno where Linux refused the tile state. */
int quant_i4bf16_use_amx(int want) {
#if AMX_BUILT
    static int granted = 1; /* 1: not asked yet, 0: granted, < 0: -errno */
    if (want && __atomic_load_n(&granted, __ATOMIC_ACQUIRE) == 1) {
        /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
        const int rc = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 0 : -errno;
        __atomic_store_n(&granted, rc, __ATOMIC_RELEASE);
    }
    const int on = want && __atomic_load_n(&granted, __ATOMIC_ACQUIRE) == 0;
    __atomic_store_n(&use_amx, on, __ATOMIC_RELAXED);
    return want && !on ? __atomic_load_n(&granted, __ATOMIC_ACQUIRE) : on;
#else
    (void)want;
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

/* One group of inputs rounded to bf16 (stored in order: the pairs' layout) and the sum of
 * the rounded values. (The vector conversion flushes float32 denormals to zero, the scalar
 * one for groups that are not a multiple of 16 keeps them: a difference below 1e-38.) */
static float round_group(const float *x, int64_t group, uint16_t *out) {
    if (group % 16) {
        float s = 0.0f;
        for (int64_t i = 0; i < group; i++) {
            out[i] = f32_to_bf16(x[i]);
            s += bf16_to_f32(out[i]);
        }
        return s;
    }
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < group; i += 16) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
        _mm256_storeu_si256((__m256i *)(out + i), h);
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(
                                     _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    return _mm512_reduce_add_ps(sum);
}

/* R rows x one 16-column block; U accumulators per row (U k-pair streams). */
static inline __attribute__((always_inline)) void tile(const struct bargs *a, int64_t nb,
                                                        int64_t row0, const int R,
                                                        const int U) {
    const int64_t pf = prefetch_distance();
    const __m512i mask = _mm512_set1_epi32(0x000F000F);
    const __m512i hi_bits = _mm512_set1_epi32(0x43004300); /* bf16(128) in both halves */
    const uint32_t *blk = a->q + nb * (a->k / 8) * COLS;
    const int64_t half = a->k / 2, chunks = a->group / 8;
    __m512 tot[R];
    for (int r = 0; r < R; r++) tot[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a->groups; g++) {
        prefetch_lines(a->scale + (nb * a->groups + g) * COLS, 64, pf / 4);
        prefetch_lines(a->min128 + (nb * a->groups + g) * COLS, 64, pf / 4);
        __m512 acc[R][U];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < U; u++) acc[r][u] = _mm512_setzero_ps();
        for (int64_t c = g * chunks; c < (g + 1) * chunks; c++) {
            prefetch_lines(blk + c * COLS, 64, pf);
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

#if AMX_BUILT
/* Tiles: C 0 and 1 (rows x 16 float), A 2 and 3 (rows x kk bf16), B 4 and 5 (kk/2
 * pair-rows x 16 columns); even groups use the first of each pair, odd ones the second. */
static void amx_configure(int64_t rows, int64_t kk) {
    struct amx_tile_config c = {0};
    c.palette = 1;
    for (int t = 0; t < 2; t++) {
        c.rows[t] = c.rows[2 + t] = (uint8_t)rows;
        c.colsb[t] = 64;
        c.colsb[2 + t] = (uint16_t)(2 * kk);
        c.rows[4 + t] = (uint8_t)(kk / 2);
        c.colsb[4 + t] = 64;
    }
    _tile_loadconfig(&c);
}

struct amx_work {
    const struct bargs *a;
    const uint32_t *blk;  /* this column block's packed ints */
    int64_t nb, rows, kk, tiles;
    uint32_t *b;          /* 2 x 16 pair-rows x 16 lanes: one B buffer per tile set */
    float *c, *tot;       /* 2 x rows x 16 C floats; rows x 16 running sums */
    int64_t pf;           /* prefetch distance (vec_math.h) */
};

/* The k-pairs [c0 * 4, c0 * 4 + kk / 2) of a column block's packed ints into B buffer bt. */
static inline void unpack_b(const uint32_t *blk, int64_t c0, int64_t kk, uint32_t *bt,
                            int64_t pf) {
    const __m512i mask = _mm512_set1_epi32(0x000F000F);
    const __m512i hi_bits = _mm512_set1_epi32(0x43004300);
    for (int64_t ch = 0; ch < kk / 8; ch++) {
        prefetch_lines(blk + (c0 + ch) * COLS, 64, pf);
        const __m512i lane = _mm512_loadu_si512(blk + (c0 + ch) * COLS);
        for (int p = 0; p < 4; p++)
            _mm512_store_si512(bt + (4 * ch + p) * COLS,
                               _mm512_ternarylogic_epi32(_mm512_srli_epi32(lane, 4 * p), mask,
                                                         hi_bits, 0xEA));
    }
}

/* Unpack the k-pairs [c0 * 4, c0 * 4 + kk / 2) of the block into B buffer `which`. */
static inline void amx_unpack(const struct amx_work *w, int64_t c0, int which) {
    unpack_b(w->blk, c0, w->kk, w->b + which * 16 * COLS, w->pf);
}

/* Issue group g's tile products into C tile (g & 1), with its A and B tiles. */
#define AMX_ISSUE(W, G, CT, AT, BT)                                                        \
    do {                                                                                   \
        _tile_zero(CT);                                                                    \
        for (int64_t t_ = 0; t_ < (W)->tiles; t_++) {                                      \
            const int64_t c0_ = (G) * ((W)->a->group / 8) + t_ * ((W)->kk / 8);           \
            amx_unpack(W, c0_, (CT));                                                      \
            _tile_loadd(AT, (W)->a->xb + c0_ * 4, (W)->a->k * 2);                          \
            _tile_loadd(BT, (W)->b + (CT) * 16 * COLS, 64);                                \
            _tile_dpbf16ps(CT, AT, BT);                                                    \
        }                                                                                  \
    } while (0)

/* Fold group g's C tile (already stored to c + which) into the running sums. */
static inline void amx_scale(const struct amx_work *w, int64_t g, int which) {
    const struct bargs *a = w->a;
    const float *c = w->c + which * MAX_ROWS * COLS;
    const __m512 s = _mm512_loadu_ps(a->scale + (w->nb * a->groups + g) * COLS);
    const __m512 m = _mm512_loadu_ps(a->min128 + (w->nb * a->groups + g) * COLS);
    for (int64_t r = 0; r < w->rows; r++) {
        __m512 acc = _mm512_fmadd_ps(_mm512_load_ps(c + r * COLS), s,
                                     _mm512_load_ps(w->tot + r * COLS));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a->xsum[r * a->groups + g]), m, acc);
        _mm512_store_ps(w->tot + r * COLS, acc);
    }
}

/* All rows x one 16-column block through the tile unit. A pipeline over the groups: group
 * g's products are issued, then group g-1's C tile is stored and group g-2's stored sums
 * are scaled, so no step waits on the one just before it. */
static void amx_block(struct amx_work *w) {
    const struct bargs *a = w->a;
    const int64_t groups = a->groups;
    for (int64_t r = 0; r < w->rows; r++)
        _mm512_store_ps(w->tot + r * COLS, _mm512_setzero_ps());
    float *c0 = w->c, *c1 = w->c + MAX_ROWS * COLS;
    for (int64_t g = 0; g < groups; g++) {
        if (g % 2 == 0) {
            AMX_ISSUE(w, g, 0, 2, 4);
            if (g >= 1) _tile_stored(1, c1, 64);
        } else {
            AMX_ISSUE(w, g, 1, 3, 5);
            _tile_stored(0, c0, 64);
        }
        if (g >= 2) amx_scale(w, g - 2, g % 2);
    }
    if (groups >= 2) amx_scale(w, groups - 2, groups % 2);
    if ((groups - 1) % 2 == 0) _tile_stored(0, c0, 64);
    else _tile_stored(1, c1, 64);
    amx_scale(w, groups - 1, (groups - 1) % 2);
    for (int64_t r = 0; r < w->rows; r++) {
        __m512 out = _mm512_load_ps(w->tot + r * COLS);
        if (a->bias) out = _mm512_add_ps(out, _mm512_loadu_ps(a->bias + w->nb * COLS));
        _mm512_storeu_ps(a->y + r * a->y_stride + w->nb * COLS, out);
    }
}

/* The paired path: C tiles 0-3 ([row tile][column block]), A 4 and 5 (a row tile each),
 * B 6 and 7 (a column block each), so each unpacked B tile serves two row tiles and each
 * loaded A tile two column blocks. */
static void amx_configure22(int64_t rows, int64_t kk) {
    struct amx_tile_config c = {0};
    c.palette = 1;
    for (int t = 0; t < 4; t++) c.rows[t] = (uint8_t)rows, c.colsb[t] = 64;
    for (int t = 4; t < 6; t++) c.rows[t] = (uint8_t)rows, c.colsb[t] = (uint16_t)(2 * kk);
    for (int t = 6; t < 8; t++) c.rows[t] = (uint8_t)(kk / 2), c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* Fold group g's stored C tiles (cs: [row tile][column block] of MAX_ROWS x 16 floats)
 * into the running sums of blocks nb and nb + 1, rows [r0, r0 + RT * R). */
static inline void fold22(const struct bargs *a, int64_t nb, int64_t g, int64_t r0, int64_t R,
                          int RT, const float *cs, float *tot, int64_t pf) {
    for (int cb = 0; cb < 2; cb++) {
        prefetch_lines(a->scale + ((nb + cb) * a->groups + g) * COLS, 64, pf / 4);
        prefetch_lines(a->min128 + ((nb + cb) * a->groups + g) * COLS, 64, pf / 4);
        const __m512 s = _mm512_loadu_ps(a->scale + ((nb + cb) * a->groups + g) * COLS);
        const __m512 m = _mm512_loadu_ps(a->min128 + ((nb + cb) * a->groups + g) * COLS);
        for (int rt = 0; rt < RT; rt++) {
            const float *ct = cs + (rt * 2 + cb) * MAX_ROWS * COLS;
            float *tt = tot + (rt * 2 + cb) * MAX_ROWS * COLS;
            const float *xs = a->xsum + (r0 + rt * R) * a->groups + g;
            for (int64_t r = 0; r < R; r++) {
                __m512 acc = _mm512_fmadd_ps(_mm512_load_ps(ct + r * COLS), s,
                                             _mm512_load_ps(tt + r * COLS));
                acc = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * a->groups]), m, acc);
                _mm512_store_ps(tt + r * COLS, acc);
            }
        }
    }
}

static inline void zero22(int64_t R, int RT, float *tot) {
    for (int rt = 0; rt < RT; rt++)
        for (int cb = 0; cb < 2; cb++)
            for (int64_t r = 0; r < R; r++)
                _mm512_store_ps(tot + ((rt * 2 + cb) * MAX_ROWS + r) * COLS, _mm512_setzero_ps());
}

/* The running sums (+ bias) out to y, real rows only. */
static inline void out22(const struct bargs *a, int64_t nb, int64_t r0, int64_t rows, int64_t R,
                         int RT, const float *tot) {
    for (int rt = 0; rt < RT; rt++)
        for (int cb = 0; cb < 2; cb++) {
            const float *tt = tot + (rt * 2 + cb) * MAX_ROWS * COLS;
            for (int64_t r = 0; r < R && r0 + rt * R + r < rows; r++) {
                __m512 out = _mm512_load_ps(tt + r * COLS);
                if (a->bias) out = _mm512_add_ps(out, _mm512_loadu_ps(a->bias + (nb + cb) * COLS));
                _mm512_storeu_ps(a->y + (r0 + rt * R + r) * a->y_stride + (nb + cb) * COLS, out);
            }
        }
}

/* Rows [r0, r0 + RT * R) (RT row tiles of R rows; xb and xsum padded with zeros to whole
 * tiles) x column blocks nb and nb + 1. Per group: both blocks unpacked, both row tiles'
 * inputs loaded, four tile products, the four C tiles stored (alternating buffers) and
 * folded into the running sums. */
static void amx_block22(const struct bargs *a, int64_t nb, int64_t r0, int64_t rows, int64_t R,
                        int RT, int64_t kk, uint32_t *b, float *c, float *tot) {
    const int64_t half = a->k / 2, tiles = a->group / kk, pf = prefetch_distance();
    const uint32_t *blk0 = a->q + nb * (a->k / 8) * COLS, *blk1 = blk0 + (a->k / 8) * COLS;
    zero22(R, RT, tot);
    for (int64_t g = 0; g < a->groups; g++) {
        _tile_zero(0);
        _tile_zero(1);
        if (RT == 2) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t c0 = g * (a->group / 8) + t * (kk / 8);
            unpack_b(blk0, c0, kk, b, pf);
            unpack_b(blk1, c0, kk, b + 16 * COLS, pf);
            _tile_loadd(6, b, 64);
            _tile_loadd(7, b + 16 * COLS, 64);
            _tile_loadd(4, a->xb + r0 * half + c0 * 4, a->k * 2);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (RT == 2) {
                _tile_loadd(5, a->xb + (r0 + R) * half + c0 * 4, a->k * 2);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        float *cs = c + (g & 1) * 4 * MAX_ROWS * COLS;
        _tile_stored(0, cs, 64);
        _tile_stored(1, cs + MAX_ROWS * COLS, 64);
        if (RT == 2) {
            _tile_stored(2, cs + 2 * MAX_ROWS * COLS, 64);
            _tile_stored(3, cs + 3 * MAX_ROWS * COLS, 64);
        }
        fold22(a, nb, g, r0, R, RT, cs, tot, pf);
    }
    out22(a, nb, r0, rows, R, RT, tot);
}

#define PIPE_TILES 4 /* most tile products per group (group / kk) in the pipelined path */

/* Group g's tile products for one row tile: B from the buffer unpacked the group before,
 * into C tiles CA and CB (0 and 1 for even groups, 2 and 3 for odd ones). */
#define PIPE_ISSUE(CA, CB)                                                                  \
    do {                                                                                    \
        _tile_zero(CA);                                                                     \
        _tile_zero(CB);                                                                     \
        for (int64_t t = 0; t < tiles; t++) {                                               \
            const int64_t c0 = g * (a->group / 8) + t * (kk / 8);                          \
            _tile_loadd(6, bg + 2 * t * 16 * COLS, 64);                                     \
            _tile_loadd(7, bg + (2 * t + 1) * 16 * COLS, 64);                               \
            _tile_loadd(4, a->xb + r0 * half + c0 * 4, a->k * 2);                           \
            _tile_dpbf16ps(CA, 4, 6);                                                       \
            _tile_dpbf16ps(CB, 4, 7);                                                       \
        }                                                                                   \
    } while (0)

/* Group g's k of column blocks nb and nb + 1 (blk0, and the block after it) unpacked into
 * the B buffer bn: tile product t's two B tiles at 2t and 2t + 1. */
static inline void pipe_unpack(const struct bargs *a, const uint32_t *blk0, int64_t g,
                               int64_t kk, uint32_t *bn, int64_t pf) {
    const uint32_t *blk1 = blk0 + (a->k / 8) * COLS;
    for (int64_t t = 0; t < a->group / kk; t++) {
        const int64_t c0 = g * (a->group / 8) + t * (kk / 8);
        unpack_b(blk0, c0, kk, bn + 2 * t * 16 * COLS, pf);
        unpack_b(blk1, c0, kk, bn + (2 * t + 1) * 16 * COLS, pf);
    }
}

/* Group g's two C tiles (0-1 for even groups, 2-3 for odd ones) into its half of c. */
static inline void pipe_store(int64_t g, float *c) {
    float *cs = c + (g & 1) * 4 * MAX_ROWS * COLS;
    if (g & 1) {
        _tile_stored(2, cs, 64);
        _tile_stored(3, cs + MAX_ROWS * COLS, 64);
    } else {
        _tile_stored(0, cs, 64);
        _tile_stored(1, cs + MAX_ROWS * COLS, 64);
    }
}

/* One row tile (R rows) x column blocks nb and nb + 1, software-pipelined over the groups:
 * while group g's tile products run (C tiles alternating between pairs 0-1 and 2-3), group
 * g + 1 is unpacked into the other B buffer, group g - 1's C tiles are stored and group
 * g - 2's folded into the sums. amx_block22 instead waits on each group's unpacked B
 * (stores, then tile loads of them) and its C (tile stores, then loads): at the few rows of
 * a verify step or a small batch, that waiting was most of the time. Same products and
 * sums, in the same order, as amx_block22. b: 2 x PIPE_TILES x 2 x 16 x 16 uint32. */
static void amx_pipe21(const struct bargs *a, int64_t nb, int64_t r0, int64_t rows, int64_t R,
                       int64_t kk, uint32_t *b, float *c, float *tot) {
    const int64_t half = a->k / 2, tiles = a->group / kk, groups = a->groups;
    const int64_t pf = prefetch_distance(), buf = PIPE_TILES * 2 * 16 * COLS;
    const uint32_t *blk0 = a->q + nb * (a->k / 8) * COLS;
    zero22(R, 1, tot);
    pipe_unpack(a, blk0, 0, kk, b, pf);
    for (int64_t g = 0; g < groups; g++) {
        const uint32_t *bg = b + (g & 1) * buf;
        if (g & 1) PIPE_ISSUE(2, 3);
        else PIPE_ISSUE(0, 1);
        if (g + 1 < groups) pipe_unpack(a, blk0, g + 1, kk, b + ((g + 1) & 1) * buf, pf);
        if (g >= 1) pipe_store(g - 1, c);
        if (g >= 2) fold22(a, nb, g - 2, r0, R, 1, c + (g & 1) * 4 * MAX_ROWS * COLS, tot, pf);
    }
    pipe_store(groups - 1, c);
    if (groups >= 2) fold22(a, nb, groups - 2, r0, R, 1, c + (groups & 1) * 4 * MAX_ROWS * COLS,
                            tot, pf);
    fold22(a, nb, groups - 1, r0, R, 1, c + ((groups - 1) & 1) * 4 * MAX_ROWS * COLS, tot, pf);
    out22(a, nb, r0, rows, R, 1, tot);
}

/* The paired AMX path for all `rows` (xb, xsum padded to whole tiles of R rows), or 0
 * where the columns do not pair up. */
static int amx_run22(const struct bargs *a, int64_t n, int64_t rows, int64_t R) {
    int64_t kk = 32;
    while (a->group % kk) kk -= 8;
    if (!__atomic_load_n(&use_amx, __ATOMIC_RELAXED) ||
        rows < __atomic_load_n(&amx_min_rows, __ATOMIC_RELAXED) ||
        (n / COLS) % 2)
        return 0;
    __atomic_fetch_add(&amx_calls, 1, __ATOMIC_RELAXED);
    const int64_t pass = 2 * R, passes = (rows + pass - 1) / pass;
    const int pipe = __atomic_load_n(&use_pipe, __ATOMIC_RELAXED);
#pragma omp parallel
    {
        uint32_t b[2 * PIPE_TILES * 2 * 16 * COLS] __attribute__((aligned(64)));
        float c[2 * 4 * MAX_ROWS * COLS] __attribute__((aligned(64)));
        float tot[4 * MAX_ROWS * COLS] __attribute__((aligned(64)));
        amx_configure22(R, kk);
#pragma omp for schedule(static)
        for (int64_t nb2 = 0; nb2 < n / (2 * COLS); nb2++)
            for (int64_t p = 0; p < passes; p++) {
                const int64_t r0 = p * pass;
                const int RT = rows - r0 > R ? 2 : 1;
                if (RT == 1 && pipe && a->group / kk <= PIPE_TILES)
                    amx_pipe21(a, 2 * nb2, r0, rows, R, kk, b, c, tot);
                else
                    amx_block22(a, 2 * nb2, r0, rows, R, RT, kk, b, c, tot);
            }
        _tile_release();
    }
    return 1;
}

/* The AMX path for up to 16 rows and one column block at a time: where the column blocks
 * do not pair up. 0 where it does not apply (then the AVX-512 one runs). */
static int amx_run(const struct bargs *a, int64_t n, int64_t rows) {
    int64_t kk = 32; /* k per tile product: the largest of 32, 24, 16, 8 in the group */
    while (a->group % kk) kk -= 8;
    if (!__atomic_load_n(&use_amx, __ATOMIC_RELAXED) ||
        rows < __atomic_load_n(&amx_min_rows, __ATOMIC_RELAXED))
        return 0;
    __atomic_fetch_add(&amx_calls, 1, __ATOMIC_RELAXED);
#pragma omp parallel
    {
        uint32_t b[2 * 16 * COLS] __attribute__((aligned(64)));
        float c[2 * MAX_ROWS * COLS] __attribute__((aligned(64)));
        float tot[MAX_ROWS * COLS] __attribute__((aligned(64)));
        struct amx_work w = {a, NULL, 0, rows, kk, a->group / kk, b, c, tot,
                             prefetch_distance()};
        amx_configure(rows, kk);
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < n / COLS; nb++) {
            w.nb = nb;
            w.blk = a->q + nb * (a->k / 8) * COLS;
            amx_block(&w);
        }
        _tile_release();
    }
    return 1;
}
#endif

/* One column block for `rows` rows: tiles of 3 to 8 rows, as few and as even as fit (9
 * rows: 5 + 4), then a tile of 2 or 1. Each tile unpacks the block's weights once, so
 * fewer tiles unpack less (9 rows were 4 + 4 + 1: three unpackings for one dot product a
 * row per 32 weights). */
static void block(const struct bargs *a, int64_t nb, int64_t rows) {
    int64_t r = 0;
    while (rows - r >= 3) {
        const int64_t left = rows - r, tiles = (left + 7) / 8, R = (left + tiles - 1) / tiles;
        switch (R) { /* literal rows: the accumulators stay in registers */
        case 3: tile(a, nb, r, 3, 1); break;
        case 4: tile(a, nb, r, 4, 1); break;
        case 5: tile(a, nb, r, 5, 1); break;
        case 6: tile(a, nb, r, 6, 1); break;
        case 7: tile(a, nb, r, 7, 1); break;
        default: tile(a, nb, r, 8, 1); break;
        }
        r += R;
    }
    if (rows - r == 2) tile(a, nb, r, 2, 2);
    else if (rows - r == 1) tile(a, nb, r, 1, 4);
}
#endif

int quant_linear_i4bf16(const float *x, int64_t rows, int64_t x_stride, const uint32_t *q,
                        const float *scale, const float *min128, const float *min,
                        const float *bias, int64_t n, int64_t k, int64_t group, float *y,
                        int64_t y_stride) {
    if (rows == 0) return 0;
    /* any number of rows up to AMX_MAX_ROWS gives right results, 16 at a time on either
     * path (callers ask quant_i4bf16_max_rows() for the batches worth sending) */
    if (rows < 0 || rows > AMX_MAX_ROWS || n % COLS || group % 8 || group < 8 || k < group ||
        k % group)
        return 1;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#if AMX_BUILT
    if (min != NULL && __atomic_load_n(&use_amx, __ATOMIC_RELAXED) &&
        rows >= quant_i4bf16_deq_min_rows() &&
        quant_i4bf16_deq_amx(x, x_stride, rows, q, scale, min, bias, n, k, group, y,
                             y_stride) == 0) {
        __atomic_fetch_add(&amx_calls, 1, __ATOMIC_RELAXED);
        return 0;
    }
#endif
    const int64_t groups = k / group, half = k / 2;
    /* row tiles of R rows for the paired AMX path, as few as fit and as even as they can
     * be (5 rows: one tile of 5, not of 8; 20: two of 10): a tile product and its C-tile
     * fold cost by the tile's rows, padding rows included. xb and xsum are padded with
     * zeros to whole tiles. */
    const int64_t row_tiles = (rows + MAX_ROWS - 1) / MAX_ROWS;
    const int64_t R = rows < 1 ? 1 : (rows + row_tiles - 1) / row_tiles;
    const int64_t padded = (rows + 2 * R - 1) / (2 * R) * (2 * R);
    uint32_t *xb = calloc((size_t)(padded * half), sizeof(uint32_t));
    float *xsum = calloc((size_t)(padded * groups), sizeof(float));
    if (xb == NULL || xsum == NULL) {
        free(xb);
        free(xsum);
        return 2;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++)
            xsum[r * groups + g] = round_group(x + r * x_stride + g * group, group,
                                               (uint16_t *)(xb + r * half) + g * group);
#if AMX_BUILT
    const struct bargs all = {q, xb, scale, min128, bias, xsum, y, k, group, groups, y_stride};
    if (amx_run22(&all, n, rows, R)) {
        free(xb);
        free(xsum);
        return 0;
    }
#endif
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) { /* over 16 rows: AMX, 16 at a time */
        const int64_t part = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
        const struct bargs a = {q,     xb + r0 * half, scale, min128, bias, xsum + r0 * groups,
                                y + r0 * y_stride, k, group, groups, y_stride};
#if AMX_BUILT
        if (amx_run(&a, n, part)) continue;
#endif
#pragma omp parallel for schedule(static)
        for (int64_t nb = 0; nb < n / COLS; nb++) block(&a, nb, part);
    }
    free(xb);
    free(xsum);
    return 0;
#else
    (void)x, (void)x_stride, (void)q, (void)scale, (void)min128, (void)min, (void)bias, (void)y;
    (void)y_stride;
    return 3;
#endif
}
