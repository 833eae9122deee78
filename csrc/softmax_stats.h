// Online softmax statistics of one row of logits, shared by the CPU kernels and the CUDA
// kernels (plain C++: no torch headers, so csrc/cuda/*.cu can include it).
//
// For a set of logits z with max m the state holds
//   s = sum_i e^{z_i - m}
//   w = sum_i e^{q (z_i - m)}            (Tsallis)
//   w = sum_i e^{z_i - m} (z_i - m)      (Shannon)
// from which, with p = softmax(z):  p_i = e^{(z_i - m) - log s},
//   Tsallis S_q = (1 - P_q) / (q - 1),  P_q = sum_i p_i^q = w / s^q (the backward takes P_q
//     itself: 1 - (q - 1) S in float32 loses (q - 1) ulp(S) / P_q),
//   Shannon H   = log s - w / s.
// The kernels save m and log s apart, never lse = m + log s: z - m is exact in float32,
// while m + log s is rounded at the logits' magnitude (an error ~|z| 2^-24 in every p).
// An empty set (or one of only -inf logits) has m = -inf and s = w = 0.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ALTER_HD __host__ __device__ __forceinline__
#else
#define ALTER_HD inline
#endif

namespace alter {

// Near q = 1 the Tsallis formula cancels catastrophically; its limit there is Shannon.
constexpr double kShannonTolerance = 1e-3;

ALTER_HD bool use_shannon(double q) { return std::fabs(q - 1.0) < kShannonTolerance; }

template <typename acc_t>
struct SoftmaxStats {
  acc_t m;
  acc_t s;
  acc_t w;

  ALTER_HD static SoftmaxStats empty() { return {-INFINITY, acc_t(0), acc_t(0)}; }

  // Re-expresses the sums relative to new_max >= m (when the running max grows):
  // s <- e^{m-m'} s,  u <- e^{q(m-m')} u,  t <- e^{m-m'} (t + (m-m') s).
  ALTER_HD void rescale(acc_t new_max, bool shannon, acc_t q) {
    if (s > acc_t(0) && new_max > m) {
      const acc_t d = m - new_max;
      const acc_t scale = std::exp(d);
      w = shannon ? scale * (w + d * s) : std::exp(q * d) * w;
      s *= scale;
    }
    if (new_max > m) m = new_max;
  }

  // Combines the statistics of two disjoint sets of logits.
  ALTER_HD void merge(SoftmaxStats other, bool shannon, acc_t q) {
    const acc_t new_max = other.m > m ? other.m : m;
    rescale(new_max, shannon, q);
    other.rescale(new_max, shannon, q);
    s += other.s;
    w += other.w;
  }

  ALTER_HD acc_t log_sum() const { return std::log(s); }

  // p_i of a logit z of the row (0 for -inf).
  ALTER_HD acc_t prob(acc_t z) const { return std::exp((z - m) - log_sum()); }

  // P_q = sum_i p_i^q; 1 for Shannon (q == 1).
  ALTER_HD acc_t power_sum(bool shannon, acc_t q) const { return shannon ? acc_t(1) : w / std::pow(s, q); }

  ALTER_HD acc_t entropy(bool shannon, acc_t q) const {
    if (shannon) return std::log(s) - w / s;
    return (acc_t(1) - power_sum(shannon, q)) / (q - acc_t(1));
  }
};

}  // namespace alter
