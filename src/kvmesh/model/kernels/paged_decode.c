/* Paged decode attention on the CPU: one query token per sequence, reading K/V blocks in
 * place from kvmesh's block-major cache (no gather into a padded batch).
 *
 * Layer view of the cache: element [block, token, kv_head, d] sits at
 *   base + block * block_stride + (token * num_kv_heads + kv_head) * head_dim + d.
 * Work is split over (sequence, kv head) pairs; each pair reads its K and V rows once:
 * scores for the group's query heads, an exact softmax (max-subtracted), then the
 * weighted sum of V. Accumulation is float32 whatever the storage type. Built by
 * kvmesh/model/cpu_kernels.py with -O3 -march=native -fopenmp. With AVX-512 BF16 the bf16
 * scores use dot-product instructions on the stored values; elsewhere the loops are plain
 * C written so the compiler vectorises them (omp simd), with a polynomial exp.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1
#else
#define HAVE_AVX512_BF16 0
#endif

#define MAX_HEAD_DIM 256
#define MAX_ROW 8192 /* heads * head_dim */
#define INLINE static inline __attribute__((always_inline))

enum kind { BF16, F16, F32 };

struct args {
    const void *q, *k, *v;
    void *out;
    const int64_t *tables, *lengths;
    int64_t q_stride, block_stride, table_width;
    int64_t heads, kv_heads, dim, block_size;
    float scale;
};

INLINE float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)h << 16};
    return c.f;
}

INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    union { uint32_t u; float f; } c = {.f = f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e), an integer power
 * built in the exponent bits times a degree-6 polynomial on [-0.5, 0.5]. Relative error
 * below 2e-7; inputs under -87 give 0. */
#pragma omp declare simd
static inline float exp_neg(float x) {
    float t = x * 1.44269504088896341f;
    if (t < -126.0f) return 0.0f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 trick */
    float f = t - n;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { int32_t i; float f; } s = {.i = ((int32_t)n + 127) << 23};
    return p * s.f;
}

/* n elements of the given kind at src[off] into float dst. */
INLINE void load_row(enum kind kind, const void *src, int64_t off, float *dst, int64_t n) {
    if (kind == BF16) {
        const uint16_t *p = (const uint16_t *)src + off;
        int64_t i = 0;
#if HAVE_AVX512_BF16
        for (; i + 16 <= n; i += 16) {
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + i)));
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        }
#endif
        for (; i < n; i++) dst[i] = bf16_to_f32(p[i]);
    } else if (kind == F16) {
        const _Float16 *p = (const _Float16 *)src + off;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = (float)p[i];
    } else {
        memcpy(dst, (const float *)src + off, (size_t)n * sizeof(float));
    }
}

INLINE void store_row(enum kind kind, void *dst, int64_t off, const float *src, int64_t n) {
    if (kind == BF16) {
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[off + i] = f32_to_bf16(src[i]);
    } else if (kind == F16) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) ((_Float16 *)dst)[off + i] = (_Float16)src[i];
    } else {
        memcpy((float *)dst + off, src, (size_t)n * sizeof(float));
    }
}

INLINE float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Softmax numerators over `len` scores in place; returns 1 / their sum. */
static float softmax_numerators(float *s, int64_t len) {
    float mx = s[0];
    for (int64_t t = 1; t < len; t++) mx = s[t] > mx ? s[t] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; t++) {
        s[t] = exp_neg(s[t] - mx);
        sum += s[t];
    }
    return 1.0f / sum;
}

INLINE void prefetch_block(const void *base, int64_t off, int64_t bytes, size_t elem) {
    const char *p = (const char *)base + (size_t)off * elem;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}

/* Scores of one block's `count` tokens for every head: scores[hq * len + t0 + j]. */
INLINE void block_scores(enum kind kind, const struct args *a, int64_t off, int64_t count,
                         const float *qf, const void *q_raw, float *scores, int64_t len,
                         int64_t t0) {
    const int64_t dim = a->dim, kvh = a->kv_heads, group = a->heads / kvh;
#if HAVE_AVX512_BF16
    if (kind == BF16 && dim % 32 == 0) { /* bf16 x bf16 products are exact in float32 */
        const uint16_t *q = (const uint16_t *)q_raw, *k = (const uint16_t *)a->k + off;
        for (int64_t j = 0; j < count; j++) {
            for (int64_t hq = 0; hq < a->heads; hq++) {
                const uint16_t *row = k + (j * kvh + hq / group) * dim;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t d = 0; d < dim; d += 32) {
                    __m512bh kv = (__m512bh)_mm512_loadu_si512((const void *)(row + d));
                    __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(q + hq * dim + d));
                    acc = _mm512_dpbf16_ps(acc, qv, kv);
                }
                scores[hq * len + t0 + j] = _mm512_reduce_add_ps(acc) * a->scale;
            }
        }
        return;
    }
#endif
    (void)q_raw;
    float row[MAX_ROW];
    for (int64_t j = 0; j < count; j++) {
        load_row(kind, a->k, off + j * kvh * dim, row, kvh * dim);
        for (int64_t hq = 0; hq < a->heads; hq++)
            scores[hq * len + t0 + j] = dot(qf + hq * dim, row + hq / group * dim, dim) * a->scale;
    }
}

/* acc[hq] += p[hq, t] * V[t, hq's kv head] over one block's tokens. */
INLINE void block_values(enum kind kind, const struct args *a, int64_t off, int64_t count,
                         const float *scores, int64_t len, int64_t t0, float *acc) {
    const int64_t dim = a->dim, kvh = a->kv_heads, group = a->heads / kvh;
    float row[MAX_ROW];
    for (int64_t j = 0; j < count; j++) {
        load_row(kind, a->v, off + j * kvh * dim, row, kvh * dim);
        for (int64_t hq = 0; hq < a->heads; hq++) {
            const float p = scores[hq * len + t0 + j];
            const float *v = row + hq / group * dim;
            float *out = acc + hq * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) out[d] += p * v[d];
        }
    }
}

/* Walk sequence s's blocks: scores, softmax, then the weighted values, into `out`. */
INLINE void attend(enum kind kind, const struct args *a, int64_t s, float *scores, float *acc,
                   float *qf) {
    const int64_t dim = a->dim, heads = a->heads, len = a->lengths[s], bs = a->block_size;
    const int64_t *table = a->tables + s * a->table_width;
    const int64_t nblocks = (len + bs - 1) / bs, slab = bs * a->kv_heads * dim;
    const size_t elem = kind == F32 ? 4 : 2;
    const void *q_raw = (const char *)a->q + (size_t)(s * a->q_stride) * elem;
    if (!(kind == BF16 && HAVE_AVX512_BF16 && dim % 32 == 0))
        load_row(kind, a->q, s * a->q_stride, qf, heads * dim);
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t t0 = b * bs, count = len - t0 < bs ? len - t0 : bs;
        if (b + 1 < nblocks)
            prefetch_block(a->k, table[b + 1] * a->block_stride, slab * (int64_t)elem, elem);
        block_scores(kind, a, table[b] * a->block_stride, count, qf, q_raw, scores, len, t0);
    }
    for (int64_t hq = 0; hq < heads; hq++) {
        const float inv = softmax_numerators(scores + hq * len, len);
        for (int64_t t = 0; t < len; t++) scores[hq * len + t] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(heads * dim));
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t t0 = b * bs, count = len - t0 < bs ? len - t0 : bs;
        if (b + 1 < nblocks)
            prefetch_block(a->v, table[b + 1] * a->block_stride, slab * (int64_t)elem, elem);
        block_values(kind, a, table[b] * a->block_stride, count, scores, len, t0, acc);
    }
    store_row(kind, a->out, s * heads * dim, acc, heads * dim);
}

INLINE int run(enum kind kind, const struct args *a, int64_t num_seqs) {
    const int64_t group = a->heads / a->kv_heads;
    if (a->dim > MAX_HEAD_DIM || a->heads * a->dim > MAX_ROW || group * a->kv_heads != a->heads)
        return 1;
    int64_t max_len = 1;
    for (int64_t s = 0; s < num_seqs; s++) {
        if (a->lengths[s] <= 0 || a->lengths[s] > a->table_width * a->block_size) return 2;
        max_len = a->lengths[s] > max_len ? a->lengths[s] : max_len;
    }
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        const size_t row = (size_t)(a->heads * a->dim);
        float *scores = malloc(sizeof(float) * ((size_t)(a->heads * max_len) + 2 * row));
        if (scores == NULL) failed = 3;
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; s++)
            if (scores != NULL)
                attend(kind, a, s, scores + 2 * row, scores, scores + row);
        free(scores);
    }
    return failed;
}

#define EXPORT(NAME, KIND)                                                                  \
    int NAME(const void *q, int64_t q_stride, const void *k, const void *v,                 \
             int64_t block_stride, const int64_t *tables, int64_t table_width,              \
             const int64_t *lengths, void *out, int64_t num_seqs, int64_t heads,            \
             int64_t kv_heads, int64_t dim, int64_t block_size, float scale) {              \
        const struct args a = {q,      k,         v,           out,    tables,   lengths,  \
                               q_stride, block_stride, table_width, heads, kv_heads, dim, \
                               block_size, scale};                                          \
        return run(KIND, &a, num_seqs);                                                     \
    }

EXPORT(paged_decode_bf16, BF16)
EXPORT(paged_decode_f16, F16)
EXPORT(paged_decode_f32, F32)
