/* The experts of a CPU decode step in one pass over their weights (AVX512-BF16, OpenMP).
 *
 * x [T, H] bf16, ids [T, K] int64 (local experts), w [T, K] bf16 routing weights,
 * gate_up [E, 2I, H] bf16 (gate = even rows, up = odd rows: the checkpoint layout),
 * gate_up_bias [E, 2I] bf16, down [E, H, I] bf16, down_bias [E, H] bf16 -> out [T, H] bf16:
 *   out[t] = sum_k w[t,k] * (down_e @ swiglu(gate_up_e @ x[t] + b_e) + db_e),  e = ids[t,k].
 * The arithmetic of gptoss_kernels.moe.moe_experts_dense, read once per expert instead of
 * through two dense GEMMs over every expert: gate_up outputs rounded to bf16, the clamped
 * SwiGLU in float32, the weighted activation rounded to bf16, float32 accumulation.
 * Phase 1 splits (expert, row block) items over the threads, phase 2 output columns.
 * Needs H and I multiples of 32 (one 512-bit load of 32 bf16). gptoss_kernels/moe_cpu.py
 * builds and calls it. */
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

#define AHEAD 4 /* rows prefetched ahead of the one computed: DRAM latency hides behind the dot products */

static inline void prefetch_row(const uint16_t *row, int n) {
    for (int k = 0; k < n; k += 32) _mm_prefetch((const char *)(row + k), _MM_HINT_T0);
}

/* One weight row against up to four activation rows: four independent accumulator chains
   (one chain would wait on each dot product's latency), the weight loaded once per step. */
static inline void dot_bf16_x4(const uint16_t *wrow, const uint16_t *const rows[4], int n, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 32) {
        __m512bh w = (__m512bh)_mm512_loadu_si512(wrow + k);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(rows[0] + k), w);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(rows[1] + k), w);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(rows[2] + k), w);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(rows[3] + k), w);
    }
    out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
}

#define ROWS 32 /* gate/up row pairs per phase-1 item, output columns per phase-2 item */

int moe_decode_bf16(const uint16_t *x, const int64_t *ids, const uint16_t *w, const uint16_t *gate_up,
                    const uint16_t *gate_up_bias, const uint16_t *down, const uint16_t *down_bias, uint16_t *out,
                    int T, int K, int H, int I, int E, float alpha, float limit) {
    int N = T * K;
    /* pairs grouped by expert: order[start[e] .. start[e + 1]) */
    int *start = calloc(E + 1, sizeof(int)), *order = malloc(sizeof(int) * (N ? N : 1));
    uint16_t *act = malloc(sizeof(uint16_t) * (size_t)(N ? N : 1) * I); /* [N, I] weighted SwiGLU, bf16 */
    if (!start || !order || !act) { free(start); free(order); free(act); return 1; }
    for (int p = 0; p < N; p++) {
        if (ids[p] < 0 || ids[p] >= E) { free(start); free(order); free(act); return 2; }
        start[ids[p] + 1]++;
    }
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    {
        int *fill = malloc(sizeof(int) * (E ? E : 1));
        memcpy(fill, start, sizeof(int) * E);
        for (int p = 0; p < N; p++) order[fill[ids[p]]++] = p;
        free(fill);
    }
    int blocks = I / ROWS + (I % ROWS != 0), items = E * blocks;
    #pragma omp parallel for schedule(static)
    for (int item = 0; item < items; item++) {
        int e = item / blocks, j0 = (item % blocks) * ROWS, j1 = j0 + ROWS < I ? j0 + ROWS : I;
        if (start[e] == start[e + 1]) continue; /* nobody chose this expert: its weights stay unread */
        const uint16_t *W = gate_up + (size_t)e * 2 * I * H, *B = gate_up_bias + (size_t)e * 2 * I;
        for (int j = j0; j < j1; j++) {
            const uint16_t *wg = W + (size_t)(2 * j) * H, *wu = wg + H;
            if (j + AHEAD < I) prefetch_row(W + (size_t)(2 * (j + AHEAD)) * H, 2 * H);
            for (int q0 = start[e]; q0 < start[e + 1]; q0 += 4) {
                int n = start[e + 1] - q0 < 4 ? start[e + 1] - q0 : 4;
                const uint16_t *xs[4];
                for (int r = 0; r < 4; r++) xs[r] = x + (size_t)(order[q0 + (r < n ? r : 0)] / K) * H;
                float gs[4], us[4];
                dot_bf16_x4(wg, xs, H, gs);
                dot_bf16_x4(wu, xs, H, us);
                for (int r = 0; r < n; r++) {
                    int p = order[q0 + r];
                    /* rounded to bf16 as the GEMM's bf16 output is, then the activation in float32 */
                    float g = bf16_to_f32(f32_to_bf16(gs[r] + bf16_to_f32(B[2 * j])));
                    float u = bf16_to_f32(f32_to_bf16(us[r] + bf16_to_f32(B[2 * j + 1])));
                    g = fminf(g, limit) * alpha;
                    u = fminf(fmaxf(u, -limit), limit) + 1.0f;
                    float silu = g / (1.0f + expf(-g));
                    act[(size_t)p * I + j] = f32_to_bf16(u * silu * (bf16_to_f32(w[p]) / alpha));
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
        float acc[ROWS * 64]; /* [T <= 64][ROWS] */
        float *heap_acc = T > 64 ? calloc((size_t)T * ROWS, sizeof(float)) : NULL;
        float *a = heap_acc ? heap_acc : acc;
        if (!heap_acc) memset(acc, 0, sizeof(float) * (size_t)T * ROWS);
        for (int e = 0; e < E; e++) {
            if (start[e] == start[e + 1]) continue;
            for (int h = h0; h < h1; h++) {
                const uint16_t *row = down + ((size_t)e * H + h) * I;
                if (h + AHEAD < h1) prefetch_row(row + (size_t)AHEAD * I, I);
                float bias = bf16_to_f32(down_bias[(size_t)e * H + h]);
                for (int q0 = start[e]; q0 < start[e + 1]; q0 += 4) {
                    int n = start[e + 1] - q0 < 4 ? start[e + 1] - q0 : 4;
                    const uint16_t *as[4];
                    for (int r = 0; r < 4; r++) as[r] = act + (size_t)order[q0 + (r < n ? r : 0)] * I;
                    float d[4];
                    dot_bf16_x4(row, as, I, d);
                    for (int r = 0; r < n; r++) {
                        int p = order[q0 + r];
                        a[(p / K) * ROWS + (h - h0)] += d[r] + bf16_to_f32(w[p]) * bias;
                    }
                }
            }
        }
        for (int t = 0; t < T; t++)
            for (int h = h0; h < h1; h++) out[(size_t)t * H + h] = f32_to_bf16(a[t * ROWS + (h - h0)]);
        free(heap_acc);
    }
    free(start); free(order); free(act);
    return 0;
}
