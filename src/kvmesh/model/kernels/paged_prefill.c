/* Paged causal attention for prefill chunks on the CPU (bf16, AVX-512 BF16), reading K/V
 * in place from kvmesh's block-major cache; the chunk's own K/V are already written there,
 * so a chunk after a cached prefix needs no gather either.
 *
 * A work item is (segment, kv head, tile of 16 query tokens). It walks key tiles of 16
 * tokens up to its last query's position. Each key tile is transposed once into pairs
 * (d, d+1) x 16 tokens, so a query row's 16 scores are dim/2 bf16 dot-product
 * instructions with no horizontal sums; V is widened to float32 once per tile. An online
 * softmax (running max and sum per query row, float32) and float32 accumulators make the
 * result a flash-attention-style exact softmax. Only head_dim 64 and 128 are built
 * (constant sizes keep the accumulators in registers); anything else returns 1 and the
 * caller uses SDPA.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define TILE 16
#define MAX_GROUP 16

struct pargs {
    const uint16_t *q, *k, *v;
    uint16_t *out;
    const int64_t *tables, *segs;
    int64_t q_stride, block_stride, table_width, heads, kv_heads, block_size;
    float scale;
};

/* Key tile [t0, t0 + count): K as (d pair) x token uint32 pairs, V widened to float32. */
static inline __attribute__((always_inline)) void load_tile(
    const struct pargs *a, const int64_t *table, int64_t h, int64_t t0, int64_t count,
    const int dim, uint32_t *kt, float *vf) {
    const int64_t tok_stride = a->kv_heads * dim;
    for (int64_t j = 0; j < TILE; j++) {
        if (j >= count) {
            for (int dp = 0; dp < dim / 2; dp++) kt[dp * TILE + j] = 0;
            memset(vf + j * dim, 0, sizeof(float) * (size_t)dim);
            continue;
        }
        const int64_t pos = t0 + j;
        const int64_t off = table[pos / a->block_size] * a->block_stride +
                            (pos % a->block_size) * tok_stride + h * dim;
        const uint32_t *krow = (const uint32_t *)(a->k + off);
        for (int dp = 0; dp < dim / 2; dp++) kt[dp * TILE + j] = krow[dp];
        for (int c = 0; c < dim; c += 16) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(a->v + off + c));
            _mm512_storeu_ps(vf + j * dim + c,
                             _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
        }
    }
}

/* One query row against one key tile: scores, online softmax update, P.V accumulation. */
static inline __attribute__((always_inline)) void row_tile(
    const uint32_t *qrow, const uint32_t *kt, const float *vf, __mmask16 valid, float scale,
    float *mx, float *sum, float *acc, const int dim) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0; /* four chains hide latency */
#define KEY_PAIR(ACC, DP)                                                                   \
    ACC = _mm512_dpbf16_ps(ACC, (__m512bh)_mm512_set1_epi32((int)qrow[DP]),                 \
                           (__m512bh)_mm512_loadu_si512((const void *)(kt + (DP) * TILE)))
    for (int dp = 0; dp < dim / 2; dp += 4) {
        KEY_PAIR(s0, dp);
        KEY_PAIR(s1, dp + 1);
        KEY_PAIR(s2, dp + 2);
        KEY_PAIR(s3, dp + 3);
    }
#undef KEY_PAIR
    __m512 s = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
    s = _mm512_mask_mov_ps(_mm512_set1_ps(-3.0e38f), valid, _mm512_mul_ps(s, _mm512_set1_ps(scale)));
    const float top = _mm512_reduce_max_ps(s);
    const float new_max = top > *mx ? top : *mx;
    const __m512 p = _mm512_maskz_mov_ps(valid, exp_neg16(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
    float w[TILE];
    _mm512_storeu_ps(w, p);
    __m512 r[dim / 16];
    if (new_max > *mx) {
        const float fix = _mm512_cvtss_f32(exp_neg16(_mm512_set1_ps(*mx - new_max)));
        *sum *= fix;
        for (int c = 0; c < dim / 16; c++)
            r[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), _mm512_set1_ps(fix));
        *mx = new_max;
    } else {
        for (int c = 0; c < dim / 16; c++) r[c] = _mm512_loadu_ps(acc + 16 * c);
    }
    *sum += _mm512_reduce_add_ps(p);
    __m512 odd[dim / 16]; /* even and odd keys in separate chains, summed at the end */
    for (int c = 0; c < dim / 16; c++) odd[c] = _mm512_setzero_ps();
    for (int j = 0; j < TILE; j += 2) { /* masked keys have weight 0 and V rows of 0 */
        const __m512 w0 = _mm512_set1_ps(w[j]), w1 = _mm512_set1_ps(w[j + 1]);
        for (int c = 0; c < dim / 16; c++) {
            r[c] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(vf + j * dim + 16 * c), r[c]);
            odd[c] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(vf + (j + 1) * dim + 16 * c), odd[c]);
        }
    }
    for (int c = 0; c < dim / 16; c++) _mm512_storeu_ps(acc + 16 * c, _mm512_add_ps(r[c], odd[c]));
}

/* Work item: segment `seg`, kv head h, query rows [r0, r0 + rows). */
static inline __attribute__((always_inline)) void attend_tile(
    const struct pargs *a, int64_t seg, int64_t h, int64_t r0, const int dim, float *work) {
    const int64_t first = a->segs[3 * seg], q_len = a->segs[3 * seg + 1];
    const int64_t ctx = a->segs[3 * seg + 2], group = a->heads / a->kv_heads;
    const int64_t rows = q_len - r0 < TILE ? q_len - r0 : TILE, n = rows * group;
    const int64_t *table = a->tables + seg * a->table_width;
    const int64_t pos0 = ctx - q_len + r0; /* position of the tile's first query */
    uint32_t *kt = (uint32_t *)work;
    float *vf = work + TILE * dim / 2, *acc = vf + TILE * dim, *mx = acc + n * dim;
    float *sum = mx + n;
    memset(acc, 0, sizeof(float) * (size_t)(n * dim));
    for (int64_t r = 0; r < n; r++) mx[r] = -3.0e38f, sum[r] = 0.0f;
    const int64_t last = pos0 + rows - 1;
    for (int64_t t0 = 0; t0 <= last; t0 += TILE) {
        const int64_t count = last + 1 - t0 < TILE ? last + 1 - t0 : TILE;
        load_tile(a, table, h, t0, count, dim, kt, vf);
        for (int64_t i = 0; i < rows; i++) {
            const int64_t visible = pos0 + i + 1 - t0; /* keys this row may see in the tile */
            if (visible <= 0) continue;
            const __mmask16 valid =
                (__mmask16)(visible >= count ? (1u << count) - 1 : (1u << visible) - 1);
            for (int64_t g = 0; g < group; g++) {
                const int64_t r = i * group + g;
                const uint32_t *qrow =
                    (const uint32_t *)(a->q + (first + r0 + i) * a->q_stride + (h * group + g) * dim);
                row_tile(qrow, kt, vf, valid, a->scale, mx + r, sum + r, acc + r * dim, dim);
            }
        }
    }
    for (int64_t i = 0; i < rows; i++)
        for (int64_t g = 0; g < group; g++) {
            const int64_t r = i * group + g;
            const float inv = 1.0f / sum[r];
            uint16_t *o = a->out + ((first + r0 + i) * a->heads + h * group + g) * dim;
            for (int d = 0; d < dim; d++) o[d] = f32_to_bf16(acc[r * dim + d] * inv);
        }
}

static int run_prefill(const struct pargs *a, int64_t num_segs, const int dim) {
    const int64_t group = a->heads / a->kv_heads;
    int64_t items = 0;
    for (int64_t s = 0; s < num_segs; s++) {
        const int64_t q_len = a->segs[3 * s + 1], ctx = a->segs[3 * s + 2];
        if (q_len <= 0 || ctx < q_len || ctx > a->table_width * a->block_size) return 2;
        items += (q_len + TILE - 1) / TILE * a->kv_heads;
    }
    int64_t *list = malloc(sizeof(int64_t) * 3 * (size_t)items);
    if (list == NULL) return 3;
    int64_t at = 0; /* costliest tiles (latest queries) first, for load balance */
    for (int64_t s = 0; s < num_segs; s++)
        for (int64_t r0 = (a->segs[3 * s + 1] - 1) / TILE * TILE; r0 >= 0; r0 -= TILE)
            for (int64_t h = 0; h < a->kv_heads; h++, at++)
                list[3 * at] = s, list[3 * at + 1] = h, list[3 * at + 2] = r0;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        const size_t words = (size_t)(TILE * dim / 2 + TILE * dim + TILE * group * (dim + 2));
        float *work = aligned_alloc(64, (words * sizeof(float) + 63) / 64 * 64);
        if (work == NULL) failed = 3;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++)
            if (work != NULL) {
                if (dim == 64) attend_tile(a, list[3 * it], list[3 * it + 1], list[3 * it + 2], 64, work);
                else attend_tile(a, list[3 * it], list[3 * it + 1], list[3 * it + 2], 128, work);
            }
        free(work);
    }
    free(list);
    return failed;
}
#endif

int paged_prefill_bf16(const void *q, int64_t q_stride, const void *k, const void *v,
                       int64_t block_stride, const int64_t *tables, int64_t table_width,
                       const int64_t *segs, int64_t num_segs, void *out, int64_t heads,
                       int64_t kv_heads, int64_t dim, int64_t block_size, float scale) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if ((dim != 64 && dim != 128) || kv_heads <= 0 || heads % kv_heads != 0 ||
        heads / kv_heads > MAX_GROUP || block_size <= 0)
        return 1;
    const struct pargs a = {q,      k,       v,           out,          tables,   segs,
                            q_stride, block_stride, table_width, heads, kv_heads, block_size,
                            scale};
    return run_prefill(&a, num_segs, (int)dim);
#else
    (void)q, (void)q_stride, (void)k, (void)v, (void)block_stride, (void)tables;
    (void)table_width, (void)segs, (void)num_segs, (void)out, (void)heads, (void)kv_heads;
    (void)dim, (void)block_size, (void)scale;
    return 1;
#endif
}

int paged_prefill_available(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}
