// CUDA kernels of the logits ops: token entropy (Tsallis / Shannon) and the inverted hinge
// loss, forward and backward. One block per row; each thread folds its strided share of
// the row into online softmax statistics (softmax_stats.h), the block merges them with
// warp shuffles. Loads are coalesced across the block, math is float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <float.h>
#include <stdint.h>

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

// Folds one logit into the thread's statistics (-inf contributes nothing).
__device__ __forceinline__ void add_logit(Stats& st, float x, bool shannon, float q) {
  if (x == -INFINITY) return;
  st.rescale(x, shannon, q);  // no-op unless x is a new max
  const float d = x - st.m;
  const float e = expf(d);
  st.s += e;
  st.w += shannon ? e * d : expf(q * d);
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
__device__ __forceinline__ bool beats(float v, int64_t i, float value, int64_t index) {
  return v > value || (v == value && i >= 0 && (index < 0 || i < index));
}

// (value, index) of the largest value over the block, the smallest index among ties;
// index -1 if all are -inf. Every thread gets the result.
__device__ void block_argmax(float& value, int64_t& index) {
  __shared__ float warp_value[kWarps];
  __shared__ int64_t warp_index[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, value, offset);
    const int64_t i = __shfl_xor_sync(kFullMask, index, offset);
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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) entropy_forward_kernel(const scalar_t* __restrict__ logits, int64_t V,
                                                                   int64_t row_stride, float q, bool shannon,
                                                                   float* __restrict__ entropy,
                                                                   float* __restrict__ row_max,
                                                                   float* __restrict__ log_sum,
                                                                   float* __restrict__ power_sum) {
  const scalar_t* z = logits + blockIdx.x * row_stride;
  Stats st = Stats::empty();
  for (int64_t j = threadIdx.x; j < V; j += kThreads) add_logit(st, to_float(z[j]), shannon, q);
  st = block_merge(st, shannon, q);
  if (threadIdx.x == 0) {
    entropy[blockIdx.x] = st.entropy(shannon, q);
    row_max[blockIdx.x] = st.m;
    log_sum[blockIdx.x] = st.log_sum();
    power_sum[blockIdx.x] = st.power_sum(shannon, q);
  }
}

// Tsallis: dS/dz_j = -q/(q-1) (p_j^q - p_j P_q), P_q saved by the forward;
// Shannon: dH/dz_j = -p_j (log p_j + H); p_j = e^{(z_j - m) - log s} (z - m exact, see
// softmax_stats.h); times grad_entropy.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    entropy_backward_kernel(const float* __restrict__ grad_entropy, const scalar_t* __restrict__ logits, int64_t V,
                            int64_t row_stride, const float* __restrict__ entropy,
                            const float* __restrict__ row_max, const float* __restrict__ log_sum,
                            const float* __restrict__ power_sum, float q, bool shannon,
                            scalar_t* __restrict__ grad_logits) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * row_stride;
  scalar_t* out = grad_logits + row * V;
  const float g = grad_entropy[row], s = entropy[row], m = row_max[row], log_s = log_sum[row];
  const float scale = shannon ? -g : -g * q / (q - 1.0f);
  const float offset = shannon ? s : power_sum[row];
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float d = (to_float(z[j]) - m) - log_s;
    const float p = expf(d);  // 0 for -inf logits
    const float value = shannon ? scale * p * (fmaxf(d, -FLT_MAX) + offset) : scale * (expf(q * d) - p * offset);
    out[j] = from_float<scalar_t>(value);
  }
}

__device__ __forceinline__ bool label_ok(int64_t label, int64_t V) { return label >= 0 && label < V; }

// One read of the row: its softmax statistics and v* = first argmax_{v != y} z_v, which
// the backward reuses.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ihl_forward_kernel(const scalar_t* __restrict__ logits, int64_t V, int64_t row_stride,
                       const int64_t* __restrict__ labels, float q, bool shannon, float threshold,
                       float high_entropy_weight, int64_t ignore_index, float* __restrict__ loss,
                       float* __restrict__ entropy, float* __restrict__ weight, float* __restrict__ row_max,
                       float* __restrict__ log_sum, int32_t* __restrict__ runner_up) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * row_stride;
  const int64_t label = labels[row];
  Stats st = Stats::empty();
  float best = -INFINITY;  // max_{v != y} z_v
  int64_t other = -1;      // its first index
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float x = to_float(z[j]);
    add_logit(st, x, shannon, q);
    if (j != label && x > best) {  // strict: a thread's first index wins ties
      best = x;
      other = j;
    }
  }
  st = block_merge(st, shannon, q);
  block_argmax(best, other);
  if (threadIdx.x != 0) return;
  const float s = st.entropy(shannon, q);
  entropy[row] = s;
  row_max[row] = st.m;
  log_sum[row] = st.log_sum();
  runner_up[row] = label == ignore_index ? -1 : static_cast<int32_t>(other);  // V < 2^31
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
  const float p_y = expf((to_float(z[label]) - m) - log_s);
  const float p_other = other >= 0 ? expf((to_float(z[other]) - m) - log_s) : 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float p = expf((to_float(z[j]) - m) - log_s);
    const float value = g * (p_y * ((j == label ? 1.0f : 0.0f) - p) - p_other * ((j == other ? 1.0f : 0.0f) - p));
    out[j] = from_float<scalar_t>(value);
  }
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
    entropy_forward_kernel<scalar_t><<<T, kThreads, 0, stream>>>(static_cast<const scalar_t*>(logits), V, row_stride,
                                                                 static_cast<float>(q), alter::use_shannon(q), entropy,
                                                                 row_max, log_sum, power_sum);
  });
}

extern "C" cudaError_t alter_entropy_backward_cuda(const float* grad_entropy, const void* logits, alter_dtype dtype,
                                                   int64_t T, int64_t V, int64_t row_stride, const float* entropy,
                                                   const float* row_max, const float* log_sum,
                                                   const float* power_sum, double q, void* grad_logits,
                                                   cudaStream_t stream) {
  return dispatch(dtype, T, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    entropy_backward_kernel<scalar_t><<<T, kThreads, 0, stream>>>(
        grad_entropy, static_cast<const scalar_t*>(logits), V, row_stride, entropy, row_max, log_sum, power_sum,
        static_cast<float>(q), alter::use_shannon(q), static_cast<scalar_t*>(grad_logits));
  });
}

extern "C" cudaError_t alter_ihl_forward_cuda(const void* logits, alter_dtype dtype, int64_t T, int64_t V,
                                              int64_t row_stride, const int64_t* labels, double q, double threshold,
                                              double high_entropy_weight, int64_t ignore_index, float* loss,
                                              float* entropy, float* weight, float* row_max, float* log_sum,
                                              int32_t* runner_up, cudaStream_t stream) {
  return dispatch(dtype, T, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    ihl_forward_kernel<scalar_t><<<T, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), V, row_stride, labels, static_cast<float>(q), alter::use_shannon(q),
        static_cast<float>(threshold), static_cast<float>(high_entropy_weight), ignore_index, loss, entropy, weight,
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
