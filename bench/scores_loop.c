// The prefill scores loop's instruction mix on its own, on data in L1: four query rows
// against a transposed 64-key tile, 16 keys at a time, eight accumulators, two key
// loads and four broadcasts per eight FMAs (what `perf annotate` shows the fused
// kernel's `scores_block::<4>` compiles to). One thread; prints GFLOP/s per round, to
// set beside `selfextend-bench --machine`'s FMA peak. Not part of any build or test.
//
//   gcc -O2 -mavx2 -mfma bench/scores_loop.c -o /tmp/scores_loop && /tmp/scores_loop
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

enum { D = 64, K_TILE = 64, B = 16, ROUNDS = 4, TILES = 100000 };

static float kt[D * K_TILE] __attribute__((aligned(64)));
static float q[4 * D] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    for (int i = 0; i < D * K_TILE; i++) kt[i] = i * 1e-6f;
    for (int i = 0; i < 4 * D; i++) q[i] = i * 1e-3f;
    float sink = 0;
    for (int round = 0; round < ROUNDS; round++) {
        double start = now();
        for (long tile = 0; tile < TILES; tile++) {
            for (int jb = 0; jb < K_TILE / B; jb++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                       a6 = a0, a7 = a0;
                for (int c = 0; c < D; c++) {
                    const float *k = kt + c * K_TILE + jb * B;
                    __m256 k0 = _mm256_load_ps(k), k1 = _mm256_load_ps(k + 8);
                    __m256 x = _mm256_broadcast_ss(q + c);
                    a0 = _mm256_fmadd_ps(x, k0, a0), a1 = _mm256_fmadd_ps(x, k1, a1);
                    x = _mm256_broadcast_ss(q + D + c);
                    a2 = _mm256_fmadd_ps(x, k0, a2), a3 = _mm256_fmadd_ps(x, k1, a3);
                    x = _mm256_broadcast_ss(q + 2 * D + c);
                    a4 = _mm256_fmadd_ps(x, k0, a4), a5 = _mm256_fmadd_ps(x, k1, a5);
                    x = _mm256_broadcast_ss(q + 3 * D + c);
                    a6 = _mm256_fmadd_ps(x, k0, a6), a7 = _mm256_fmadd_ps(x, k1, a7);
                }
                __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                         _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
                sink += s[0];
            }
        }
        double flops = (double)TILES * (K_TILE / B) * D * 8 * 16;
        printf("round %d: %.1f GFLOP/s\n", round + 1, flops / (now() - start) / 1e9);
    }
    return sink == 0.12345f;  // keeps the loop from being optimised away
}
