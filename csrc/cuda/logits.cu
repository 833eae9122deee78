// CUDA kernels of the logits ops: token entropy (Tsallis / Shannon) and the inverted hinge
// loss, forward and backward. One block per row. Each thread walks its share of the row
// in 16-byte vectors (8 bf16/fp16 or 4 fp32 logits; two loads in flight per thread),
// between a scalar head up to the first 16-byte boundary and a scalar tail, and folds
// them into online softmax statistics (softmax_stats.h) branch-free: one rescale per
// vector, then one exp per logit. The block merges the threads' statistics with warp
// shuffles. Math is float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <float.h>
#include <stdint.h>

#include <type_traits>

#include "../softmax_stats.h"
#include "launchers.h"

namespace {

using Stats = alter::SoftmaxStats<float>;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Number of floats in a float[N] group of logits.
template <typename Group>
__host__ __device__ constexpr int group_size() { return static_cast<int>(std::extent<std::remove_reference_t<Group>>::value); }

// x[0..N) = p[0..N) as float: one 16-byte load when N elements are 16 bytes (p aligned).
template <typename scalar_t, int N>
__device__ __forceinline__ void load_group(const scalar_t* p, float (&x)[N]) {
  if constexpr (N * sizeof(scalar_t) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const scalar_t* v = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = to_float(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = to_float(p[i]);
  }
}

// p[0..N) = y[0..N) rounded to scalar_t: one 16-byte store when N elements are 16 bytes.
template <typename scalar_t, int N>
__device__ __forceinline__ void store_group(scalar_t* p, const float (&y)[N]) {
  if constexpr (N * sizeof(scalar_t) == 16) {
    uint4 raw;
    scalar_t* v = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = from_float<scalar_t>(y[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<scalar_t>(y[i]);
  }
}

// Calls f(j, x) for the block's row z of V logits, each column once, x a float[N] group
// of the logits at columns j..j+N: a scalar head (N = 1) up to z's first 16-byte
// boundary, 16-byte groups, two per thread per iteration, then a scalar tail. ``out``
// (the row f writes with store_group, or nullptr) must share z's 16-byte alignment for
// the groups; a row where it does not runs scalar.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_group(const scalar_t* z, const scalar_t* out, int64_t V, F&& f) {
  constexpr int N = 16 / sizeof(scalar_t);
  const uintptr_t address = reinterpret_cast<uintptr_t>(z);
  const bool together = out == nullptr || ((address ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
  int64_t head = together ? static_cast<int64_t>(((16u - (address & 15u)) & 15u) / sizeof(scalar_t)) : V;
  head = head < V ? head : V;
  const int64_t groups = (V - head) / N, tail = head + groups * N;
  for (int64_t j = threadIdx.x; j < head; j += kThreads) {
    float x[1];
    load_group(z + j, x);
    f(j, x);
  }
  int64_t g = threadIdx.x;
  for (; g + kThreads < groups; g += 2 * kThreads) {  // branch-free body, two loads in flight
    const int64_t ja = head + g * N, jb = ja + static_cast<int64_t>(kThreads) * N;
    float a[N], b[N];
    load_group(z + ja, a);
    load_group(z + jb, b);
    f(ja, a);
    f(jb, b);
  }
  if (g < groups) {
    float a[N];
    load_group(z + head + g * N, a);
    f(head + g * N, a);
  }
  for (int64_t j = tail + threadIdx.x; j < V; j += kThreads) {
    float x[1];
    load_group(z + j, x);
    f(j, x);
  }
}

// Folds a group of logits (-inf contributes nothing) into the thread's statistics without
// branches: one rescale to the group's new max (a factor 1 when it is not larger), then one
// exp per logit. While every logit so far is -inf, m = -inf and s = w = 0 stay so.
template <bool kShannon, int N>
__device__ __forceinline__ void add_group(Stats& st, const float (&x)[N], float q) {
  float group_max = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) group_max = fmaxf(group_max, x[i]);
  const float m = fmaxf(st.m, group_max);
  const float shift = m == -INFINITY ? 0.0f : m;  // -inf - (-inf) would be nan
  const float d = st.m - shift;                   // 0 once the max is found; -inf while st.m is -inf
  const float scale = __expf(d);
  st.w = kShannon ? scale * (st.w + (st.s > 0.0f ? d * st.s : 0.0f)) : __expf(q * d) * st.w;
  st.s *= scale;
  st.m = m;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float xi = x[i] - shift;  // exact: see softmax_stats.h
    const float e = __expf(xi);     // 0 for -inf
    st.s += e;
    st.w += kShannon ? e * fmaxf(xi, -FLT_MAX) : __expf(q * xi);  // 0·(-inf) would be nan
  }
}

// Merges the statistics of every thread of the block; every thread gets the result.
__device__ Stats block_merge(Stats st, bool shannon, float q) {
  __shared__ Stats warp_stats[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Stats other{__shfl_xor_sync(kFullMask, st.m, offset), __shfl_xor_sync(kFullMask, st.s, offset),
                      __shfl_xor_sync(kFullMask, st.w, offset)};
    st.merge(other, shannon, q);
  }
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  st = warp_stats[0];
  for (int w = 1; w < kWarps; ++w) st.merge(warp_stats[w], shannon, q);
  __syncthreads();  // warp_stats may be reused by the caller's next reduction
  return st;
}

// Whether (v, i) beats (value, index) in an argmax: a larger value, or an equal one at a
// smaller index; index -1 (nothing found yet) loses to any index.
__device__ __forceinline__ bool beats(float v, int32_t i, float value, int32_t index) {
  return v > value || (v == value && i >= 0 && (index < 0 || i < index));
}

// (value, index) of the largest value over the block, the smallest index among ties;
// index -1 if all are -inf. Every thread gets the result.
__device__ void block_argmax(float& value, int32_t& index) {
  __shared__ float warp_value[kWarps];
  __shared__ int32_t warp_index[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, value, offset);
    const int32_t i = __shfl_xor_sync(kFullMask, index, offset);
    if (beats(v, i, value, index)) {
      value = v;
      index = i;
    }
  }
  if (lane == 0) {
    warp_value[warp] = value;
    warp_index[warp] = index;
  }
  __syncthreads();
  value = warp_value[0];
  index = warp_index[0];
  for (int w = 1; w < kWarps; ++w) {
    if (beats(warp_value[w], warp_index[w], value, index)) {
      value = warp_value[w];
      index = warp_index[w];
    }
  }
  __syncthreads();
}

template <typename scalar_t, bool kShannon>
__global__ void __launch_bounds__(kThreads) entropy_forward_kernel(const scalar_t* __restrict__ logits, int64_t V,
                                                                   int64_t row_stride, float q,
                                                                   float* __restrict__ entropy,
                                                                   float* __restrict__ row_max,
                                                                   float* __restrict__ log_sum,
                                                                   float* __restrict__ power_sum) {
  const scalar_t* z = logits + blockIdx.x * row_stride;
  Stats st = Stats::empty();
  for_each_group(z, static_cast<const scalar_t*>(nullptr), V, [&](int64_t, const auto& x) { add_group<kShannon>(st, x, q); });
  st = block_merge(st, kShannon, q);
  if (threadIdx.x == 0) {
    entropy[blockIdx.x] = st.entropy(kShannon, q);
    row_max[blockIdx.x] = st.m;
    log_sum[blockIdx.x] = st.log_sum();
    power_sum[blockIdx.x] = st.power_sum(kShannon, q);
  }
}

// Tsallis: dS/dz_j = -q/(q-1) (p_j^q - p_j P_q), P_q saved by the forward;
// Shannon: dH/dz_j = -p_j (log p_j + H); p_j = e^{(z_j - m) - log s} (z - m exact, see
// softmax_stats.h); times grad_entropy.
template <typename scalar_t, bool kShannon>
__global__ void __launch_bounds__(kThreads)
    entropy_backward_kernel(const float* __restrict__ grad_entropy, const scalar_t* __restrict__ logits, int64_t V,
                            int64_t row_stride, const float* __restrict__ entropy,
                            const float* __restrict__ row_max, const float* __restrict__ log_sum,
                            const float* __restrict__ power_sum, float q, scalar_t* __restrict__ grad_logits) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * row_stride;
  scalar_t* out = grad_logits + row * V;
  const float g = grad_entropy[row], s = entropy[row], m = row_max[row], log_s = log_sum[row];
  const float scale = kShannon ? -g : -g * q / (q - 1.0f);
  const float offset = kShannon ? s : power_sum[row];
  for_each_group(z, out, V, [&](int64_t j, const auto& x) {
    constexpr int n = group_size<decltype(x)>();
    float y[n];
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const float d = (x[i] - m) - log_s;
      const float p = __expf(d);  // 0 for -inf logits
      y[i] = kShannon ? scale * p * (fmaxf(d, -FLT_MAX) + offset) : scale * (__expf(q * d) - p * offset);
    }
    store_group(out + j, y);
  });
}

__device__ __forceinline__ bool label_ok(int64_t label, int64_t V) { return label >= 0 && label < V; }

// One read of the row: its softmax statistics and v* = first argmax_{v != y} z_v, which
// the backward reuses. Columns and labels compare in int32 (V < 2^31, as runner_up).
template <typename scalar_t, bool kShannon>
__global__ void __launch_bounds__(kThreads)
    ihl_forward_kernel(const scalar_t* __restrict__ logits, int64_t V, int64_t row_stride,
                       const int64_t* __restrict__ labels, float q, float threshold, float high_entropy_weight,
                       int64_t ignore_index, float* __restrict__ loss, float* __restrict__ entropy,
                       float* __restrict__ weight, float* __restrict__ row_max, float* __restrict__ log_sum,
                       int32_t* __restrict__ runner_up) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * row_stride;
  const int64_t label = labels[row];
  const int32_t excluded = label_ok(label, V) ? static_cast<int32_t>(label) : -1;
  Stats st = Stats::empty();
  float best = -INFINITY;  // max_{v != y} z_v
  int32_t other = -1;      // its first index
  for_each_group(z, static_cast<const scalar_t*>(nullptr), V, [&](int64_t j, const auto& x) {
    add_group<kShannon>(st, x, q);
#pragma unroll
    for (int i = 0; i < group_size<decltype(x)>(); ++i) {
      const int32_t column = static_cast<int32_t>(j) + i;
      const bool take = (column != excluded) & (x[i] > best);  // strict: a thread's first index wins ties
      best = take ? x[i] : best;
      other = take ? column : other;
    }
  });
  st = block_merge(st, kShannon, q);
  block_argmax(best, other);
  if (threadIdx.x != 0) return;
  const float s = st.entropy(kShannon, q);
  entropy[row] = s;
  row_max[row] = st.m;
  log_sum[row] = st.log_sum();
  runner_up[row] = label == ignore_index ? -1 : other;
  if (label == ignore_index) {
    loss[row] = 0.0f;
    weight[row] = 0.0f;
  } else if (!label_ok(label, V)) {
    loss[row] = NAN;
    weight[row] = NAN;
  } else {
    const float p_y = st.prob(to_float(z[label]));
    const float p_other = st.prob(best);  // 0 when there is no v*
    loss[row] = 1.0f + p_y - p_other;
    weight[row] = s > threshold ? high_entropy_weight : 1.0f;
  }
}

// dL/dz_j = g (p_y (δ_jy - p_j) - p_v* (δ_jv* - p_j)), with v* from the forward: one read
// of the row and one write of its gradient.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ihl_backward_kernel(const float* __restrict__ grad_loss, const scalar_t* __restrict__ logits, int64_t V,
                        int64_t row_stride, const int64_t* __restrict__ labels,
                        const float* __restrict__ row_max, const float* __restrict__ log_sum,
                        const int32_t* __restrict__ runner_up, int64_t ignore_index,
                        scalar_t* __restrict__ grad_logits) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * row_stride;
  scalar_t* out = grad_logits + row * V;
  const int64_t label = labels[row], other = runner_up[row];
  if (label == ignore_index || !label_ok(label, V) || other < -1 || other >= V) {
    const scalar_t fill = from_float<scalar_t>(label == ignore_index ? 0.0f : NAN);
    for (int64_t j = threadIdx.x; j < V; j += kThreads) out[j] = fill;
    return;
  }
  const float g = grad_loss[row], m = row_max[row], log_s = log_sum[row];
  const float p_y = __expf((to_float(z[label]) - m) - log_s);
  const float p_other = other >= 0 ? __expf((to_float(z[other]) - m) - log_s) : 0.0f;
  const int32_t y = static_cast<int32_t>(label), v = static_cast<int32_t>(other);
  for_each_group(z, out, V, [&](int64_t j, const auto& x) {
    constexpr int n = group_size<decltype(x)>();
    float d[n];
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const int32_t column = static_cast<int32_t>(j) + i;
      const float p = __expf((x[i] - m) - log_s);
      d[i] = g * (p_y * ((column == y ? 1.0f : 0.0f) - p) - p_other * ((column == v ? 1.0f : 0.0f) - p));
    }
    store_group(out + j, d);
  });
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<scalar_t>{}) for the element type of dtype and returns the launch's
// error. T == 0 launches nothing (a grid of 0 blocks is an error).
template <typename Launch>
cudaError_t dispatch(alter_dtype dtype, int64_t T, const Launch& launch) {
  if (T == 0) return cudaSuccess;
  switch (dtype) {
    case ALTER_FLOAT32: launch(TypeTag<float>{}); break;
    case ALTER_FLOAT16: launch(TypeTag<__half>{}); break;
    case ALTER_BFLOAT16: launch(TypeTag<__nv_bfloat16>{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t alter_entropy_forward_cuda(const void* logits, alter_dtype dtype, int64_t T, int64_t V,
                                                  int64_t row_stride, double q, float* entropy, float* row_max,
                                                  float* log_sum, float* power_sum, cudaStream_t stream) {
  return dispatch(dtype, T, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    auto kernel = alter::use_shannon(q) ? entropy_forward_kernel<scalar_t, true> : entropy_forward_kernel<scalar_t, false>;
    kernel<<<T, kThreads, 0, stream>>>(static_cast<const scalar_t*>(logits), V, row_stride, static_cast<float>(q),
                                       entropy, row_max, log_sum, power_sum);
  });
}

extern "C" cudaError_t alter_entropy_backward_cuda(const float* grad_entropy, const void* logits, alter_dtype dtype,
                                                   int64_t T, int64_t V, int64_t row_stride, const float* entropy,
                                                   const float* row_max, const float* log_sum,
                                                   const float* power_sum, double q, void* grad_logits,
                                                   cudaStream_t stream) {
  return dispatch(dtype, T, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    auto kernel = alter::use_shannon(q) ? entropy_backward_kernel<scalar_t, true> : entropy_backward_kernel<scalar_t, false>;
    kernel<<<T, kThreads, 0, stream>>>(grad_entropy, static_cast<const scalar_t*>(logits), V, row_stride, entropy,
                                       row_max, log_sum, power_sum, static_cast<float>(q),
                                       static_cast<scalar_t*>(grad_logits));
  });
}

extern "C" cudaError_t alter_ihl_forward_cuda(const void* logits, alter_dtype dtype, int64_t T, int64_t V,
                                              int64_t row_stride, const int64_t* labels, double q, double threshold,
                                              double high_entropy_weight, int64_t ignore_index, float* loss,
                                              float* entropy, float* weight, float* row_max, float* log_sum,
                                              int32_t* runner_up, cudaStream_t stream) {
  return dispatch(dtype, T, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    auto kernel = alter::use_shannon(q) ? ihl_forward_kernel<scalar_t, true> : ihl_forward_kernel<scalar_t, false>;
    kernel<<<T, kThreads, 0, stream>>>(static_cast<const scalar_t*>(logits), V, row_stride, labels,
                                       static_cast<float>(q), static_cast<float>(threshold),
                                       static_cast<float>(high_entropy_weight), ignore_index, loss, entropy, weight,
                                       row_max, log_sum, runner_up);
  });
}

extern "C" cudaError_t alter_ihl_backward_cuda(const float* grad_loss, const void* logits, alter_dtype dtype,
                                               int64_t T, int64_t V, int64_t row_stride, const int64_t* labels,
                                               const float* row_max, const float* log_sum, const int32_t* runner_up,
                                               int64_t ignore_index, void* grad_logits, cudaStream_t stream) {
  return dispatch(dtype, T, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    ihl_backward_kernel<scalar_t><<<T, kThreads, 0, stream>>>(grad_loss, static_cast<const scalar_t*>(logits), V,
                                                              row_stride, labels, row_max, log_sum, runner_up,
                                                              ignore_index, static_cast<scalar_t*>(grad_logits));
  });
}
