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
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

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

// The IHL's v* = argmax_{v != y} z_v of a row: the largest logit other than the target
// and its first index (ties go to the lowest index). index stays -1 when there is no
// other finite logit (V == 1, or all others -inf: then p_{v*} = 0 and v* does not matter).
struct RunnerUp {
  int64_t target;
  float value = -INFINITY;
  int64_t index = -1;
};

// First i in [0, n) other than skip with z[i] == value (the caller knows there is one).
inline int64_t first_index_of(const float* z, int64_t n, float value, int64_t skip) {
  for (int64_t i = 0; i < n; ++i) {
    if (z[i] == value && i != skip) return i;
  }
  return -1;
}

// Softmax statistics of one row in one read; with runner_up, also its v* in the same read
// (a chunk is scanned for the index only when its max beats the best so far).
template <typename scalar_t>
Stats row_stats(const scalar_t* row, int64_t V, bool shannon, double q, RunnerUp* runner_up = nullptr) {
  float buf[kChunk];
  Stats st = Stats::empty();
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* z = load_chunk(row + start, n, buf);
    float chunk_max;
    if (runner_up == nullptr) {
      chunk_max = max_of(z, n);
    } else {
      const int64_t local = runner_up->target - start;
      const bool has_target = local >= 0 && local < n;
      const float chunk_other = has_target ? max_without(z, n, local) : max_of(z, n);
      chunk_max = has_target ? std::max(chunk_other, z[local]) : chunk_other;
      if (chunk_other > runner_up->value) {  // strict: ties keep the earlier index
        runner_up->value = chunk_other;
        runner_up->index = start + first_index_of(z, n, chunk_other, local);
      }
    }
    accumulate_chunk(st, z, n, chunk_max, shannon, q);
  }
  return st;
}

// Rows per task: small rows are batched so tiny inputs do not pay for threads.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// Calls row_fn(row, grad_row, t) for every row t of logits, rows in parallel: row is the
// logits' row t as const scalar_t*, grad_row row t of grad_logits (contiguous [T, V] of the
// logits' dtype), or nullptr when grad_logits is undefined (the forward ops).
template <typename RowFn>
void for_each_row(const Tensor& logits, const Tensor& grad_logits, const RowFn& row_fn) {
  const int64_t T = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  // check_logits has vetted the dtype: the name below never reaches an error message
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "alter_kernels_logits", [&] {
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad_logits.defined() ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) row_fn(in + t * row_stride, out == nullptr ? nullptr : out + t * V, t);
    });
  });
}

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

// runner_up_vector, plus the check of its values: -1 or a column of logits.
Tensor checked_runner_up(const char* op, const Tensor& runner_up, const Tensor& logits) {
  Tensor contiguous = runner_up_vector(op, runner_up, logits);
  const int64_t T = logits.size(0), V = logits.size(1);
  const int32_t* v = contiguous.const_data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(v[t] >= -1 && v[t] < V, op, ": runner_up[", t, "] = ", v[t], " is outside [-1, ", V, ")");
  }
  return contiguous;
}

// ---------------------------------------------------------------------------------------
// entropy

std::tuple<Tensor, Tensor, Tensor, Tensor> entropy_forward(const Tensor& logits, double q) {
  check_logits("entropy_forward", logits);
  check_q("entropy_forward", q);
  const int64_t V = logits.size(1);
  const bool shannon = use_shannon(q);
  Tensor entropy = token_output(logits), row_max = token_output(logits), log_sum = token_output(logits),
         power_sum = token_output(logits);
  float* entropy_out = entropy.mutable_data_ptr<float>();
  float* max_out = row_max.mutable_data_ptr<float>();
  float* log_sum_out = log_sum.mutable_data_ptr<float>();
  float* power_sum_out = power_sum.mutable_data_ptr<float>();
  for_each_row(logits, Tensor(), [&](const auto* row, auto* /*no gradient*/, int64_t t) {
    const Stats st = row_stats(row, V, shannon, q);
    entropy_out[t] = static_cast<float>(st.entropy(shannon, q));
    max_out[t] = static_cast<float>(st.m);  // a logit as float: exact
    log_sum_out[t] = static_cast<float>(st.log_sum());
    power_sum_out[t] = static_cast<float>(st.power_sum(shannon, q));
  });
  return {entropy, row_max, log_sum, power_sum};
}

// Tsallis: dS/dz_j = -q/(q-1) (p_j^q - p_j P_q), P_q saved by the forward.
// Shannon: dH/dz_j = -p_j (log p_j + H).  p_j = e^{(z_j - m) - log s}; both times grad_entropy.
// A gradient row that is a combination of them and of p itself (IHL, NLL) is, with
// d = (z - m) - log s (z - m exact, see softmax_stats.h) and p = e^d:
//   Tsallis: dz = a p^q + b p;   Shannon: dz = p (a max(d, floor) + b).
ALTER_SIMD_CLONES void softmax_terms_chunk(const float* z, int64_t n, float m, float log_s, float a, float b, float q,
                                           bool shannon, float* dz) {
  if (shannon) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float d = (z[i] - m) - log_s;
      dz[i] = exp_nonpositive(d) * (a * std::max(d, kExpFloor) + b);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float d = (z[i] - m) - log_s;
      dz[i] = a * exp_nonpositive(q * d) + b * exp_nonpositive(d);
    }
  }
}

// What the entropy's backward reads of each row, checked and contiguous: S and P_q.
struct EntropyRows {
  Tensor entropy, power_sum;
  float q;
  bool shannon;
  EntropyRows(const char* op, const Tensor& logits, const Tensor& entropy_in, const Tensor& power_sum_in, double q_in)
      : entropy(token_vector(op, "entropy", entropy_in, logits)),
        power_sum(token_vector(op, "power_sum", power_sum_in, logits)),
        q(static_cast<float>(q_in)),
        shannon(use_shannon(q_in)) {}
  // (a, b) of softmax_terms_chunk for grad_entropy g of row t alone: Shannon -g p (d + H);
  // Tsallis -g q/(q-1) (p^q - p P_q).
  std::pair<float, float> terms(float g, int64_t t) const {
    if (shannon) return {-g, -g * entropy.const_data_ptr<float>()[t]};
    const float a = -g * q / (q - 1.0f);
    return {a, -a * power_sum.const_data_ptr<float>()[t]};
  }
};

// Writes a gradient row chunk by chunk: fill_chunk(z, n, start, dz) computes dz[0, n) from
// the chunk's logits z[0, n) as floats (start: the chunk's first column).
template <typename scalar_t, typename FillChunk>
void write_grad_row(const scalar_t* row, int64_t V, scalar_t* out_row, const FillChunk& fill_chunk) {
  float in_buf[kChunk], out_buf[kChunk];
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* z = load_chunk(row + start, n, in_buf);
    float* dz = chunk_out(out_row + start, out_buf);
    fill_chunk(z, n, start, dz);
    store_chunk(dz, n, out_row + start);
  }
}

Tensor entropy_backward(const Tensor& grad_entropy, const Tensor& logits, const Tensor& entropy,
                        const Tensor& row_max, const Tensor& log_sum, const Tensor& power_sum, double q) {
  const char* op = "entropy_backward";
  check_logits(op, logits);
  check_q(op, q);
  const Tensor grad_c = token_vector(op, "grad_entropy", grad_entropy, logits);
  const EntropyRows rows(op, logits, entropy, power_sum, q);
  const Tensor max_c = token_vector(op, "row_max", row_max, logits);
  const Tensor log_sum_c = token_vector(op, "log_sum", log_sum, logits);
  const float* grad = grad_c.const_data_ptr<float>();
  const float* max_in = max_c.const_data_ptr<float>();
  const float* log_sum_in = log_sum_c.const_data_ptr<float>();
  const int64_t V = logits.size(1);
  Tensor grad_logits = logits_grad_output(logits);
  for_each_row(logits, grad_logits, [&](const auto* row, auto* grad_row, int64_t t) {
    const auto [a, b] = rows.terms(grad[t], t);
    write_grad_row(row, V, grad_row, [&](const float* z, int64_t n, int64_t, float* dz) {
      softmax_terms_chunk(z, n, max_in[t], log_sum_in[t], a, b, rows.q, rows.shannon, dz);
    });
  });
  return grad_logits;
}

// ---------------------------------------------------------------------------------------
// inverted hinge loss

// loss = 1 + p_y - max_{v != y} p_v (0 for ignored tokens), entropy, max and log-sum of every row,
// weight = 0 (ignored) | 1 (entropy <= threshold) | high_entropy_weight, and the runner-up
// v* (int32, -1 for ignored tokens and when there is none) for the backward; all in one read.
// With power_sum defined, P_q of every row too (token_losses_forward: the entropy's backward).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ihl_rows(const char* op, const Tensor& logits,
                                                                    const Tensor& labels, double q, double threshold,
                                                                    double high_entropy_weight, int64_t ignore_index,
                                                                    const Tensor& power_sum) {
  check_logits(op, logits);
  check_q(op, q);
  const int64_t V = logits.size(1);
  const Tensor labels_c = checked_labels(op, labels, logits, ignore_index);
  const int64_t* y = labels_c.const_data_ptr<int64_t>();
  const bool shannon = use_shannon(q);
  Tensor loss = token_output(logits), entropy = token_output(logits), weight = token_output(logits),
         row_max = token_output(logits), log_sum = token_output(logits), runner_up = token_output(logits, at::kInt);
  float* loss_out = loss.mutable_data_ptr<float>();
  float* entropy_out = entropy.mutable_data_ptr<float>();
  float* weight_out = weight.mutable_data_ptr<float>();
  float* max_out = row_max.mutable_data_ptr<float>();
  float* log_sum_out = log_sum.mutable_data_ptr<float>();
  int32_t* runner_up_out = runner_up.mutable_data_ptr<int32_t>();
  float* power_sum_out = power_sum.defined() ? power_sum.mutable_data_ptr<float>() : nullptr;
  for_each_row(logits, Tensor(), [&](const auto* row, auto* /*no gradient*/, int64_t t) {
    const bool ignored = y[t] == ignore_index;
    RunnerUp other{y[t]};
    const Stats st = row_stats(row, V, shannon, q, ignored ? nullptr : &other);
    const double ent = st.entropy(shannon, q);
    entropy_out[t] = static_cast<float>(ent);
    max_out[t] = static_cast<float>(st.m);  // a logit as float: exact
    log_sum_out[t] = static_cast<float>(st.log_sum());
    runner_up_out[t] = static_cast<int32_t>(other.index);  // V < 2^31
    if (power_sum_out != nullptr) power_sum_out[t] = static_cast<float>(st.power_sum(shannon, q));
    if (ignored) {
      loss_out[t] = 0.0f;
      weight_out[t] = 0.0f;
    } else {
      const double p_y = st.prob(static_cast<float>(row[y[t]]));
      const double p_other = st.prob(other.value);  // 0 when there is no v*
      loss_out[t] = static_cast<float>(1.0 + p_y - p_other);
      weight_out[t] = ent > threshold ? static_cast<float>(high_entropy_weight) : 1.0f;
    }
  });
  return {loss, entropy, weight, row_max, log_sum, runner_up};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ihl_forward(const Tensor& logits, const Tensor& labels,
                                                                       double q, double threshold,
                                                                       double high_entropy_weight,
                                                                       int64_t ignore_index) {
  return ihl_rows("ihl_forward", logits, labels, q, threshold, high_entropy_weight, ignore_index, Tensor());
}

// dL/dz_j = g (p_y (δ_jy - p_j) - p_v* (δ_jv* - p_j)) = g (p_v* - p_y) p_j + g p_y δ_jy - g p_v* δ_jv*,
// with v* saved by the forward: one read of the row and one write of its gradient.
// dz = scale * e^{(z - m) - log s}
ALTER_SIMD_CLONES void scaled_softmax_chunk(const float* z, int64_t n, float m, float log_s, float scale, float* dz) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dz[i] = scale * exp_nonpositive((z[i] - m) - log_s);
}

// What the IHL's backward reads of each row, checked and contiguous: the label, v*, and the
// softmax statistics m and log s the forward saved.
struct HingeRows {
  Tensor labels, runner_up, row_max, log_sum;
  HingeRows(const char* op, const Tensor& logits, const Tensor& labels_in, const Tensor& row_max_in,
            const Tensor& log_sum_in, const Tensor& runner_up_in, int64_t ignore_index)
      : labels(checked_labels(op, labels_in, logits, ignore_index)),
        runner_up(checked_runner_up(op, runner_up_in, logits)),
        row_max(token_vector(op, "row_max", row_max_in, logits)),
        log_sum(token_vector(op, "log_sum", log_sum_in, logits)) {}
  int64_t label(int64_t t) const { return labels.const_data_ptr<int64_t>()[t]; }
  int64_t other(int64_t t) const { return runner_up.const_data_ptr<int32_t>()[t]; }
  float m(int64_t t) const { return row_max.const_data_ptr<float>()[t]; }
  float log_s(int64_t t) const { return log_sum.const_data_ptr<float>()[t]; }
  // p_y and p_v* of row t (p_v* = 0 without a runner-up): exp((z - m) - log s), z - m exact
  template <typename scalar_t>
  std::pair<float, float> probs(const scalar_t* row, int64_t t, int64_t label, int64_t other) const {
    const float p_y = std::exp((static_cast<float>(row[label]) - m(t)) - log_s(t));
    return {p_y, other >= 0 ? std::exp((static_cast<float>(row[other]) - m(t)) - log_s(t)) : 0.0f};
  }
};

Tensor ihl_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& labels, const Tensor& row_max,
                    const Tensor& log_sum, const Tensor& runner_up, int64_t ignore_index) {
  const char* op = "ihl_backward";
  check_logits(op, logits);
  const Tensor grad_c = token_vector(op, "grad_loss", grad_loss, logits);
  const HingeRows rows(op, logits, labels, row_max, log_sum, runner_up, ignore_index);
  const float* grad = grad_c.const_data_ptr<float>();
  const int64_t V = logits.size(1);
  Tensor grad_logits = logits_grad_output(logits);
  for_each_row(logits, grad_logits, [&](const auto* row, auto* grad_row, int64_t t) {
    using scalar_t = std::remove_pointer_t<decltype(grad_row)>;
    const int64_t label = rows.label(t), other = rows.other(t);
    if (label == ignore_index) {
      std::fill(grad_row, grad_row + V, static_cast<scalar_t>(0));
      return;
    }
    const float g = grad[t], m = rows.m(t), log_s = rows.log_s(t);
    const auto [p_y, p_other] = rows.probs(row, t, label, other);
    write_grad_row(row, V, grad_row, [&](const float* z, int64_t n, int64_t start, float* dz) {
      scaled_softmax_chunk(z, n, m, log_s, g * (p_other - p_y), dz);
      if (label >= start && label < start + n) dz[label - start] += g * p_y;
      if (other >= start && other < start + n) dz[other - start] -= g * p_other;
    });
  });
  return grad_logits;
}

// ---------------------------------------------------------------------------------------
// token losses: the IHL, the NLL and the entropy of one logits tensor, forward in one read
// and backward in one read and one write

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> token_losses_forward(
    const Tensor& logits, const Tensor& labels, double q, double threshold, double high_entropy_weight,
    int64_t ignore_index) {
  check_logits("token_losses_forward", logits);
  Tensor power_sum = token_output(logits);
  auto [loss, entropy, weight, row_max, log_sum, runner_up] =
      ihl_rows("token_losses_forward", logits, labels, q, threshold, high_entropy_weight, ignore_index, power_sum);
  return {loss, entropy, weight, row_max, log_sum, power_sum, runner_up};
}

// dz = g_S dS/dz + g_I dL/dz + g_N dNLL/dz with dL/dz as ihl_backward and
// dNLL/dz = p - δ_y: the entropy's terms (softmax_terms_chunk) with the IHL's and the NLL's
// multiples of p added to b, then the corrections at y and v*. Ignored tokens: entropy only.
Tensor token_losses_backward(const Tensor& grad_nll, const Tensor& grad_ihl, const Tensor& grad_entropy,
                             const Tensor& logits, const Tensor& labels, const Tensor& entropy, const Tensor& row_max,
                             const Tensor& log_sum, const Tensor& power_sum, const Tensor& runner_up, double q,
                             int64_t ignore_index) {
  const char* op = "token_losses_backward";
  check_logits(op, logits);
  check_q(op, q);
  const Tensor nll_c = token_vector(op, "grad_nll", grad_nll, logits);
  const Tensor ihl_c = token_vector(op, "grad_ihl", grad_ihl, logits);
  const Tensor ent_grad_c = token_vector(op, "grad_entropy", grad_entropy, logits);
  const EntropyRows entropy_rows(op, logits, entropy, power_sum, q);
  const HingeRows rows(op, logits, labels, row_max, log_sum, runner_up, ignore_index);
  const float* g_nll = nll_c.const_data_ptr<float>();
  const float* g_ihl = ihl_c.const_data_ptr<float>();
  const float* g_ent = ent_grad_c.const_data_ptr<float>();
  const int64_t V = logits.size(1);
  Tensor grad_logits = logits_grad_output(logits);
  for_each_row(logits, grad_logits, [&](const auto* row, auto* grad_row, int64_t t) {
    const float m = rows.m(t), log_s = rows.log_s(t);
    auto [a, b] = entropy_rows.terms(g_ent[t], t);
    const int64_t label = rows.label(t) == ignore_index ? -1 : rows.label(t), other = label < 0 ? -1 : rows.other(t);
    float at_label = 0.0f, at_other = 0.0f;
    if (label >= 0) {
      const auto [p_y, p_other] = rows.probs(row, t, label, other);
      b += g_ihl[t] * (p_other - p_y) + g_nll[t];
      at_label = g_ihl[t] * p_y - g_nll[t];
      at_other = -g_ihl[t] * p_other;
    }
    write_grad_row(row, V, grad_row, [&](const float* z, int64_t n, int64_t start, float* dz) {
      softmax_terms_chunk(z, n, m, log_s, a, b, entropy_rows.q, entropy_rows.shannon, dz);
      if (label >= start && label < start + n) dz[label - start] += at_label;
      if (other >= start && other < start + n) dz[other - start] += at_other;
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(alter_kernels, CPU, m) {
  m.impl("token_losses_forward", &token_losses_forward);
  m.impl("token_losses_backward", &token_losses_backward);
  m.impl("entropy_forward", &entropy_forward);
  m.impl("entropy_backward", &entropy_backward);
  m.impl("ihl_forward", &ihl_forward);
  m.impl("ihl_backward", &ihl_backward);
}

}  // namespace alter
