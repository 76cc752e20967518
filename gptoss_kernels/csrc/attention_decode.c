/* Paged attention of a CPU decode step (one query per sequence), with gpt-oss's sinks and
 * an optional sliding window, read straight from the paged cache (AVX-512, OpenMP).
 *
 * q [B, Hq, D], k_cache / v_cache [NB, BS, Hkv, D], all bf16 (`bf16` = 1) or all float32;
 * block_tables [B, table_stride] int32 (-1: no block), context_lens [B] int32, sinks [Hq]
 * float32 -> out [B, Hq, D] in q's dtype. The query of sequence b sits at position
 * ctx - 1 and sees positions p in [max(0, ctx - window), ctx) (window <= 0: all) whose block
 * is not -1; its sink joins the softmax denominator and adds no value:
 *   out = sum_p e^(s_p - m) v_p / (sum_p e^(s_p - m) + e^(sink - m)),  s_p = scale q.k_p.
 * Float32 arithmetic with an online softmax; the G = Hq / Hkv query heads of a kv head read
 * each key and value once. Slots nobody may see are never read. D must be a multiple of 16.
 * Same contract as gptoss_kernels.attention.paged_attention_ref on decode steps;
 * gptoss_kernels/cpu_kernels.py builds and calls it. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline __m512 load16(const void *row, int k, int bf16) { /* 16 elements from k, as float */
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)row + k);
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define MAX_G 16   /* query heads per kv head */
#define MAX_D 256  /* head dim */

int paged_decode(const void *q, const void *k_cache, const void *v_cache, const int32_t *block_tables,
                 int table_stride, const int32_t *context_lens, const float *sinks, float scale, int window,
                 void *out, int B, int Hq, int Hkv, int D, int BS, int NB, int bf16) {
    if (Hkv <= 0 || Hq % Hkv || Hq / Hkv > MAX_G || D > MAX_D || D % 16) return 1;
    int G = Hq / Hkv, V = D / 16;
    size_t es = bf16 ? 2 : 4;
    int bad = 0;
    #pragma omp parallel for schedule(static) reduction(| : bad)
    for (int item = 0; item < B * Hkv; item++) {
        int b = item / Hkv, kvh = item % Hkv, ctx = context_lens[b];
        int first = window > 0 && ctx > window ? ctx - window : 0;
        __m512 qv[MAX_G][MAX_D / 16], acc[MAX_G][MAX_D / 16];
        float m[MAX_G], l[MAX_G];
        for (int g = 0; g < G; g++) {
            const char *qrow = (const char *)q + es * ((size_t)b * Hq + kvh * G + g) * D;
            for (int v = 0; v < V; v++) {
                qv[g][v] = _mm512_mul_ps(load16(qrow, 16 * v, bf16), _mm512_set1_ps(scale));
                acc[g][v] = _mm512_setzero_ps();
            }
            m[g] = -INFINITY;
            l[g] = 0.0f;
        }
        for (int p = first; p < ctx; p++) {
            int blk = block_tables[(size_t)b * table_stride + p / BS];
            if (blk < 0) continue;  /* a sliding block already recycled: outside the window */
            if (blk >= NB) { bad = 1; break; }
            size_t slot = ((size_t)blk * BS + p % BS) * Hkv + kvh;
            const char *krow = (const char *)k_cache + es * slot * D, *vrow = (const char *)v_cache + es * slot * D;
            __m512 kv[MAX_D / 16], vv[MAX_D / 16];
            for (int v = 0; v < V; v++) { kv[v] = load16(krow, 16 * v, bf16); vv[v] = load16(vrow, 16 * v, bf16); }
            for (int g = 0; g < G; g++) {
                __m512 d = _mm512_mul_ps(qv[g][0], kv[0]);
                for (int v = 1; v < V; v++) d = _mm512_fmadd_ps(qv[g][v], kv[v], d);
                float s = _mm512_reduce_add_ps(d);
                if (s > m[g]) {  /* a new maximum: rescale what is summed so far */
                    float c = expf(m[g] - s);
                    l[g] *= c;
                    for (int v = 0; v < V; v++) acc[g][v] = _mm512_mul_ps(acc[g][v], _mm512_set1_ps(c));
                    m[g] = s;
                }
                float e = expf(s - m[g]);
                l[g] += e;
                for (int v = 0; v < V; v++) acc[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(e), vv[v], acc[g][v]);
            }
        }
        for (int g = 0; g < G; g++) {
            int h = kvh * G + g;
            /* nothing visible: m = -inf, the sink takes all the weight and the output is 0 */
            float denom = l[g] + expf(sinks[h] - m[g]);
            __m512 inv = _mm512_set1_ps(1.0f / denom);
            char *orow = (char *)out + es * ((size_t)b * Hq + h) * D;
            for (int v = 0; v < V; v++) {
                float tmp[16];
                _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[g][v], inv));
                for (int i = 0; i < 16; i++) {
                    if (bf16) ((uint16_t *)orow)[16 * v + i] = f32_to_bf16(tmp[i]);
                    else ((float *)orow)[16 * v + i] = tmp[i];
                }
            }
        }
    }
    return bad ? 2 : 0;
}
