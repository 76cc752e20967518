/* The experts of a CPU decode step in one pass over their weights (AVX-512, OpenMP).
 *
 * x [T, H], ids [T, K] int64 (local experts), w [T, K] routing weights, gate_up [E, 2I, H]
 * (gate = even rows, up = odd rows: the checkpoint layout), gate_up_bias [E, 2I],
 * down [E, H, I], down_bias [E, H] -> out [T, H], all bf16 (`bf16` = 1) or all float32:
 *   out[t] = sum_k w[t,k] * (down_e @ swiglu(gate_up_e @ x[t] + b_e) + db_e),  e = ids[t,k].
 * Each chosen expert's weights are read once (the torch paths read every expert, or loop
 * over them a matmul call each). bf16 keeps the arithmetic of gptoss_kernels.moe.
 * moe_experts_dense: AVX512-BF16 dot products accumulated in float32, gate_up outputs rounded
 * to bf16, the clamped SwiGLU in float32, the weighted activation rounded to bf16. float32
 * rounds nowhere but in its float32 sums. Phase 1 (gate_up and the activation) splits
 * (expert, row block) items over the threads, phase 2 (down and the K-way sum) blocks of
 * output columns. H and I must be multiples of 32. gptoss_kernels/cpu_kernels.py builds and
 * calls it. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* element i of a bf16 or float32 array, as float */
static inline float get(const void *a, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)a)[i]) : ((const float *)a)[i];
}

/* what the bf16 path rounds (the dense path's bf16 tensors); float32 keeps as is */
static inline float rounded(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline void put(void *a, size_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)a)[i] = f32_to_bf16(v);
    else ((float *)a)[i] = v;
}

#define AHEAD 4 /* rows prefetched ahead of the one computed: DRAM latency hides behind the dot products */

static inline void prefetch_row(const char *row, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

/* One weight row against up to four activation rows (n elements each): four independent
   accumulator chains, the weight loaded once per step. */
static inline void dot_x4(const void *wrow, const void *const rows[4], int n, float out[4], int bf16) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    if (bf16) {
        const uint16_t *wr = wrow, *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
        for (int k = 0; k < n; k += 32) {
            __m512bh v = (__m512bh)_mm512_loadu_si512(wr + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r0 + k), v);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r1 + k), v);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r2 + k), v);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r3 + k), v);
        }
    } else {
        const float *wr = wrow, *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
        for (int k = 0; k < n; k += 16) {
            __m512 v = _mm512_loadu_ps(wr + k);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + k), v, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + k), v, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + k), v, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r3 + k), v, a3);
        }
    }
    out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
}

#define ROWS 32 /* gate/up row pairs per phase-1 item, output columns per phase-2 item */

int moe_decode(const void *x, const int64_t *ids, const void *w, const void *gate_up, const void *gate_up_bias,
               const void *down, const void *down_bias, void *out, int T, int K, int H, int I, int E,
               float alpha, float limit, int bf16) {
    size_t es = bf16 ? 2 : 4; /* bytes per element */
    int N = T * K;
    /* pairs grouped by expert: order[start[e] .. start[e + 1]) */
    int *start = calloc(E + 1, sizeof(int)), *order = malloc(sizeof(int) * (N ? N : 1)),
        *fill = malloc(sizeof(int) * (E ? E : 1));
    char *act = malloc(es * (size_t)(N ? N : 1) * I); /* [N, I] weighted SwiGLU activations */
    if (!start || !order || !fill || !act) { free(start); free(order); free(fill); free(act); return 1; }
    for (int p = 0; p < N; p++) {
        if (ids[p] < 0 || ids[p] >= E) { free(start); free(order); free(fill); free(act); return 2; }
        start[ids[p] + 1]++;
    }
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, sizeof(int) * E);
    for (int p = 0; p < N; p++) order[fill[ids[p]]++] = p;
    free(fill);

    int blocks = I / ROWS + (I % ROWS != 0), items = E * blocks;
    #pragma omp parallel for schedule(static)
    for (int item = 0; item < items; item++) {
        int e = item / blocks, j0 = (item % blocks) * ROWS, j1 = j0 + ROWS < I ? j0 + ROWS : I;
        if (start[e] == start[e + 1]) continue; /* nobody chose this expert: its weights stay unread */
        const char *W = (const char *)gate_up + es * (size_t)e * 2 * I * H;
        size_t bias0 = (size_t)e * 2 * I;
        for (int j = j0; j < j1; j++) {
            const char *wg = W + es * (size_t)(2 * j) * H, *wu = wg + es * H;
            if (j + AHEAD < I) prefetch_row(W + es * (size_t)(2 * (j + AHEAD)) * H, es * 2 * H);
            for (int q0 = start[e]; q0 < start[e + 1]; q0 += 4) {
                int n = start[e + 1] - q0 < 4 ? start[e + 1] - q0 : 4;
                const void *xs[4];
                for (int r = 0; r < 4; r++) xs[r] = (const char *)x + es * (size_t)(order[q0 + (r < n ? r : 0)] / K) * H;
                float gs[4], us[4];
                dot_x4(wg, xs, H, gs, bf16);
                dot_x4(wu, xs, H, us, bf16);
                for (int r = 0; r < n; r++) {
                    int p = order[q0 + r];
                    float g = rounded(gs[r] + get(gate_up_bias, bias0 + 2 * j, bf16), bf16);
                    float u = rounded(us[r] + get(gate_up_bias, bias0 + 2 * j + 1, bf16), bf16);
                    g = fminf(g, limit) * alpha;
                    u = fminf(fmaxf(u, -limit), limit) + 1.0f;
                    float silu = g / (1.0f + expf(-g)); /* (alpha g) sigmoid(alpha g) */
                    put(act, (size_t)p * I + j, u * silu * (get(w, p, bf16) / alpha), bf16);
                }
            }
        }
    }

    /* phase 2: each item a block of output columns h, read expert by expert (each expert's
       rows h0..h1 are contiguous), accumulated in float32 */
    int hblocks = H / ROWS + (H % ROWS != 0);
    #pragma omp parallel for schedule(static)
    for (int hb = 0; hb < hblocks; hb++) {
        int h0 = hb * ROWS, h1 = h0 + ROWS < H ? h0 + ROWS : H;
        float acc[ROWS * 64]; /* [T <= 64][ROWS] on the stack, else on the heap */
        float *heap_acc = T > 64 ? calloc((size_t)T * ROWS, sizeof(float)) : NULL;
        float *a = heap_acc ? heap_acc : acc;
        if (!heap_acc) memset(acc, 0, sizeof(float) * (size_t)T * ROWS);
        for (int e = 0; e < E; e++) {
            if (start[e] == start[e + 1]) continue;
            for (int h = h0; h < h1; h++) {
                const char *row = (const char *)down + es * ((size_t)e * H + h) * I;
                if (h + AHEAD < h1) prefetch_row(row + es * (size_t)AHEAD * I, es * I);
                float bias = get(down_bias, (size_t)e * H + h, bf16);
                for (int q0 = start[e]; q0 < start[e + 1]; q0 += 4) {
                    int n = start[e + 1] - q0 < 4 ? start[e + 1] - q0 : 4;
                    const void *as[4];
                    for (int r = 0; r < 4; r++) as[r] = act + es * (size_t)order[q0 + (r < n ? r : 0)] * I;
                    float d[4];
                    dot_x4(row, as, I, d, bf16);
                    for (int r = 0; r < n; r++) {
                        int p = order[q0 + r];
                        a[(p / K) * ROWS + (h - h0)] += d[r] + get(w, p, bf16) * bias;
                    }
                }
            }
        }
        for (int t = 0; t < T; t++)
            for (int h = h0; h < h1; h++) put(out, (size_t)t * H + h, a[t * ROWS + (h - h0)], bf16);
        free(heap_acc);
    }
    free(start); free(order); free(act);
    return 0;
}
