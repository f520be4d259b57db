/* Paged attention for consecutive query tokens of one sequence on AMX tiles (bf16 cache):
 * the rows of a verify step of speculative decoding, which paged_decode.c would treat as
 * separate sequences, each reading the whole context again with vector instructions.
 *
 * Row r attends the sequence's first len0 + r tokens (row 0 is the first drafted
 * position's query, so the rows' lengths ascend by one: causal). Per KV head and tile of up
 * to 16 of its query vectors (rows x the query heads it serves):
 *   1. scores S = Q K^T on the tiles, 16 tokens at a time (K^T gathered into bf16 pairs:
 *      the products are exact in float32, as paged_decode's dot products are);
 *   2. per query, softmax over its own tokens in float32, the weights P rounded to bf16
 *      (as flash attention does on GPUs; paged_decode keeps them float32);
 *   3. out = P V on the tiles, V interleaved into token pairs, float32 sums, / the sum.
 * The whole context's scores are kept (two passes, no online rescaling): a few KB a query.
 * Items (KV head x query tile) are shared among the OpenMP threads. Needs AVX-512 BF16 and
 * AMX (granted: quant_amx_enabled), a head dim of 64 or 128 and a block size that is a
 * multiple of 16; returns 3 where it is not built or AMX is off, 1 on a shape it does not
 * take (the caller then runs paged_decode), 2 for lengths past the table or without memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

int quant_amx_enabled(void); /* quant_bf16.c */

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
#define VERIFY_BUILT 1
#include <immintrin.h>
#else
#define VERIFY_BUILT 0
#endif

int paged_verify_available(void) { return VERIFY_BUILT && quant_amx_enabled(); }

static int64_t verify_calls = 0; /* calls that ran (tests ask) */

int64_t paged_verify_calls(void) { return __atomic_load_n(&verify_calls, __ATOMIC_RELAXED); }

#if VERIFY_BUILT
#define QT 16 /* query vectors per tile */

struct vargs {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    const int64_t *table;
    int64_t q_stride, block_stride, len0, rows, heads, kv_heads, dim, block_size;
    float scale;
    /* K^T pair tiles and V pairs of every KV head over the run's whole context (lp_all
     * tokens), made once where several query tiles share a head (a prefill chunk); NULL:
     * each item makes its own */
    const uint32_t *kt_all;
    const uint16_t *vi_all;
    int64_t lp_all;
};

/* 0: S or out C tile (nq x 16 floats); 1: Q (nq x 32 dims); 2: K^T pairs (16 x 16 tokens);
 * 3: P (nq x 32 tokens); 4: V pairs (16 token pairs x 16 dims). */
static void configure(int64_t nq) {
    struct amx_tile_config c = {0};
    c.palette = 1;
    for (int t = 0; t < 5; t++) c.rows[t] = (uint8_t)nq, c.colsb[t] = 64;
    c.rows[2] = c.rows[4] = 16;
    _tile_loadconfig(&c);
}

/* Query vector i of the tile (row i / group, query head kvh * group + i % group). */
static inline const uint16_t *query(const struct vargs *a, int64_t kvh, int64_t i) {
    const int64_t group = a->heads / a->kv_heads;
    return a->q + (i / group) * a->q_stride + (kvh * group + i % group) * a->dim;
}

static inline const uint16_t *token_row(const struct vargs *a, const uint16_t *base,
                                        int64_t kvh, int64_t t) {
    const int64_t block = a->table[t / a->block_size], at = t % a->block_size;
    return base + block * a->block_stride + (at * a->kv_heads + kvh) * a->dim;
}

/* The 16 tokens from t0 (one block) of KV head kvh as K^T pair tiles: per 32 dims, 16 pair
 * rows (dims d0 + 2p, +1) x 16 tokens, into kt (dim / 32 tiles of 256 pairs). */
static void key_tiles(const struct vargs *a, int64_t kvh, int64_t t0, uint32_t *kt) {
    const int64_t dim = a->dim, tok = a->kv_heads * dim;
    const uint16_t *k0 = token_row(a, a->k, kvh, t0);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)(tok / 2)));
    for (int64_t d0 = 0; d0 < dim; d0 += 32)
        for (int p = 0; p < 16; p++)
            _mm512_store_si512(kt + (d0 / 32) * 256 + p * 16,
                               _mm512_i32gather_epi32(idx, (const void *)(k0 + d0 + 2 * p), 4));
}

/* Pass 1: scores of queries [i0, i0 + nq) over tokens [0, L), scaled, into s (row stride
 * lp floats). qb: the queries' bf16 rows, kt: dim / 32 pair tiles (unless shared). */
static void scores(const struct vargs *a, int64_t kvh, int64_t nq, int64_t L, int64_t lp,
                   const uint16_t *qb, uint32_t *kt, float *s) {
    const int64_t dim = a->dim, per_block = (dim / 32) * 256;
    for (int64_t t0 = 0; t0 < L; t0 += 16) {
        const uint32_t *tiles = kt;
        if (a->kt_all != NULL)
            tiles = a->kt_all + (kvh * (a->lp_all / 16) + t0 / 16) * per_block;
        else
            key_tiles(a, kvh, t0, kt);
        _tile_zero(0);
        for (int64_t d0 = 0; d0 < dim; d0 += 32) {
            _tile_loadd(1, qb + d0, dim * 2);
            _tile_loadd(2, tiles + (d0 / 32) * 256, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        float c[QT * 16] __attribute__((aligned(64)));
        _tile_stored(0, c, 64);
        for (int64_t i = 0; i < nq; i++)
            _mm512_storeu_ps(s + i * lp + t0,
                             _mm512_mul_ps(_mm512_load_ps(c + i * 16), _mm512_set1_ps(a->scale)));
    }
}

/* Pass 2: query i's weights over its own len tokens (zero beyond, to lp) as bf16 into p,
 * returning 1 / their sum. */
static float weights(const float *s, int64_t len, int64_t lp, uint16_t *p) {
    __m512 top = _mm512_set1_ps(-3.0e38f);
    for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 live = len - t >= 16 ? 0xFFFF : (__mmask16)((1u << (len - t)) - 1u);
        top = _mm512_mask_max_ps(top, live, top, _mm512_maskz_loadu_ps(live, s + t));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < lp; t += 32) {
        __m512 e[2];
        for (int h = 0; h < 2; h++) {
            const int64_t at = t + 16 * h, left = len - at;
            const __mmask16 live = left >= 16 ? 0xFFFF
                                   : left <= 0 ? 0
                                               : (__mmask16)((1u << left) - 1u);
            e[h] = _mm512_maskz_mov_ps(
                live, exp_neg16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + at), mx)));
        }
        /* the weights as bf16 are what the tile product multiplies: sum those */
        const __m512bh pb = _mm512_cvtne2ps_pbh(e[1], e[0]);
        _mm512_storeu_si512(p + t, (__m512i)pb);
        const __m512i w = (__m512i)pb;
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(
                                     _mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000))));
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* V of tokens [t_begin, t_end) (even bounds) as token pairs: vi[j][d][2] = V[2j][d],
 * V[2j + 1][d] (zero at and past L, so no stale value meets a zero weight as a NaN). */
static void pair_values(const struct vargs *a, int64_t kvh, int64_t L, int64_t t_begin,
                        int64_t t_end, uint16_t *vi, __m512i interleave) {
    const int64_t dim = a->dim;
    for (int64_t t = t_begin; t < t_end; t += 2) {
        const uint16_t *r0 = t < L ? token_row(a, a->v, kvh, t) : NULL;
        const uint16_t *r1 = t + 1 < L ? token_row(a, a->v, kvh, t + 1) : NULL;
        for (int64_t d = 0; d < dim; d += 16) {
            const __m256i x0 = r0 ? _mm256_loadu_si256((const __m256i *)(r0 + d))
                                  : _mm256_setzero_si256();
            const __m256i x1 = r1 ? _mm256_loadu_si256((const __m256i *)(r1 + d))
                                  : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1);
            _mm512_storeu_si512(vi + (t / 2) * dim * 2 + d * 2,
                                _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

/* One item: KV head kvh, its query vectors [i0, i0 + nq). */
static void item(const struct vargs *a, int64_t kvh, int64_t i0, int64_t nq, void *buf,
                 __m512i interleave) {
    const int64_t dim = a->dim, group = a->heads / a->kv_heads;
    const int64_t L = a->len0 + (i0 + nq - 1) / group; /* the last query's length */
    const int64_t lp = (L + 31) / 32 * 32;
    char *at = buf;
    uint16_t *qb = (uint16_t *)at; /* QT x dim */
    at += QT * dim * 2;
    uint32_t *kt = (uint32_t *)at; /* dim / 32 tiles of 16 x 16 pairs */
    at += dim * 32;
    float *s = (float *)at; /* nq x lp */
    at += QT * lp * 4;
    uint16_t *p = (uint16_t *)at; /* nq x lp */
    at += QT * lp * 2;
    uint16_t *vi = (uint16_t *)at; /* lp / 2 x dim x 2 */
    float inv[QT];
    memset(qb, 0, (size_t)(QT * dim * 2));
    for (int64_t i = 0; i < nq; i++) memcpy(qb + i * dim, query(a, kvh, i0 + i), (size_t)dim * 2);
    configure(nq);
    scores(a, kvh, nq, L, lp, qb, kt, s);
    for (int64_t i = 0; i < nq; i++)
        inv[i] = weights(s + i * lp, a->len0 + (i0 + i) / group, lp, p + i * lp);
    /* shared V holds real values up to the run's last token: between a query's own length
     * and lp they meet weights of exactly zero (as the tokens between a query's length and
     * the item's last one do in the item's own buffer) */
    if (a->vi_all != NULL)
        vi = (uint16_t *)a->vi_all + kvh * a->lp_all * dim;
    else
        pair_values(a, kvh, L, 0, lp, vi, interleave);
    for (int64_t d0 = 0; d0 < dim; d0 += 16) {
        _tile_zero(0);
        for (int64_t t = 0; t < lp; t += 32) {
            _tile_loadd(3, p + t, lp * 2);
            _tile_loadd(4, vi + (t / 2) * dim * 2 + d0 * 2, dim * 4);
            _tile_dpbf16ps(0, 3, 4);
        }
        float c[QT * 16] __attribute__((aligned(64)));
        _tile_stored(0, c, 64);
        for (int64_t i = 0; i < nq; i++) {
            const int64_t qi = i0 + i;
            uint16_t *o = a->out + (qi / group) * a->heads * dim +
                          (kvh * group + qi % group) * dim + d0;
            const __m512 y = _mm512_mul_ps(_mm512_load_ps(c + i * 16), _mm512_set1_ps(inv[i]));
            _mm256_storeu_si256((__m256i *)o, (__m256i)_mm512_cvtneps_pbh(y));
        }
    }
}

/* The shared K^T tiles and V pairs (vargs.kt_all, vi_all) of every KV head: blocks of 16
 * tokens below L, then token pairs up to lp (zero past L). Inside a parallel region. */
static void share(const struct vargs *a, int64_t L, uint32_t *kt_all, uint16_t *vi_all,
                  __m512i interleave) {
    const int64_t blocks = (L + 15) / 16, lp = a->lp_all, per_block = (a->dim / 32) * 256;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < a->kv_heads * blocks; it++)
        key_tiles(a, it / blocks, (it % blocks) * 16,
                  kt_all + ((it / blocks) * (lp / 16) + it % blocks) * per_block);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < a->kv_heads * (lp / 32); it++) {
        const int64_t kvh = it / (lp / 32), t = (it % (lp / 32)) * 32;
        pair_values(a, kvh, L, t, t + 32, vi_all + kvh * lp * a->dim, interleave);
    }
}

static int run(const struct vargs *in) {
    const int64_t group = in->heads / in->kv_heads, nqs = in->rows * group, dim = in->dim;
    const int64_t tiles = (nqs + QT - 1) / QT, per = (nqs + tiles - 1) / tiles;
    const int64_t L = in->len0 + in->rows - 1, lp = (L + 31) / 32 * 32;
    size_t bytes = (size_t)(QT * dim * 2 + dim * 32 + QT * lp * 6 + lp * dim * 2);
    /* several query tiles per KV head (a prefill chunk): convert its K and V once for all
     * (else each tile converts the whole context again: a 4k-token prompt's prefill took
     * twice as long); without the memory, each item converts its own */
    struct vargs shared = *in;
    const struct vargs *a = in;
    uint32_t *kt_all = NULL;
    uint16_t *vi_all = NULL;
    if (tiles > 1) {
        kt_all = aligned_alloc(64, (size_t)(in->kv_heads * lp * dim * 2));
        vi_all = aligned_alloc(64, (size_t)(in->kv_heads * lp * dim * 2));
        if (kt_all != NULL && vi_all != NULL) {
            shared.kt_all = kt_all, shared.vi_all = vi_all, shared.lp_all = lp;
            a = &shared;
            bytes -= (size_t)(lp * dim * 2); /* no V pairs of its own per thread */
        }
    }
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        void *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        const __m512i interleave = interleave_halves16();
        if (buf == NULL) failed = 2;
        if (a->kt_all != NULL) share(a, L, kt_all, vi_all, interleave);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < a->kv_heads * tiles; it++) {
            const int64_t i0 = (it % tiles) * per, n = nqs - i0 < per ? nqs - i0 : per;
            if (buf != NULL && n > 0) item(a, it / tiles, i0, n, buf, interleave);
        }
        if (buf != NULL) _tile_release();
        free(buf);
    }
    free(kt_all);
    free(vi_all);
    return failed;
}
#endif

int paged_verify_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k, const uint16_t *v,
                      int64_t block_stride, const int64_t *table, int64_t table_width,
                      int64_t len0, int64_t rows, uint16_t *out, int64_t heads,
                      int64_t kv_heads, int64_t dim, int64_t block_size, float scale) {
    if (rows <= 0 || len0 <= 0 || kv_heads <= 0 || heads % kv_heads || (dim != 64 && dim != 128) ||
        block_size <= 0 || block_size % 16)
        return 1;
    if (len0 + rows - 1 > table_width * block_size) return 2; /* past the table: as paged_decode */
#if VERIFY_BUILT
    if (!quant_amx_enabled()) return 3;
    __atomic_fetch_add(&verify_calls, 1, __ATOMIC_RELAXED);
    const struct vargs a = {q,    k,     v,        out,  table,      q_stride, block_stride,
                            len0, rows,  heads,    kv_heads, dim, block_size, scale,
                            NULL, NULL, 0};
    return run(&a);
#else
    (void)q, (void)q_stride, (void)k, (void)v, (void)block_stride, (void)table, (void)out;
    (void)scale;
    return 3;
#endif
}
