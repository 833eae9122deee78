// CPU kernels of the logits ops: token entropy (Tsallis / Shannon) and the inverted hinge
// loss (IHL), forward and backward. Rows run in parallel (OpenMP, through at::parallel_for).
//
// Each row is read in chunks of kChunk logits converted to float; a chunk stays in L1
// between its max and its exponential sums, so the forward reads the row from memory once
// (online softmax at chunk granularity, see softmax_stats.h). Inner loops are branch-free
// `omp simd` loops over float chunks so that they vectorize (setup.py passes
// -fno-trapping-math so the selects in them if-convert); the running sums are kept in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "op_checks.h"
#include "softmax_stats.h"

namespace alter {
namespace {

using at::Tensor;
using Stats = SoftmaxStats<double>;

constexpr int64_t kChunk = 1024;     // 4 KiB of floats
constexpr float kExpFloor = -87.0f;  // e^-87 ~ 1.6e-38, the bottom of float32's normal range: below it, 0

// e^x for x <= 0 (a little above 0 is fine too), within 2 ulp; 0 for x < kExpFloor and
// for -inf. Cephes' expf: x = k ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial,
// 2^k by building the float's exponent bits. Branch-free so loops over it vectorize;
// always_inline because GCC does not inline across the target clones below otherwise.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float xc = std::min(std::max(x, kExpFloor), 0.5f);
  // round(xc / ln2) by the 1.5 * 2^23 trick (exact for |v| < 2^22, no rounding call)
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return x < kExpFloor ? 0.0f : p * two_k;
}

// The loops over float chunks get one clone per x86-64 level (AVX-512, AVX2 + FMA, SSE2),
// picked when the library loads, so one build is fast on any x86-64 machine.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define ALTER_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ALTER_SIMD_CLONES
#endif

ALTER_SIMD_CLONES float max_of(const float* z, int64_t n) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, z[i]);
  return mx;
}

// max over z[0, n) without z[skip]
inline float max_without(const float* z, int64_t n, int64_t skip) {
  return std::max(max_of(z, skip), max_of(z + skip + 1, n - skip - 1));
}

// The chunk as floats: the row itself for float32, else converted into buf.
template <typename scalar_t>
inline const float* load_chunk(const scalar_t* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Where a chunk of output is computed: in place for float32, else in buf (then stored).
template <typename scalar_t>
inline float* chunk_out(scalar_t* dst, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t>
inline void store_chunk(const float* src, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// Sums over a chunk relative to m: s += Σ e^{z-m}, w += Σ e^{q(z-m)} (Tsallis) or
// Σ e^{z-m} (z-m) (Shannon).
ALTER_SIMD_CLONES void add_exp_sums(const float* z, int64_t n, float m, float q, bool shannon, double* s_out,
                                    double* w_out) {
  float s = 0.0f, w = 0.0f;
  if (shannon) {
#pragma omp simd reduction(+ : s, w)
    for (int64_t i = 0; i < n; ++i) {
      const float d = z[i] - m;
      const float e = exp_nonpositive(d);
      s += e;
      w += e * std::max(d, kExpFloor);  // e == 0 where d is -inf
    }
  } else {
#pragma omp simd reduction(+ : s, w)
    for (int64_t i = 0; i < n; ++i) {
      const float d = z[i] - m;
      s += exp_nonpositive(d);
      w += exp_nonpositive(q * d);
    }
  }
  *s_out += s;
  *w_out += w;
}

// One online-softmax step: moves the running statistics to the max of the logits seen so
// far, then adds the chunk's sums relative to it.
inline void accumulate_chunk(Stats& st, const float* z, int64_t n, float chunk_max, bool shannon, double q) {
  st.rescale(chunk_max, shannon, q);
  if (st.m == -INFINITY) return;  // every logit so far is -inf: nothing to add
  add_exp_sums(z, n, static_cast<float>(st.m), static_cast<float>(q), shannon, &st.s, &st.w);
}

// Softmax statistics of one row in one read. Also returns the largest logit other than
// row[skip] (the IHL's max_{v != y}); skip < 0 skips nothing.
template <typename scalar_t>
Stats row_stats(const scalar_t* row, int64_t V, bool shannon, double q, int64_t skip, float* max_other) {
  float buf[kChunk];
  Stats st = Stats::empty();
  float best_other = -INFINITY;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* z = load_chunk(row + start, n, buf);
    const int64_t local = skip - start;
    float chunk_max, chunk_other;
    if (local >= 0 && local < n) {
      chunk_other = max_without(z, n, local);
      chunk_max = std::max(chunk_other, z[local]);
    } else {
      chunk_max = chunk_other = max_of(z, n);
    }
    best_other = std::max(best_other, chunk_other);
    accumulate_chunk(st, z, n, chunk_max, shannon, q);
  }
  *max_other = best_other;
  return st;
}

// First index of the largest logit other than row[skip]; -1 when there is none (V == 1)
// or all others are -inf (then p_{v*} = 0 and v* does not matter).
template <typename scalar_t>
int64_t argmax_without(const scalar_t* row, int64_t V, int64_t skip) {
  float buf[kChunk];
  float best = -INFINITY;
  int64_t best_index = -1;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* z = load_chunk(row + start, n, buf);
    const int64_t local = skip - start;
    const bool has_skip = local >= 0 && local < n;
    const float chunk_max = has_skip ? max_without(z, n, local) : max_of(z, n);
    if (chunk_max > best) {
      best = chunk_max;
      for (int64_t i = 0; i < n; ++i) {
        if (z[i] == chunk_max && i != local) {
          best_index = start + i;
          break;
        }
      }
    }
  }
  return best_index;
}

// Rows per task: small rows are batched so tiny inputs do not pay for threads.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// label_vector, plus the check of label values (cheap on the CPU).
Tensor checked_labels(const char* op, const Tensor& labels, const Tensor& logits, int64_t ignore_index) {
  Tensor contiguous = label_vector(op, labels, logits);
  const int64_t T = logits.size(0), V = logits.size(1);
  const int64_t* y = contiguous.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(y[t] == ignore_index || (y[t] >= 0 && y[t] < V), op, ": labels[", t, "] = ", y[t],
                      " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  }
  return contiguous;
}

// ---------------------------------------------------------------------------------------
// entropy

std::tuple<Tensor, Tensor> entropy_forward(const Tensor& logits, double q) {
  check_logits("entropy_forward", logits);
  check_q("entropy_forward", q);
  const int64_t T = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const bool shannon = use_shannon(q);
  Tensor entropy = at::empty({T}, logits.options().dtype(at::kFloat));
  Tensor lse = at::empty({T}, logits.options().dtype(at::kFloat));
  float* entropy_out = entropy.mutable_data_ptr<float>();
  float* lse_out = lse.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_forward", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float unused_max_other;
        const Stats st = row_stats(base + t * row_stride, V, shannon, q, -1, &unused_max_other);
        entropy_out[t] = static_cast<float>(st.entropy(shannon, q));
        lse_out[t] = static_cast<float>(st.lse());
      }
    });
  });
  return {entropy, lse};
}

// Tsallis: dS/dz_j = -q/(q-1) (p_j^q - p_j P_q), P_q = 1 - (q-1) S.
// Shannon: dH/dz_j = -p_j (log p_j + H).  p_j = e^{z_j - lse}; both times grad_entropy.
// dz = scale * p (max(d, floor) + offset) (Shannon) or scale * (p^q - p * offset)
// (Tsallis), with d = z - lse, p = e^d.
ALTER_SIMD_CLONES void entropy_grad_chunk(const float* z, int64_t n, float lse, float scale, float offset, float q,
                                          bool shannon, float* dz) {
  if (shannon) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float d = z[i] - lse;
      dz[i] = scale * exp_nonpositive(d) * (std::max(d, kExpFloor) + offset);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float d = z[i] - lse;
      dz[i] = scale * (exp_nonpositive(q * d) - exp_nonpositive(d) * offset);
    }
  }
}

template <typename scalar_t>
void entropy_backward_row(const scalar_t* row, int64_t V, float grad, float entropy, float lse, bool shannon,
                          float q, scalar_t* out_row) {
  float in_buf[kChunk], out_buf[kChunk];
  // Shannon: -g p (d + H); Tsallis: a (p^q - p P_q) with a = -g q/(q-1).
  const float scale = shannon ? -grad : -grad * q / (q - 1.0f);
  const float offset = shannon ? entropy : 1.0f - (q - 1.0f) * entropy;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* z = load_chunk(row + start, n, in_buf);
    float* dz = chunk_out(out_row + start, out_buf);
    entropy_grad_chunk(z, n, lse, scale, offset, q, shannon, dz);
    store_chunk(dz, n, out_row + start);
  }
}

Tensor entropy_backward(const Tensor& grad_entropy, const Tensor& logits, const Tensor& entropy, const Tensor& lse,
                        double q) {
  const char* op = "entropy_backward";
  check_logits(op, logits);
  check_q(op, q);
  const int64_t T = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const Tensor grad_c = token_vector(op, "grad_entropy", grad_entropy, logits);
  const Tensor entropy_c = token_vector(op, "entropy", entropy, logits);
  const Tensor lse_c = token_vector(op, "lse", lse, logits);
  const float* grad = grad_c.const_data_ptr<float>();
  const float* ent = entropy_c.const_data_ptr<float>();
  const float* lse_in = lse_c.const_data_ptr<float>();
  const bool shannon = use_shannon(q);
  Tensor grad_logits = at::empty({T, V}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_backward", [&] {
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        entropy_backward_row(in + t * row_stride, V, grad[t], ent[t], lse_in[t], shannon, static_cast<float>(q),
                             out + t * V);
      }
    });
  });
  return grad_logits;
}

// ---------------------------------------------------------------------------------------
// inverted hinge loss

// loss = 1 + p_y - max_{v != y} p_v (0 for ignored tokens), entropy and lse of every row,
// weight = 0 (ignored) | 1 (entropy <= threshold) | high_entropy_weight; all in one read.
std::tuple<Tensor, Tensor, Tensor, Tensor> ihl_forward(const Tensor& logits, const Tensor& labels, double q,
                                                       double threshold, double high_entropy_weight,
                                                       int64_t ignore_index) {
  const char* op = "ihl_forward";
  check_logits(op, logits);
  check_q(op, q);
  const int64_t T = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const Tensor labels_c = checked_labels(op, labels, logits, ignore_index);
  const int64_t* y = labels_c.const_data_ptr<int64_t>();
  const bool shannon = use_shannon(q);
  const auto f32 = logits.options().dtype(at::kFloat);
  Tensor loss = at::empty({T}, f32), entropy = at::empty({T}, f32), weight = at::empty({T}, f32),
         lse = at::empty({T}, f32);
  float* loss_out = loss.mutable_data_ptr<float>();
  float* entropy_out = entropy.mutable_data_ptr<float>();
  float* weight_out = weight.mutable_data_ptr<float>();
  float* lse_out = lse.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ihl_forward", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = base + t * row_stride;
        const bool ignored = y[t] == ignore_index;
        float max_other;
        const Stats st = row_stats(row, V, shannon, q, ignored ? -1 : y[t], &max_other);
        const double ent = st.entropy(shannon, q), row_lse = st.lse();
        entropy_out[t] = static_cast<float>(ent);
        lse_out[t] = static_cast<float>(row_lse);
        if (ignored) {
          loss_out[t] = 0.0f;
          weight_out[t] = 0.0f;
        } else {
          const double p_y = std::exp(static_cast<float>(row[y[t]]) - row_lse);
          const double p_other = std::exp(max_other - row_lse);  // 0 when V == 1
          loss_out[t] = static_cast<float>(1.0 + p_y - p_other);
          weight_out[t] = ent > threshold ? static_cast<float>(high_entropy_weight) : 1.0f;
        }
      }
    });
  });
  return {loss, entropy, weight, lse};
}

// dL/dz_j = g (p_y (δ_jy - p_j) - p_v* (δ_jv* - p_j)) = g (p_v* - p_y) p_j + g p_y δ_jy - g p_v* δ_jv*.
// The row is read twice (v* = argmax_{v != y}, then the gradient); the second read of a
// row that fits in L2 (V = 128k in float32) comes from cache.
// dz = scale * e^{z - lse}
ALTER_SIMD_CLONES void scaled_softmax_chunk(const float* z, int64_t n, float lse, float scale, float* dz) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dz[i] = scale * exp_nonpositive(z[i] - lse);
}

template <typename scalar_t>
void ihl_backward_row(const scalar_t* row, int64_t V, float grad, int64_t label, float lse, scalar_t* out_row) {
  float in_buf[kChunk], out_buf[kChunk];
  const int64_t other = argmax_without(row, V, label);
  const float p_y = std::exp(static_cast<float>(row[label]) - lse);
  const float p_other = other >= 0 ? std::exp(static_cast<float>(row[other]) - lse) : 0.0f;
  const float dense = grad * (p_other - p_y);
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* z = load_chunk(row + start, n, in_buf);
    float* dz = chunk_out(out_row + start, out_buf);
    scaled_softmax_chunk(z, n, lse, dense, dz);
    if (label >= start && label < start + n) dz[label - start] += grad * p_y;
    if (other >= start && other < start + n) dz[other - start] -= grad * p_other;
    store_chunk(dz, n, out_row + start);
  }
}

Tensor ihl_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& labels, const Tensor& lse,
                    int64_t ignore_index) {
  const char* op = "ihl_backward";
  check_logits(op, logits);
  const int64_t T = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const Tensor grad_c = token_vector(op, "grad_loss", grad_loss, logits);
  const Tensor lse_c = token_vector(op, "lse", lse, logits);
  const Tensor labels_c = checked_labels(op, labels, logits, ignore_index);
  const float* grad = grad_c.const_data_ptr<float>();
  const float* lse_in = lse_c.const_data_ptr<float>();
  const int64_t* y = labels_c.const_data_ptr<int64_t>();
  Tensor grad_logits = at::empty({T, V}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ihl_backward", [&] {
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* out_row = out + t * V;
        if (y[t] == ignore_index) {
          std::fill(out_row, out_row + V, static_cast<scalar_t>(0));
        } else {
          ihl_backward_row(in + t * row_stride, V, grad[t], y[t], lse_in[t], out_row);
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(alter_kernels, CPU, m) {
  m.impl("entropy_forward", &entropy_forward);
  m.impl("entropy_backward", &entropy_backward);
  m.impl("ihl_forward", &ihl_forward);
  m.impl("ihl_backward", &ihl_backward);
}

}  // namespace alter
