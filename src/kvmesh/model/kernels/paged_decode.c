/* Paged decode attention on the CPU: one query token per sequence, reading K/V blocks in
 * place from kvmesh's block-major cache (no gather into a padded batch).
 *
 * Layer view of the cache: element [block, token, kv_head, d] sits at
 *   base + block * block_stride + (token * num_kv_heads + kv_head) * head_dim + d.
 * Work is split over chunks of a sequence's blocks (see `run`); each chunk walks its
 * blocks once, reading a block's K and V slabs for all heads (contiguous memory) with an
 * online softmax (running max and sum, rescaled when the max grows), prefetching the next
 * block's K before the scores and its V before the weighted sum; the chunks of a sequence
 * are merged at the end. Accumulation is float32 whatever the storage type. Built by
 * kvmesh/model/cpu_kernels.py with -O3 -march=native -fopenmp. With AVX-512 BF16, bf16
 * scores are dot-product instructions on the stored values, a query head's 16 scores of a
 * block reduced together (head dims 64 and 128), the online softmax runs on them as one
 * vector, and the V sums of a KV head's query group stay in registers (up to 64 dims a
 * pass); the next block is prefetched a line at a time between that arithmetic, not in a
 * burst (a burst filled the load queue and the arithmetic waited for the memory instead
 * of overlapping it: a 64-stream step's attention took 26.6 ms, now 20.9). A float32
 * cache is read in place at every level; with AVX and up and a head dim that is a multiple of 32, its scores take four partial sums
 * and each head's V sums stay in registers across a block. Elsewhere the loops are plain
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
#include "vec_math.h"

enum kind { BF16, F16, F32 };

struct args {
    const void *q, *k, *v;
    void *out;
    const int64_t *tables, *lengths;
    int64_t q_stride, block_stride, table_width;
    int64_t heads, kv_heads, dim, block_size;
    float scale;
};

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

/* A cached token's row as float: in place for float32, else converted into buf. */
INLINE const float *kv_row(enum kind kind, const void *src, int64_t off, float *buf,
                           int64_t n) {
    if (kind == F32) return (const float *)src + off;
    load_row(kind, src, off, buf, n);
    return buf;
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

/* The explicit 8-float paths below pay where 8 floats are one register (AVX and up);
 * with SSE alone the plain loops are faster. */
#if defined(__AVX__)
#define VEC_PATHS 1
#else
#define VEC_PATHS 0
#endif

/* Eight floats, unaligned; the compiler maps it to whatever vectors the ISA has. */
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));

INLINE float hsum8(v8f s) {
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

/* Four independent partial sums when n is a multiple of 32 (head dims 64, 128, 256): one
 * chain of dependent multiply-adds would wait on each add's latency. */
INLINE float dot(const float *a, const float *b, int64_t n) {
    if (VEC_PATHS && n % 32 == 0) {
        v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t i = 0; i < n; i += 32) {
            s0 += *(const v8f *)(a + i) * *(const v8f *)(b + i);
            s1 += *(const v8f *)(a + i + 8) * *(const v8f *)(b + i + 8);
            s2 += *(const v8f *)(a + i + 16) * *(const v8f *)(b + i + 16);
            s3 += *(const v8f *)(a + i + 24) * *(const v8f *)(b + i + 24);
        }
        return hsum8((s0 + s1) + (s2 + s3));
    }
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Lines still to prefetch, taken one at a time between the arithmetic: a burst of a
 * block's lines would fill the load queue and stall the arithmetic until most of them
 * had arrived, so the memory and the arithmetic would take turns instead of overlapping. */
struct pref {
    const char *p;
    int64_t left;
};

INLINE void pref_one(struct pref *f) {
    if (f->left > 0) {
        __builtin_prefetch(f->p, 0, 3);
        f->p += 64;
        f->left--;
    }
}

INLINE void pref_rest(struct pref *f) {
    while (f->left > 0) pref_one(f);
}

INLINE void prefetch_block(const void *base, int64_t off, int64_t bytes, size_t elem) {
    const char *p = (const char *)base + (size_t)off * elem;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}

#if HAVE_AVX512_BF16
/* The 16 lane sums of a[0..15] as one vector, in order: out[j] = sum of a[j]'s lanes. A
 * transposing tree of shuffles and adds: 45 instructions for 16 sums. */
INLINE __m512 sum16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: a2i and a2i+1's pair sums, interleaved */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: the lane sums of a4i .. a4i+3 */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++) /* lane pairs summed */
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                         _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

/* Query head hq's bf16 scores over a block's first n <= 16 tokens (D dims, a literal, so
 * the loops unroll): one chain of D / 32 dot products per token, the 16 sums reduced
 * together instead of one horizontal sum each. */
INLINE void scores16(const uint16_t *k, int64_t tok_stride, const uint16_t *q, int64_t n,
                     float scale, float *scores, const int D) {
    __m512bh qv[4];
    for (int d = 0; d < D / 32; d++) qv[d] = (__m512bh)_mm512_loadu_si512((const void *)(q + 32 * d));
    __m512 acc[16];
    for (int j = 0; j < 16; j++) {
        const uint16_t *row = k + (j < n ? j : 0) * tok_stride; /* past n: any row, unused */
        acc[j] = _mm512_setzero_ps();
        for (int d = 0; d < D / 32; d++)
            acc[j] = _mm512_dpbf16_ps(acc[j], qv[d],
                                      (__m512bh)_mm512_loadu_si512((const void *)(row + 32 * d)));
    }
    _mm512_mask_storeu_ps(scores, (__mmask16)((1u << n) - 1u),
                          _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
}
#endif

/* Scores of one block's `count` tokens for every head: scores[hq * block_size + j]. */
INLINE void block_scores(enum kind kind, const struct args *a, int64_t off, int64_t count,
                         const float *qf, const void *q_raw, float *scores, struct pref *f) {
    const int64_t stride = a->block_size;
    const int64_t dim = a->dim, kvh = a->kv_heads, group = a->heads / kvh;
#if HAVE_AVX512_BF16
    if (kind == BF16 && dim % 32 == 0) { /* bf16 x bf16 products are exact in float32 */
        const uint16_t *q = (const uint16_t *)q_raw, *k = (const uint16_t *)a->k + off;
        if ((dim == 64 || dim == 128) && count <= 16) {
            const int64_t share = (f->left + a->heads - 1) / a->heads;
            for (int64_t hq = 0; hq < a->heads; hq++) {
                const uint16_t *kh = k + (hq / group) * dim;
                if (dim == 64) scores16(kh, kvh * dim, q + hq * dim, count, a->scale,
                                        scores + hq * stride, 64);
                else scores16(kh, kvh * dim, q + hq * dim, count, a->scale,
                              scores + hq * stride, 128);
                for (int64_t i = 0; i < share; i++) pref_one(f);
            }
            return;
        }
        for (int64_t j = 0; j < count; j++) {
            for (int64_t hq = 0; hq < a->heads; hq++) {
                const uint16_t *row = k + (j * kvh + hq / group) * dim;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t d = 0; d < dim; d += 32) {
                    __m512bh kv = (__m512bh)_mm512_loadu_si512((const void *)(row + d));
                    __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(q + hq * dim + d));
                    acc = _mm512_dpbf16_ps(acc, qv, kv);
                }
                scores[hq * stride + j] = _mm512_reduce_add_ps(acc) * a->scale;
                pref_one(f);
            }
        }
        return;
    }
#endif
    (void)q_raw;
    float buf[MAX_ROW];
    for (int64_t j = 0; j < count; j++) {
        const float *row = kv_row(kind, a->k, off + j * kvh * dim, buf, kvh * dim);
        for (int64_t hq = 0; hq < a->heads; hq++)
            scores[hq * stride + j] = dot(qf + hq * dim, row + hq / group * dim, dim) * a->scale;
    }
}

#if HAVE_AVX512_BF16
/* bf16 V for the `group` query heads of one kv head, accumulators held in registers:
 * acc[g, c:c+16] += p[g, j] * V[j, c:c+16]. `group` is a literal at each call site. */
INLINE void values_bf16_group(const uint16_t *v, int64_t tok_stride, int64_t count,
                              const float *p, int64_t p_stride, float *acc, int64_t dim,
                              const int group, const int W, struct pref *f) {
    for (int64_t c = 0; c < dim; c += 16 * W) {
        __m512 r[8][4];
        for (int g = 0; g < group; g++)
            for (int w = 0; w < W; w++) r[g][w] = _mm512_loadu_ps(acc + g * dim + c + 16 * w);
        for (int64_t j = 0; j < count; j++) {
            __m512 x[4];
            for (int w = 0; w < W; w++) {
                const __m256i raw = _mm256_loadu_si256(
                    (const __m256i *)(v + j * tok_stride + c + 16 * w));
                x[w] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            }
            for (int g = 0; g < group; g++) {
                const __m512 pg = _mm512_set1_ps(p[g * p_stride + j]);
                for (int w = 0; w < W; w++) r[g][w] = _mm512_fmadd_ps(pg, x[w], r[g][w]);
            }
            for (int w = 0; w < W; w++) pref_one(f);
        }
        for (int g = 0; g < group; g++)
            for (int w = 0; w < W; w++) _mm512_storeu_ps(acc + g * dim + c + 16 * w, r[g][w]);
    }
}

INLINE int values_bf16_fast(const struct args *a, int64_t off, int64_t count,
                            const float *scores, float *acc, struct pref *f) {
    const int64_t dim = a->dim, kvh = a->kv_heads, group = a->heads / kvh, bs = a->block_size;
    if (dim % 16 != 0 || group > 8) return 0;
    const uint16_t *v = (const uint16_t *)a->v + off;
    for (int64_t h = 0; h < kvh; h++) {
        const uint16_t *vh = v + h * dim;
        const float *p = scores + h * group * bs;
        float *out = acc + h * group * dim;
        const int64_t vecs = dim / 16;
#define VG(G)                                                                              \
    do {                                                                                   \
        if (vecs % 4 == 0 && (G) * 4 <= 16)                                                \
            values_bf16_group(vh, kvh * dim, count, p, bs, out, dim, G, 4, f);             \
        else if (vecs % 2 == 0 && (G) * 2 <= 16)                                           \
            values_bf16_group(vh, kvh * dim, count, p, bs, out, dim, G, 2, f);             \
        else                                                                               \
            values_bf16_group(vh, kvh * dim, count, p, bs, out, dim, G, 1, f);             \
    } while (0)
        switch (group) { /* literal group and width: the sums stay in registers */
        case 1: VG(1); break;
        case 2: VG(2); break;
        case 3: VG(3); break;
        case 4: VG(4); break;
        case 5: VG(5); break;
        case 6: VG(6); break;
        case 7: VG(7); break;
        default: VG(8); break;
        }
#undef VG
    }
    return 1;
}
#endif

/* float32 V read in place, each head's sums held in registers across the block's tokens
 * (32 dims at a time), so they are loaded and stored once per block, not once per token.
 * The same sums in the same order as the general loop below. */
INLINE void values_f32(const struct args *a, int64_t off, int64_t count,
                       const float *scores, float *acc) {
    const int64_t dim = a->dim, group = a->heads / a->kv_heads, tok = a->kv_heads * dim;
    const float *v = (const float *)a->v + off;
    for (int64_t hq = 0; hq < a->heads; hq++) {
        const float *p = scores + hq * a->block_size, *vh = v + hq / group * dim;
        float *out = acc + hq * dim;
        for (int64_t d = 0; d < dim; d += 32) {
            v8f r0 = *(v8f *)(out + d), r1 = *(v8f *)(out + d + 8);
            v8f r2 = *(v8f *)(out + d + 16), r3 = *(v8f *)(out + d + 24);
            for (int64_t j = 0; j < count; j++) {
                const float *row = vh + j * tok + d;
                r0 += p[j] * *(const v8f *)row;
                r1 += p[j] * *(const v8f *)(row + 8);
                r2 += p[j] * *(const v8f *)(row + 16);
                r3 += p[j] * *(const v8f *)(row + 24);
            }
            *(v8f *)(out + d) = r0, *(v8f *)(out + d + 8) = r1;
            *(v8f *)(out + d + 16) = r2, *(v8f *)(out + d + 24) = r3;
        }
    }
}

/* acc[hq] += p[hq, j] * V[j, hq's kv head] over one block's tokens. */
INLINE void block_values(enum kind kind, const struct args *a, int64_t off, int64_t count,
                         const float *scores, float *acc, struct pref *f) {
    const int64_t dim = a->dim, kvh = a->kv_heads, group = a->heads / kvh;
#if HAVE_AVX512_BF16
    if (kind == BF16 && values_bf16_fast(a, off, count, scores, acc, f)) return;
#endif
    if (VEC_PATHS && kind == F32 && dim % 32 == 0) {
        values_f32(a, off, count, scores, acc);
        return;
    }
    float buf[MAX_ROW];
    for (int64_t j = 0; j < count; j++) {
        const float *row = kv_row(kind, a->v, off + j * kvh * dim, buf, kvh * dim);
        for (int64_t hq = 0; hq < a->heads; hq++) {
            const float p = scores[hq * a->block_size + j];
            const float *v = row + hq / group * dim;
            float *out = acc + hq * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) out[d] += p * v[d];
        }
    }
}

/* Online softmax over one block's scores: rescale the running sums when the max grows,
 * and turn the scores into weights relative to the running max. */
#if HAVE_AVX512_BF16
/* block_softmax for a block of at most 16 tokens, each head's scores one vector. */
INLINE void block_softmax16(const struct args *a, int64_t count, float *scores, float *mx,
                            float *sum, float *acc) {
    const __mmask16 live = (__mmask16)((1u << count) - 1u);
    for (int64_t hq = 0; hq < a->heads; hq++) {
        float *sc = scores + hq * a->block_size;
        const __m512 v = _mm512_maskz_loadu_ps(live, sc);
        const float blk = _mm512_mask_reduce_max_ps(live, v);
        const float top = blk > mx[hq] ? blk : mx[hq];
        const __m512 e = _mm512_maskz_mov_ps(live, exp_neg16(_mm512_sub_ps(v, _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(sc, live, e);
        if (top > mx[hq]) {
            const __m512 fix = _mm512_set1_ps(exp_neg(mx[hq] - top));
            float *row = acc + hq * a->dim;
            for (int64_t d = 0; d < a->dim; d += 16)
                _mm512_storeu_ps(row + d, _mm512_mul_ps(_mm512_loadu_ps(row + d), fix));
            sum[hq] *= exp_neg(mx[hq] - top);
            mx[hq] = top;
        }
        sum[hq] += _mm512_reduce_add_ps(e);
    }
}
#endif

INLINE void block_softmax(enum kind kind, const struct args *a, int64_t count, float *scores,
                          float *mx, float *sum, float *acc) {
#if HAVE_AVX512_BF16
    if (kind == BF16 && count <= 16 && a->dim % 16 == 0) { /* other kinds: sums as before */
        block_softmax16(a, count, scores, mx, sum, acc);
        return;
    }
#endif
    for (int64_t hq = 0; hq < a->heads; hq++) {
        float *sc = scores + hq * a->block_size, top = mx[hq];
        for (int64_t j = 0; j < count; j++) top = sc[j] > top ? sc[j] : top;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = 0; j < count; j++) {
            sc[j] = exp_neg(sc[j] - top);
            part += sc[j];
        }
        if (top > mx[hq]) {
            const float fix = exp_neg(mx[hq] - top);
            float *row = acc + hq * a->dim;
            for (int64_t d = 0; d < a->dim; d++) row[d] *= fix;
            sum[hq] *= fix;
            mx[hq] = top;
        }
        sum[hq] += part;
    }
}

/* One pass over blocks [b0, b1) of sequence s (K and V of a block together): the
 * unnormalised sums acc[heads][dim], running max mx[heads] and sum[heads] into `part`. */
INLINE void attend(enum kind kind, const struct args *a, int64_t s, int64_t b0, int64_t b1,
                   float *work, float *part) {
    const int64_t dim = a->dim, heads = a->heads, len = a->lengths[s], bs = a->block_size;
    const int64_t *table = a->tables + s * a->table_width;
    const int64_t slab = bs * a->kv_heads * dim;
    const size_t elem = kind == F32 ? 4 : 2;
    const void *q_raw = (const char *)a->q + (size_t)(s * a->q_stride) * elem;
    float *scores = work, *qf = scores + heads * bs;
    float *acc = part, *mx = acc + heads * dim, *sum = mx + heads;
    if (!(kind == BF16 && HAVE_AVX512_BF16 && dim % 32 == 0))
        load_row(kind, a->q, s * a->q_stride, qf, heads * dim);
    memset(acc, 0, sizeof(float) * (size_t)(heads * dim));
    for (int64_t hq = 0; hq < heads; hq++) mx[hq] = -3.0e38f, sum[hq] = 0.0f;
    /* where the bf16 register paths run, they prefetch the next block a line at a time */
    const int spread = kind == BF16 && HAVE_AVX512_BF16 && dim % 32 == 0 &&
                       heads / a->kv_heads <= 8;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t count = len - b * bs < bs ? len - b * bs : bs;
        const int64_t off = table[b] * a->block_stride;
        const int64_t next = b + 1 < b1 ? table[b + 1] * a->block_stride : -1;
        const int64_t lines = next >= 0 && spread ? slab * (int64_t)elem / 64 : 0;
        struct pref kf = {NULL, 0}, vf = {NULL, 0};
        if (lines > 0) {
            kf = (struct pref){(const char *)a->k + (size_t)(next * (int64_t)elem), lines};
            vf = (struct pref){(const char *)a->v + (size_t)(next * (int64_t)elem), lines};
        }
        if (next >= 0 && !spread) prefetch_block(a->k, next, slab * (int64_t)elem, elem);
        block_scores(kind, a, off, count, qf, q_raw, scores, &kf);
        if (next >= 0 && !spread) prefetch_block(a->v, next, slab * (int64_t)elem, elem);
        block_softmax(kind, a, count, scores, mx, sum, acc);
        block_values(kind, a, off, count, scores, acc, &vf);
        pref_rest(&kf);
        pref_rest(&vf);
    }
}

/* Sequence s's output from its chunks' partial sums (`parts` consecutive), in `acc`. */
INLINE void merge(enum kind kind, const struct args *a, int64_t s, const float *parts,
                  int64_t chunks, float *acc) {
    const int64_t dim = a->dim, heads = a->heads, stride = heads * (dim + 2);
    for (int64_t hq = 0; hq < heads; hq++) {
        float top = -3.0e38f, total = 0.0f;
        for (int64_t c = 0; c < chunks; c++) {
            const float m = parts[c * stride + heads * dim + hq];
            top = m > top ? m : top;
        }
        float *row = acc + hq * dim;
        memset(row, 0, sizeof(float) * (size_t)dim);
        for (int64_t c = 0; c < chunks; c++) {
            const float *part = parts + c * stride;
            const float w = exp_neg(part[heads * dim + hq] - top);
            total += w * part[heads * dim + heads + hq];
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) row[d] += w * part[hq * dim + d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < dim; d++) row[d] *= inv;
    }
    store_row(kind, a->out, s * heads * dim, acc, heads * dim);
}

/* Each sequence's blocks go in chunks of CHUNK_BLOCKS, one work item each, so a few long
 * sequences (one stream) still keep every thread busy; the chunks' partial softmax sums
 * are merged after. The split depends only on a sequence's length, never on the batch or
 * the thread count, so a sequence's output is the same in any batch. */
#define CHUNK_BLOCKS 4

INLINE int run(enum kind kind, const struct args *a, int64_t num_seqs) {
    const int64_t group = a->heads / a->kv_heads, bs = a->block_size;
    if (a->dim > MAX_HEAD_DIM || a->heads * a->dim > MAX_ROW || group * a->kv_heads != a->heads ||
        bs < 1 || bs > 4096)
        return 1;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1)); /* item offsets */
    if (first == NULL) return 3;
    first[0] = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        if (a->lengths[s] <= 0 || a->lengths[s] > a->table_width * bs) {
            free(first);
            return 2;
        }
        const int64_t blocks = (a->lengths[s] + bs - 1) / bs;
        first[s + 1] = first[s] + (blocks + CHUNK_BLOCKS - 1) / CHUNK_BLOCKS;
    }
    const int64_t items = first[num_seqs], stride = a->heads * (a->dim + 2);
    float *parts = malloc(sizeof(float) * (size_t)(items * stride));
    if (parts == NULL) {
        free(first);
        return 3;
    }
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        const size_t words = (size_t)(a->heads * (bs + a->dim));
        float *work = malloc(sizeof(float) * words);
        if (work == NULL) failed = 3;
        int64_t s = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (work == NULL) continue;
            if (item < first[s]) s = 0;
            while (first[s + 1] <= item) s++; /* a thread's items mostly ascend */
            const int64_t b0 = (item - first[s]) * CHUNK_BLOCKS;
            const int64_t blocks = (a->lengths[s] + bs - 1) / bs;
            const int64_t b1 = b0 + CHUNK_BLOCKS < blocks ? b0 + CHUNK_BLOCKS : blocks;
            attend(kind, a, s, b0, b1, work, parts + item * stride);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t q = 0; q < num_seqs; q++)
            if (work != NULL)
                merge(kind, a, q, parts + first[q] * stride, first[q + 1] - first[q], work);
        free(work);
    }
    free(parts);
    free(first);
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
