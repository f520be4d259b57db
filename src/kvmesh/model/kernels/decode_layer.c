/* One Llama decoder layer for a pure decode step (one new token per sequence), float32,
 * with weight-only quantized linears (quant_linear.c) and paged decode attention
 * (paged_decode.c), in one call:
 *
 *   h = rmsnorm(x) ; qkv = h Wqkv^T (+b) ; rope(q, k) ; k, v -> cache slots
 *   a = attention(q, cache) ; x += a Wo^T
 *   h = rmsnorm(x) ; g, u = h Wgu^T ; x += (silu(g) * u) Wd^T
 *
 * The same steps as the torch path (model/llama.py) in the same order, so results agree
 * to float rounding; what it saves is some 30 small tensor ops and their dispatch per
 * layer, which at one stream cost more than the weights take to stream. Elementwise loops
 * are left to the compiler (omp simd); the linears and attention parallelise inside.
 * The KV cache is float32, or bf16 for a bf16 model (`kv_bf16`): then K and V are rounded
 * to bf16 on the way into the cache and attention runs on bf16 (paged_decode_bf16), while
 * the residual stream stays float32 across the layers; int4 linears with bf16 pairs
 * (quant_bf16.c) round their inputs to bf16 and accumulate in float32.
 * Returns non-zero on a shape or buffer it does not support.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec_math.h"

int quant_linear_f32(const float *x, int64_t rows, int64_t x_stride, const uint8_t *q,
                     const float *scale, const float *min, const float *bias, int64_t n,
                     int64_t k, int64_t group, int64_t bits, float *y, int64_t y_stride);
int quant_linear_i4bf16(const float *x, int64_t rows, int64_t x_stride, const uint32_t *q,
                        const float *scale, const float *min128, const float *min,
                        const float *bias, int64_t n, int64_t k, int64_t group, float *y,
                        int64_t y_stride);
int quant_i4bf16_max_rows(void);
int quant_linear_i4a8(const float *x, int64_t rows, int64_t x_stride, const uint8_t *q,
                      const uint16_t *scale, const uint16_t *min, const float *bias, int64_t n,
                      int64_t k, int64_t group, float *y, int64_t y_stride);
int paged_decode_f32(const void *q, int64_t q_stride, const void *k, const void *v,
                     int64_t block_stride, const int64_t *tables, int64_t table_width,
                     const int64_t *lengths, void *out, int64_t num_seqs, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t block_size, float scale);
int paged_decode_bf16(const void *q, int64_t q_stride, const void *k, const void *v,
                      int64_t block_stride, const int64_t *tables, int64_t table_width,
                      const int64_t *lengths, void *out, int64_t num_seqs, int64_t heads,
                      int64_t kv_heads, int64_t dim, int64_t block_size, float scale);

int paged_verify_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k, const uint16_t *v,
                      int64_t block_stride, const int64_t *table, int64_t table_width,
                      int64_t len0, int64_t rows, uint16_t *out, int64_t heads,
                      int64_t kv_heads, int64_t dim, int64_t block_size, float scale);
int paged_verify_available(void);

/* Runs of this many rows of one sequence's consecutive tokens or more go to paged_verify.c
 * (AMX), shorter ones to paged_decode.c. */
static int verify_min_rows = 2;

/* Set verify_min_rows (for A/B runs); returns the previous value. */
int decode_layer_set_verify_min_rows(int rows) {
    return __atomic_exchange_n(&verify_min_rows, rows < 1 ? 1 : rows, __ATOMIC_RELAXED);
}

struct qlinear { /* one QuantLinear: model/quant.py fills it */
    const uint8_t *q;
    const float *scale, *min, *bias;
    int64_t n, k, group, bits;
    const uint32_t *pairs; /* bf16 models: int4 as bf16 pairs (quant_bf16.c), or NULL */
    const float *min128;
    const uint16_t *scale16, *min16; /* int4 with int8 activations (quant_a8.c), or NULL */
};

struct layer { /* one decoder layer's weights and shapes: model/fused.py fills it */
    struct qlinear qkv, o, gate_up, down;
    const float *ln1, *ln2;
    float eps;
    int64_t hidden, heads, kv_heads, dim, inter;
};

struct step { /* what one decode step shares across layers */
    int64_t seqs;
    const float *cos, *sin; /* [seqs, dim]: each token's rotary row */
    const int64_t *slot_blocks, *slot_offsets, *tables, *lengths;
    int64_t table_width, block_size, block_stride;
    float scale;
    int64_t kv_bf16; /* 1: the KV cache holds bf16 */
};

static int linear(const struct qlinear *l, const float *x, int64_t rows, float *y) {
    if (l->scale16 != NULL)
        return quant_linear_i4a8(x, rows, l->k, l->q, l->scale16, l->min16, l->bias, l->n,
                                 l->k, l->group, y, l->n);
    if (l->pairs != NULL && rows <= quant_i4bf16_max_rows())
        return quant_linear_i4bf16(x, rows, l->k, l->pairs, l->scale, l->min128, l->min,
                                   l->bias, l->n, l->k, l->group, y, l->n);
    return quant_linear_f32(x, rows, l->k, l->q, l->scale, l->min, l->bias, l->n, l->k,
                            l->group, l->bits, y, l->n);
}

static void rmsnorm(const float *x, const float *w, float eps, int64_t rows, int64_t n,
                    float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[r * n + i] = w[i] * (xr[i] * inv);
    }
}

/* rotate_half RoPE on `heads` heads of one token, in place: x*cos + rotate_half(x)*sin. */
static void rope(float *x, int64_t heads, int64_t dim, const float *cos, const float *sin) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * dim;
        float lo[half];
#pragma omp simd
        for (int64_t i = 0; i < half; i++) lo[i] = v[i];
#pragma omp simd
        for (int64_t i = 0; i < half; i++) v[i] = v[i] * cos[i] - v[i + half] * sin[i];
#pragma omp simd
        for (int64_t i = 0; i < half; i++)
            v[i + half] = v[i + half] * cos[i + half] + lo[i] * sin[i + half];
    }
}

static void silu_mul(const float *gu, int64_t rows, int64_t inter, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) {
            const float e = exp_neg(-fabsf(g[i])); /* sigmoid without overflow */
            const float sig = g[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            out[r * inter + i] = g[i] * sig * u[i];
        }
    }
}

static void add_rows(float *x, const float *y, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; i++) x[i] += y[i];
}

static void to_bf16(const float *src, int64_t n, uint16_t *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

/* Scratch floats this layer needs for `seqs` tokens (the caller allocates them once). */
int64_t decode_layer_scratch(const struct layer *w, int64_t seqs) {
    const int64_t qkv = (w->heads + 2 * w->kv_heads) * w->dim;
    /* the last heads*dim: bf16 q and attention output (two halves) for a bf16 cache */
    return seqs * (2 * w->hidden + qkv + 2 * w->heads * w->dim + 3 * w->inter);
}

/* The end of the run of rows from t that are one sequence's consecutive tokens: the same
 * blocks, lengths ascending by one (a verify step's rows). */
static int64_t run_end(const struct step *s, int64_t t) {
    const int64_t *first = s->tables + t * s->table_width;
    int64_t e = t + 1;
    while (e < s->seqs && s->lengths[e] == s->lengths[e - 1] + 1) {
        const int64_t blocks = (s->lengths[e] + s->block_size - 1) / s->block_size;
        if (blocks > s->table_width ||
            memcmp(s->tables + e * s->table_width, first, sizeof(int64_t) * (size_t)blocks))
            break;
        e++;
    }
    return e;
}

/* bf16 attention for rows [a, b) with paged_decode: each row on its own. */
static int decode_rows(const struct layer *w, const struct step *s, const uint16_t *q,
                       const void *k_cache, const void *v_cache, uint16_t *out, int64_t a,
                       int64_t b) {
    const int64_t qn = w->heads * w->dim;
    if (b <= a) return 0;
    return paged_decode_bf16(q + a * qn, qn, k_cache, v_cache, s->block_stride,
                             s->tables + a * s->table_width, s->table_width, s->lengths + a,
                             out + a * qn, b - a, w->heads, w->kv_heads, w->dim,
                             s->block_size, s->scale);
}

/* bf16 attention for every row: runs of one sequence's consecutive tokens (verify steps)
 * on the tiles where they run here, the other rows with paged_decode. */
static int attention_bf16(const struct layer *w, const struct step *s, const uint16_t *q,
                          const void *k_cache, const void *v_cache, uint16_t *out) {
    const int64_t qn = w->heads * w->dim;
    int64_t pending = 0; /* rows [pending, t) wait for paged_decode */
    int rc = 0;
    const int64_t least = paged_verify_available()
                              ? __atomic_load_n(&verify_min_rows, __ATOMIC_RELAXED)
                              : INT64_MAX; /* no tiles here: every row to paged_decode */
    for (int64_t t = 0; t < s->seqs && least < INT64_MAX;) {
        const int64_t e = run_end(s, t);
        if (e - t >= least) {
            rc |= decode_rows(w, s, q, k_cache, v_cache, out, pending, t);
            const int vr = paged_verify_bf16(
                q + t * qn, qn, k_cache, v_cache, s->block_stride, s->tables + t * s->table_width,
                s->table_width, s->lengths[t], e - t, out + t * qn, w->heads, w->kv_heads, w->dim,
                s->block_size, s->scale);
            rc |= vr == 1 || vr == 3 ? decode_rows(w, s, q, k_cache, v_cache, out, t, e) : vr;
            pending = e;
        }
        t = e;
    }
    return rc | decode_rows(w, s, q, k_cache, v_cache, out, pending, s->seqs);
}

/* Rotary, the cache write and attention: qkv [S, qkv_n] in, att [S, qn] float32 out. */
static int attention(const struct layer *w, const struct step *s, float *qkv, void *k_cache,
                     void *v_cache, float *att, uint16_t *half) {
    const int64_t S = s->seqs, D = w->dim, qn = w->heads * D, kvn = w->kv_heads * D;
    const int64_t qkv_n = qn + 2 * kvn;
    for (int64_t t = 0; t < S; t++) {
        float *row = qkv + t * qkv_n;
        rope(row, w->heads + w->kv_heads, D, s->cos + t * D, s->sin + t * D);
        const int64_t at = s->slot_blocks[t] * s->block_stride + s->slot_offsets[t] * kvn;
        if (s->kv_bf16) {
            to_bf16(row + qn, kvn, (uint16_t *)k_cache + at);
            to_bf16(row + qn + kvn, kvn, (uint16_t *)v_cache + at);
            to_bf16(row, qn, half + t * qn);
        } else {
            memcpy((float *)k_cache + at, row + qn, sizeof(float) * (size_t)kvn);
            memcpy((float *)v_cache + at, row + qn + kvn, sizeof(float) * (size_t)kvn);
        }
    }
    if (!s->kv_bf16)
        return paged_decode_f32(qkv, qkv_n, k_cache, v_cache, s->block_stride, s->tables,
                                s->table_width, s->lengths, att, S, w->heads, w->kv_heads, D,
                                s->block_size, s->scale);
    uint16_t *out = half + S * qn;
    const int rc = attention_bf16(w, s, half, k_cache, v_cache, out);
    for (int64_t i = 0; i < S * qn; i++) att[i] = bf16_to_f32(out[i]);
    return rc;
}

int decode_layer_f32(const struct layer *w, const struct step *s, float *x, void *k_cache,
                     void *v_cache, float *scratch) {
    const int64_t S = s->seqs, H = w->hidden, D = w->dim;
    const int64_t qn = w->heads * D, kvn = w->kv_heads * D, qkv_n = qn + 2 * kvn;
    if (D % 2 || w->qkv.n != qkv_n || w->gate_up.n != 2 * w->inter || w->o.n != H ||
        w->down.n != H)
        return 10;
    float *h = scratch, *qkv = h + S * H, *att = qkv + S * qkv_n, *gu = att + S * qn;
    float *act = gu + S * 2 * w->inter, *o = act + S * w->inter;
    uint16_t *half = (uint16_t *)(o + S * H);
    int rc = 0;
    rmsnorm(x, w->ln1, w->eps, S, H, h);
    if ((rc = linear(&w->qkv, h, S, qkv))) return rc;
    if ((rc = attention(w, s, qkv, k_cache, v_cache, att, half))) return 20 + rc;
    if ((rc = linear(&w->o, att, S, o))) return rc;
    add_rows(x, o, S * H);
    rmsnorm(x, w->ln2, w->eps, S, H, h);
    if ((rc = linear(&w->gate_up, h, S, gu))) return rc;
    silu_mul(gu, S, w->inter, act);
    if ((rc = linear(&w->down, act, S, o))) return rc;
    add_rows(x, o, S * H);
    return 0;
}
