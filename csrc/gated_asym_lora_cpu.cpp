// CPU kernel of gated_asym_lora_: one adapted layer's whole routed AsymLoRA delta, router
// to expand, added into the base layer's output in one call (inference, no autograd). At
// decode sizes (a few tokens, N·r <= 128) the FLOPs are negligible and a layer's cost was
// the ~11 Python-dispatched ops of the dense path; here it is one GEMM and two loops (the
// expand reads only the kept experts' rows), or two GEMMs for many tokens.
//
//   shrunk = x [W_g; A]^T                  [T, N + r]   (router logits, then h = A x)
//   l_t    = shrunk[t, :N] + S_t u         in opmath (float32 for 16-bit x)
//   G_t    = softmax over the top-k of (l_t - max l_t) / tau, 0 elsewhere (alter_kernels.route)
//   out   += (G ⊗ h) [T, N·r] @ expand     expand = s·B_cat^T [N·r, d]
//
// The gate matches alter_kernels.routing.dense_gate: ranks from a stable descending
// order (ties to the lower expert), a row with a NaN or +inf logit (or only -inf ones)
// gets NaN weights. With experts given, G is their one-hot and the router is not read.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace alter {
namespace {

using at::Tensor;

struct GateSettings {
  double threshold, tau_high, tau_low;
  int64_t k_high, k_low;
};

// G_t [N] of one token from its router logits l [N] (opmath), as dense_gate computes it.
template <typename opmath_t>
void token_gate(const opmath_t* l, int64_t N, int64_t k, opmath_t tau, opmath_t* gate) {
  opmath_t top = -std::numeric_limits<opmath_t>::infinity();
  bool nan = false;
  for (int64_t e = 0; e < N; ++e) {
    nan = nan || std::isnan(l[e]);
    top = std::max(top, l[e]);
  }
  if (nan || !std::isfinite(top)) {
    std::fill(gate, gate + N, std::numeric_limits<opmath_t>::quiet_NaN());
    return;
  }
  opmath_t sum = 0;
  for (int64_t e = 0; e < N; ++e) {
    int64_t rank = 0;  // experts ahead of e: larger logits, or equal ones of lower index
    for (int64_t j = 0; j < N; ++j) rank += (l[j] > l[e]) || (l[j] == l[e] && j < e);
    // the kept maximum is the top logit, so the softmax's own shift is 0
    gate[e] = rank < k ? std::exp((l[e] - top) / tau) : opmath_t(0);
    sum += gate[e];
  }
  for (int64_t e = 0; e < N; ++e) gate[e] /= sum;
}

// Each token's gate G_t [N] (opmath) into gates [T, N]: the router's (token_gate), or the
// one-hot of a given expert.
template <typename scalar_t>
void token_gates(const Tensor& shrunk, const Tensor& entropy_weight, const Tensor& entropy,
                 const std::optional<Tensor>& experts, const GateSettings& settings, int64_t N,
                 std::vector<at::opmath_type<scalar_t>>& gates) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = shrunk.size(0), width = shrunk.size(1);
  const scalar_t* rows = shrunk.const_data_ptr<scalar_t>();
  if (experts.has_value()) {
    const Tensor picked = experts->contiguous();
    const int32_t* expert_of = picked.const_data_ptr<int32_t>();
    for (int64_t t = 0; t < T; ++t) gates[t * N + expert_of[t]] = 1;
    return;
  }
  const Tensor u = entropy_weight.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const opmath_t* u_data = u.const_data_ptr<opmath_t>();
  const Tensor entropy64 = entropy.to(at::kDouble).contiguous();  // exact for float32 and float64 entropy
  const double* ent = entropy64.const_data_ptr<double>();
  const bool single = entropy.scalar_type() == at::kFloat;
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> logits(N);
    for (int64_t t = begin; t < end; ++t) {
      // compared in the entropy's dtype, as torch compares a tensor with a Python float
      const bool high = single ? static_cast<float>(ent[t]) > static_cast<float>(settings.threshold)
                               : ent[t] > settings.threshold;
      for (int64_t e = 0; e < N; ++e) {
        logits[e] = static_cast<opmath_t>(rows[t * width + e]) + static_cast<opmath_t>(ent[t]) * u_data[e];
      }
      token_gate<opmath_t>(logits.data(), N, high ? settings.k_high : settings.k_low,
                           static_cast<opmath_t>(high ? settings.tau_high : settings.tau_low), gates.data() + t * N);
    }
  });
}

// G_te · h_t, the gated rank's entry (e, j), rounded as the dense path rounds it: the gate
// to x's dtype (its .to(dtype)), then the product.
template <typename scalar_t>
inline scalar_t gated_entry(at::opmath_type<scalar_t> gate, scalar_t h) {
  using opmath_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<opmath_t>(static_cast<scalar_t>(gate)) * static_cast<opmath_t>(h));
}

// out += (G ⊗ h) @ expand for a few tokens: only the experts a token keeps (k of N) are
// read, one row of expand per (kept expert, rank), summed in opmath before out's one rounding.
template <typename scalar_t>
void expand_kept(const Tensor& out, const Tensor& shrunk, const Tensor& expand, int64_t N,
                 const std::vector<at::opmath_type<scalar_t>>& gates) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = shrunk.size(0), width = shrunk.size(1), r = width - N, d = expand.size(1);
  const Tensor rows_of_expand = expand.contiguous();
  const scalar_t* ex = rows_of_expand.const_data_ptr<scalar_t>();
  const scalar_t* h = shrunk.const_data_ptr<scalar_t>() + N;
  std::vector<opmath_t> sum(d);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(sum.begin(), sum.end(), opmath_t(0));
    opmath_t* acc = sum.data();
    for (int64_t e = 0; e < N; ++e) {
      const opmath_t gate = gates[t * N + e];
      // not kept: never read, as the grouped path reads only kept experts (a NaN gate is kept)
      if (gate == opmath_t(0)) continue;
      for (int64_t j = 0; j < r; ++j) {
        const opmath_t c = static_cast<opmath_t>(gated_entry<scalar_t>(gate, h[t * width + j]));
        const scalar_t* row = ex + (e * r + j) * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[i] += c * static_cast<opmath_t>(row[i]);
      }
    }
    scalar_t* dst = out.mutable_data_ptr<scalar_t>() + t * out.stride(0);  // rows of unit stride (the caller checks)
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(dst[i]) + acc[i]);
  }
}

// out += (G ⊗ h) [T, N·r] @ expand as one GEMM, for many tokens.
template <typename scalar_t>
void expand_dense(const Tensor& out, const Tensor& shrunk, const Tensor& expand, int64_t N,
                  const std::vector<at::opmath_type<scalar_t>>& gates) {
  const int64_t T = shrunk.size(0), width = shrunk.size(1), r = width - N;
  const Tensor gated = at::empty({T, N * r}, shrunk.options());
  const scalar_t* h = shrunk.const_data_ptr<scalar_t>() + N;
  scalar_t* dst = gated.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < N; ++e) {
        for (int64_t j = 0; j < r; ++j) dst[(t * N + e) * r + j] = gated_entry<scalar_t>(gates[t * N + e], h[t * width + j]);
      }
    }
  });
  out.addmm_(gated, expand);
}

// Tokens up to which the expand reads only the kept experts' rows (a decode step); above
// it one GEMM over all experts is faster.
constexpr int64_t kSparseExpandTokens = 16;

// Inputs are checked by alter_kernels.gated_asym_lora (the Python API boundary).
void gated_asym_lora_(const Tensor& out, const Tensor& x, const Tensor& stacked, const Tensor& entropy_weight,
                      const Tensor& entropy, const Tensor& expand, int64_t num_experts, double threshold,
                      double tau_high, double tau_low, int64_t k_high, int64_t k_low,
                      const std::optional<Tensor>& experts) {
  // x's dtype throughout, also inside an autocast region (which would make the GEMM bf16)
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor shrunk = at::mm(x, stacked.t());  // contiguous [T, N + r]
  const GateSettings settings{threshold, tau_high, tau_low, k_high, k_low};
  const bool sparse = x.size(0) <= kSparseExpandTokens && (out.size(1) == 1 || out.stride(1) == 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_asym_lora_", [&] {
    std::vector<at::opmath_type<scalar_t>> gates(x.size(0) * num_experts, 0);
    token_gates<scalar_t>(shrunk, entropy_weight, entropy, experts, settings, num_experts, gates);
    if (sparse) {
      expand_kept<scalar_t>(out, shrunk, expand, num_experts, gates);
    } else {
      expand_dense<scalar_t>(out, shrunk, expand, num_experts, gates);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(alter_kernels, CPU, m) { m.impl("gated_asym_lora_", &gated_asym_lora_); }

}  // namespace alter
