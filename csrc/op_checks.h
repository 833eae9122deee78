// Input checks, output allocation and sizes shared by the CPU and CUDA wrappers of the ops: bad input
// raises ValueError / TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming
// the op and the argument, instead of a crash or NaN inside a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace alter {

inline void check_device(const char* op, const char* name, const at::Tensor& t, const c10::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " like logits, got ", t.device());
}

// logits [T, V] float32, float16, bfloat16 or float64, V >= 1, unit stride along V (rows
// may have any stride). The CPU kernels compute float64 logits in float32 like the others;
// the CUDA wrappers reject float64.
inline void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be a 2-D [T, V] tensor, got shape ", logits.sizes());
  const at::ScalarType type = logits.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble, op,
                   ": logits must be a floating-point tensor (float32, float16, bfloat16 or float64), got ", type);
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one column (V >= 1), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1, op,
                    ": logits must have stride 1 in its last dimension (rows may have any stride), got strides ",
                    logits.strides(), "; call .contiguous() first");
}

inline void check_q(const char* op, double q) {
  TORCH_CHECK_VALUE(std::isfinite(q) && q > 0.0, op, ": q must be a finite number > 0, got ", q);
}

// How the error messages name the dtypes of per-token vectors.
inline const char* dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(type);
  }
}

// A [T] vector of per-token values of the given dtype on logits' device, made contiguous
// (autograd hands expanded gradients, e.g. of entropy.sum()).
inline at::Tensor token_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits,
                               at::ScalarType dtype = at::kFloat) {
  const int64_t T = logits.size(0);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T, op, ": ", name, " must have shape [", T, "], got ",
                    t.sizes());
  check_device(op, name, t, logits.device());
  return t.contiguous();
}

// labels [T] int64 and runner_up [T] int32 (v* of ihl_forward) on logits' device, made
// contiguous. Their values are checked by the CPU kernels only: a check on the GPU would
// cost a device sync (the CUDA kernels give NaN for a token whose label or runner-up is
// out of range instead).
inline at::Tensor label_vector(const char* op, const at::Tensor& labels, const at::Tensor& logits) {
  return token_vector(op, "labels", labels, logits, at::kLong);
}

inline at::Tensor runner_up_vector(const char* op, const at::Tensor& runner_up, const at::Tensor& logits) {
  return token_vector(op, "runner_up", runner_up, logits, at::kInt);
}

// A new [T] output of per-token values on logits' device, float32 unless told otherwise.
inline at::Tensor token_output(const at::Tensor& logits, at::ScalarType dtype = at::kFloat) {
  return at::empty({logits.size(0)}, logits.options().dtype(dtype));
}

// A new gradient of logits: contiguous [T, V] of the logits' dtype, whatever their row stride.
inline at::Tensor logits_grad_output(const at::Tensor& logits) { return at::empty(logits.sizes(), logits.options()); }

struct MoeAlignSizes {
  int64_t numel;       // T * K: number of slots, also the padding value of sorted_ids
  int64_t max_blocks;  // ceil((T*K + N*(block_m - 1)) / block_m): blocks in the worst case
};

inline MoeAlignSizes check_moe_align(const at::Tensor& experts, int64_t num_experts, int64_t block_m) {
  TORCH_CHECK_VALUE(experts.dim() == 2, "moe_align: experts must be a 2-D [T, K] tensor, got shape ",
                    experts.sizes());
  TORCH_CHECK_TYPE(experts.scalar_type() == at::kInt, "moe_align: experts must be int32, got ",
                   experts.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1, "moe_align: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(block_m >= 1, "moe_align: block_m must be >= 1, got ", block_m);
  const int64_t numel = experts.numel();
  const int64_t max_padded = numel + num_experts * (block_m - 1);
  const int64_t max_blocks = (max_padded + block_m - 1) / block_m;
  TORCH_CHECK_VALUE(max_blocks * block_m <= std::numeric_limits<int32_t>::max(),
                    "moe_align: T*K + num_experts*(block_m - 1) = ", max_padded, " does not fit in int32");
  return {numel, max_blocks};
}

}  // namespace alter
