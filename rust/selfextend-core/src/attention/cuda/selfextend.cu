// SelfExtend attention (Jin et al., "LLM Maybe LongLM", ICML 2024), fused for CUDA:
// flash-style, one f32 online softmax over neighbor and grouped scores.
//
// Queries and keys arrive already rotated, in `sets` copies: set 0 at their neighbor
// positions, set 1 (when sets == 2) at their grouped positions. A query at absolute
// position i scores key j <= i with set 0 when i - j < window, else with set 1.
//
// One thread owns one query row; a block of BQ rows streams the keys it can see through
// shared memory, BK at a time, and keeps the running max, sum and output in registers.

#include <math_constants.h>

template <int D, int BQ, int BK>
__device__ __forceinline__ void attend(
    const float* __restrict__ q,    // (sets, batch, heads, q_len, D)
    const float* __restrict__ k,    // (sets, batch, kv_heads, kv_len, D)
    const float* __restrict__ v,    // (batch, kv_heads, kv_len, D)
    float* __restrict__ out,        // (batch, heads, q_len, D)
    int batch, int heads, int kv_heads, int q_len, int kv_len, int sets, int window,
    float scale) {
  __shared__ float kn[BK][D];
  __shared__ float kg[BK][D];
  __shared__ float vs[BK][D];

  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int t = blockIdx.x * BQ + threadIdx.x;
  const int kvh = h / (heads / kv_heads);
  const bool active = t < q_len;
  const int i = kv_len - q_len + t;
  const int block_last = kv_len - q_len + min(q_len, (int)(blockIdx.x + 1) * BQ) - 1;

  const size_t q_set = (size_t)batch * heads * q_len * D;
  const size_t k_set = (size_t)batch * kv_heads * kv_len * D;
  const size_t q_row = (((size_t)b * heads + h) * q_len + (active ? t : 0)) * D;
  const size_t kv_base = ((size_t)b * kv_heads + kvh) * kv_len * D;

  float qn[D], qg[D], acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qn[d] = active ? q[q_row + d] * scale : 0.f;
    qg[d] = (active && sets == 2) ? q[q_set + q_row + d] * scale : 0.f;
    acc[d] = 0.f;
  }
  float m = -CUDART_INF_F;
  float l = 0.f;

  for (int j0 = 0; j0 <= block_last; j0 += BK) {
    for (int idx = threadIdx.x; idx < BK * D; idx += BQ) {
      const int r = idx / D, d = idx % D, j = j0 + r;
      const bool in = j <= block_last;
      const size_t at = kv_base + (size_t)j * D + d;
      kn[r][d] = in ? k[at] : 0.f;
      kg[r][d] = (in && sets == 2) ? k[k_set + at] : 0.f;
      vs[r][d] = in ? v[at] : 0.f;
    }
    __syncthreads();
    if (active && j0 <= i) {
      float s[BK];
      float tile_max = -CUDART_INF_F;
#pragma unroll
      for (int r = 0; r < BK; ++r) {
        const int j = j0 + r;
        float dot = 0.f;
        if (sets == 2 && i - j >= window) {
#pragma unroll
          for (int d = 0; d < D; ++d) dot = fmaf(qg[d], kg[r][d], dot);
        } else {
#pragma unroll
          for (int d = 0; d < D; ++d) dot = fmaf(qn[d], kn[r][d], dot);
        }
        s[r] = j <= i ? dot : -CUDART_INF_F;
        tile_max = fmaxf(tile_max, s[r]);
      }
      const float m_new = fmaxf(m, tile_max);
      const float correction = expf(m - m_new);
      l *= correction;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] *= correction;
#pragma unroll
      for (int r = 0; r < BK; ++r) {
        const float p = expf(s[r] - m_new);
        l += p;
#pragma unroll
        for (int d = 0; d < D; ++d) acc[d] = fmaf(p, vs[r][d], acc[d]);
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (active) {
    const float inv = 1.f / l;
    float* o = out + (((size_t)b * heads + h) * q_len + t) * D;
#pragma unroll
    for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
  }
}

#define SELFEXTEND_KERNEL(D, BK)                                                          \
  extern "C" __global__ void __launch_bounds__(64) selfextend_attention_d##D(            \
      const float* q, const float* k, const float* v, float* out, int batch, int heads,   \
      int kv_heads, int q_len, int kv_len, int sets, int window, float scale) {           \
    attend<D, 64, BK>(q, k, v, out, batch, heads, kv_heads, q_len, kv_len, sets, window, \
                      scale);                                                            \
  }

SELFEXTEND_KERNEL(32, 32)
SELFEXTEND_KERNEL(64, 32)
SELFEXTEND_KERNEL(80, 16)
SELFEXTEND_KERNEL(96, 16)
SELFEXTEND_KERNEL(128, 16)
