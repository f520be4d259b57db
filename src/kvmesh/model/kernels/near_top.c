/* bf16 logits to float32, and where each row's leaders are (model/logits.py).
 *
 * For `rows` rows of `n` bf16 logits: writes them to `out` as float32 and the flat
 * indices (row * n + column) of every logit >= max - rel * (|max| + 1) of its row, in
 * order, to `idx`. Rows are shared among the threads; per row one pass converts and
 * takes the maximum, a second finds the leaders in the converted row while it is still
 * in cache, 16 at a time. Each row may report up to cap / rows leaders (a row has a
 * handful; a flat one has many). Returns how many in all, or -1 where a row had more.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Row r: converted into `row`, its leaders' flat indices into `found` (up to `room`).
 * Returns how many, or -1 past `room`. */
static int64_t one_row(const uint16_t *src, int64_t r, int64_t n, float rel, float *row,
                       int64_t *found, int64_t room) {
    float top = -INFINITY;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i))), 16));
        _mm512_storeu_ps(row + i, v);
        best = _mm512_max_ps(best, v);
    }
    top = _mm512_reduce_max_ps(best);
#endif
    for (; i < n; i++) {
        row[i] = bf16_to_f32(src[i]);
        top = row[i] > top ? row[i] : top;
    }
    const float thr = top - rel * (fabsf(top) + 1.0f);
    int64_t count = 0;
    i = 0;
#if defined(__AVX512F__)
    const __m512 t = _mm512_set1_ps(thr);
    for (; i + 16 <= n; i += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), t, _CMP_GE_OQ);
        while (hit) {
            if (count == room) return -1;
            found[count++] = r * n + i + __builtin_ctz(hit);
            hit &= hit - 1;
        }
    }
#endif
    for (; i < n; i++)
        if (row[i] >= thr) {
            if (count == room) return -1;
            found[count++] = r * n + i;
        }
    return count;
}

int64_t near_top_bf16(const uint16_t *x, int64_t rows, int64_t n, float rel, float *out,
                      int64_t *idx, int64_t cap) {
    if (rows <= 0) return 0;
    const int64_t room = cap / rows;
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)rows);
    if (counts == NULL) return -1;
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int64_t r = 0; r < rows; r++) {
        counts[r] = one_row(x + r * n, r, n, rel, out + r * n, idx + r * room, room);
        failed |= counts[r] < 0;
    }
    int64_t total = 0;
    for (int64_t r = 0; r < rows && !failed; r++)  /* rows' leaders in order, packed */
        for (int64_t j = 0; j < counts[r]; j++) idx[total++] = idx[r * room + j];
    free(counts);
    return failed ? -1 : total;
}
