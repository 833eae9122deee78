// Input checks and output sizes shared by the CPU and CUDA wrappers of the ops: bad input
// raises ValueError / TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming
// the op and the argument, instead of a crash or NaN inside a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace alter {

inline void check_device(const char* op, const char* name, const at::Tensor& t, const c10::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " like logits, got ", t.device());
}

// logits [T, V], floating point, V >= 1, unit stride along V (rows may have any stride).
// The CPU kernels also take float64 (computed in float32 like the others); CUDA does not.
inline void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be a 2-D [T, V] tensor, got shape ", logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op,
                   ": logits must be a floating-point tensor (float32, float16 or bfloat16), got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one column (V >= 1), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1, op,
                    ": logits must have stride 1 in its last dimension (rows may have any stride), got strides ",
                    logits.strides(), "; call .contiguous() first");
}

inline void check_q(const char* op, double q) {
  TORCH_CHECK_VALUE(std::isfinite(q) && q > 0.0, op, ": q must be a finite number > 0, got ", q);
}

// A float32 [T] vector of per-token values on logits' device, made contiguous (autograd
// hands expanded gradients, e.g. of entropy.sum()).
inline at::Tensor token_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  const int64_t T = logits.size(0);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T, op, ": ", name, " must have shape [", T, "], got ",
                    t.sizes());
  check_device(op, name, t, logits.device());
  return t.contiguous();
}

// labels [T] int64 on logits' device, made contiguous. Their values are checked by the
// CPU kernels only: a check on the GPU would cost a device sync (the CUDA kernels give
// NaN for a token whose label is out of range instead).
inline at::Tensor label_vector(const char* op, const at::Tensor& labels, const at::Tensor& logits) {
  const int64_t T = logits.size(0);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == T, op, ": labels must have shape [", T, "], got ",
                    labels.sizes());
  check_device(op, "labels", labels, logits.device());
  return labels.contiguous();
}

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
