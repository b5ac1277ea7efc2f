// SelfExtend attention (Jin et al., "LLM Maybe LongLM", ICML 2024), fused for CUDA:
// flash-style, one f32 online softmax over neighbor and grouped scores.
//
// Queries and keys arrive already rotated, in `sets` copies: set 0 at their neighbor
// positions, set 1 (when sets == 2) at their grouped positions. A query at absolute
// position i scores key j <= i with set 1 when i - j >= window, else with set 0.
//
// A block owns ROWS query rows of one (batch, head) and streams the keys they can see
// through shared memory, BK at a time, loading only the sets some pair in the tile
// needs. LANES adjacent threads share a row: lane l holds dimensions l, l + LANES, ...
// of the query and of the running output, so a row costs 3·D/LANES registers instead
// of 3·D, and the lanes of a row read consecutive shared-memory words. Dot products
// are summed across a row's lanes with warp shuffles.

#include <math_constants.h>

constexpr int LANES = 8;
constexpr int ROWS = 32;
constexpr int THREADS = ROWS * LANES;

template <int D, int BK>
__device__ __forceinline__ void attend(
    const float* __restrict__ q,    // (sets, batch, heads, q_len, D)
    const float* __restrict__ k,    // (sets, batch, kv_heads, kv_len, D)
    const float* __restrict__ v,    // (batch, kv_heads, kv_len, D)
    float* __restrict__ out,        // (batch, heads, q_len, D)
    int batch, int heads, int kv_heads, int q_len, int kv_len, int sets, int window,
    float scale) {
  static_assert(D % LANES == 0, "head_dim must be a multiple of LANES");
  constexpr int PER = D / LANES;
  __shared__ float kn[BK][D];
  __shared__ float kg[BK][D];
  __shared__ float vs[BK][D];

  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int lane = threadIdx.x % LANES;
  const int t = blockIdx.x * ROWS + threadIdx.x / LANES;
  const int kvh = h / (heads / kv_heads);
  const bool active = t < q_len;
  const bool two_sets = sets == 2;
  const int offset = kv_len - q_len;
  const int i = offset + t;
  const int block_first = offset + blockIdx.x * ROWS;
  const int block_last = offset + min(q_len, (int)(blockIdx.x + 1) * ROWS) - 1;

  const size_t q_set = (size_t)batch * heads * q_len * D;
  const size_t k_set = (size_t)batch * kv_heads * kv_len * D;
  const size_t q_row = (((size_t)b * heads + h) * q_len + (active ? t : 0)) * D;
  const size_t kv_base = ((size_t)b * kv_heads + kvh) * kv_len * D;

  float qn[PER], qg[PER], acc[PER];
#pragma unroll
  for (int c = 0; c < PER; ++c) {
    const int d = lane + c * LANES;
    qn[c] = active ? q[q_row + d] * scale : 0.f;
    qg[c] = (active && two_sets) ? q[q_set + q_row + d] * scale : 0.f;
    acc[c] = 0.f;
  }
  float m = -CUDART_INF_F;
  float l = 0.f;

  for (int j0 = 0; j0 <= block_last; j0 += BK) {
    const int j1 = min(j0 + BK - 1, block_last);
    // Block-uniform: does any visible pair (i, j) of this tile need either set? The
    // nearest pair is at distance block_first - j1 (or 0 on the diagonal), the
    // farthest at block_last - j0.
    const bool need_n = !two_sets || block_first - j1 < window;
    const bool need_g = two_sets && block_last - j0 >= window;
    for (int idx = threadIdx.x; idx < BK * D; idx += THREADS) {
      const int r = idx / D, d = idx % D, j = j0 + r;
      const bool in = j <= j1;
      const size_t at = kv_base + (size_t)j * D + d;
      if (need_n) kn[r][d] = in ? k[at] : 0.f;
      if (need_g) kg[r][d] = in ? k[k_set + at] : 0.f;
      vs[r][d] = in ? v[at] : 0.f;
    }
    __syncthreads();

    // Every thread runs the same loop, masked rather than branched around, because
    // the shuffles need all 32 lanes of the warp.
    float s[BK];
    float tile_max = -CUDART_INF_F;
#pragma unroll
    for (int r = 0; r < BK; ++r) {
      const int j = j0 + r;
      float part = 0.f;
      if (two_sets && i - j >= window) {
#pragma unroll
        for (int c = 0; c < PER; ++c) part = fmaf(qg[c], kg[r][lane + c * LANES], part);
      } else {
#pragma unroll
        for (int c = 0; c < PER; ++c) part = fmaf(qn[c], kn[r][lane + c * LANES], part);
      }
#pragma unroll
      for (int o = LANES / 2; o > 0; o /= 2) part += __shfl_xor_sync(0xffffffffu, part, o, LANES);
      s[r] = (active && j <= i) ? part : -CUDART_INF_F;
      tile_max = fmaxf(tile_max, s[r]);
    }
    // Rows past q_len, and rows whose keys all lie ahead, see only -inf here; they
    // must not turn their state into NaN.
    const float m_new = fmaxf(m, tile_max);
    const float correction = m_new == -CUDART_INF_F ? 1.f : expf(m - m_new);
    l *= correction;
#pragma unroll
    for (int c = 0; c < PER; ++c) acc[c] *= correction;
#pragma unroll
    for (int r = 0; r < BK; ++r) {
      const float p = s[r] == -CUDART_INF_F ? 0.f : expf(s[r] - m_new);
      l += p;
#pragma unroll
      for (int c = 0; c < PER; ++c) acc[c] = fmaf(p, vs[r][lane + c * LANES], acc[c]);
    }
    m = m_new;
    __syncthreads();
  }
  if (active) {
    const float inv = 1.f / l;
    float* o = out + (((size_t)b * heads + h) * q_len + t) * D;
#pragma unroll
    for (int c = 0; c < PER; ++c) o[lane + c * LANES] = acc[c] * inv;
  }
}

// Three BK x D f32 tiles must fit the 48 KiB of static shared memory.
#define SELFEXTEND_KERNEL(D, BK)                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS) selfextend_attention_d##D(       \
      const float* q, const float* k, const float* v, float* out, int batch, int heads,   \
      int kv_heads, int q_len, int kv_len, int sets, int window, float scale) {           \
    attend<D, BK>(q, k, v, out, batch, heads, kv_heads, q_len, kv_len, sets, window,     \
                  scale);                                                                \
  }

SELFEXTEND_KERNEL(16, 32)
SELFEXTEND_KERNEL(24, 32)
SELFEXTEND_KERNEL(32, 32)
SELFEXTEND_KERNEL(48, 32)
SELFEXTEND_KERNEL(64, 32)
SELFEXTEND_KERNEL(80, 32)
SELFEXTEND_KERNEL(96, 32)
SELFEXTEND_KERNEL(128, 16)
