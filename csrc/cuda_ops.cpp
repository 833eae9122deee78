// CUDA kernels of the ops as torch ops: checks the inputs (op_checks.h), allocates the
// outputs and calls the C-ABI launchers of csrc/cuda/*.cu on the current stream.
// Compiled only when setup.py builds with CUDA (-DWITH_CUDA).
#ifdef WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "op_checks.h"

namespace alter {
namespace {

using at::Tensor;

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

// logits checks plus the element type the launchers take.
alter_dtype cuda_logits(const char* op, const Tensor& logits) {
  check_logits(op, logits);
  TORCH_CHECK_VALUE(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  const at::ScalarType type = logits.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op,
                   ": CUDA logits must be float32, float16 or bfloat16, got ", type);
  return type == at::kFloat ? ALTER_FLOAT32 : type == at::kHalf ? ALTER_FLOAT16 : ALTER_BFLOAT16;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<Tensor, Tensor, Tensor, Tensor> entropy_forward(const Tensor& logits, double q) {
  const char* op = "entropy_forward";
  const alter_dtype dtype = cuda_logits(op, logits);
  check_q(op, q);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor entropy = token_output(logits), row_max = token_output(logits), log_sum = token_output(logits),
         power_sum = token_output(logits);
  check_launch(op, alter_entropy_forward_cuda(logits.const_data_ptr(), dtype, logits.size(0), logits.size(1),
                                              logits.stride(0), q, entropy.mutable_data_ptr<float>(),
                                              row_max.mutable_data_ptr<float>(), log_sum.mutable_data_ptr<float>(),
                                              power_sum.mutable_data_ptr<float>(), current_stream()));
  return {entropy, row_max, log_sum, power_sum};
}

Tensor entropy_backward(const Tensor& grad_entropy, const Tensor& logits, const Tensor& entropy,
                        const Tensor& row_max, const Tensor& log_sum, const Tensor& power_sum, double q) {
  const char* op = "entropy_backward";
  const alter_dtype dtype = cuda_logits(op, logits);
  check_q(op, q);
  const Tensor grad_c = token_vector(op, "grad_entropy", grad_entropy, logits);
  const Tensor entropy_c = token_vector(op, "entropy", entropy, logits);
  const Tensor max_c = token_vector(op, "row_max", row_max, logits);
  const Tensor log_sum_c = token_vector(op, "log_sum", log_sum, logits);
  const Tensor power_sum_c = token_vector(op, "power_sum", power_sum, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor grad_logits = logits_grad_output(logits);
  check_launch(op, alter_entropy_backward_cuda(grad_c.const_data_ptr<float>(), logits.const_data_ptr(), dtype,
                                               logits.size(0), logits.size(1), logits.stride(0),
                                               entropy_c.const_data_ptr<float>(), max_c.const_data_ptr<float>(),
                                               log_sum_c.const_data_ptr<float>(), power_sum_c.const_data_ptr<float>(),
                                               q, grad_logits.mutable_data_ptr(), current_stream()));
  return grad_logits;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ihl_forward(const Tensor& logits, const Tensor& labels,
                                                                       double q, double threshold,
                                                                       double high_entropy_weight,
                                                                       int64_t ignore_index) {
  const char* op = "ihl_forward";
  const alter_dtype dtype = cuda_logits(op, logits);
  check_q(op, q);
  const Tensor labels_c = label_vector(op, labels, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor loss = token_output(logits), entropy = token_output(logits), weight = token_output(logits),
         row_max = token_output(logits), log_sum = token_output(logits), runner_up = token_output(logits, at::kInt);
  check_launch(op, alter_ihl_forward_cuda(logits.const_data_ptr(), dtype, logits.size(0), logits.size(1),
                                          logits.stride(0), labels_c.const_data_ptr<int64_t>(), q, threshold,
                                          high_entropy_weight, ignore_index, loss.mutable_data_ptr<float>(),
                                          entropy.mutable_data_ptr<float>(), weight.mutable_data_ptr<float>(),
                                          row_max.mutable_data_ptr<float>(), log_sum.mutable_data_ptr<float>(),
                                          runner_up.mutable_data_ptr<int32_t>(), current_stream()));
  return {loss, entropy, weight, row_max, log_sum, runner_up};
}

Tensor ihl_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& labels, const Tensor& row_max,
                    const Tensor& log_sum, const Tensor& runner_up, int64_t ignore_index) {
  const char* op = "ihl_backward";
  const alter_dtype dtype = cuda_logits(op, logits);
  const Tensor grad_c = token_vector(op, "grad_loss", grad_loss, logits);
  const Tensor max_c = token_vector(op, "row_max", row_max, logits);
  const Tensor log_sum_c = token_vector(op, "log_sum", log_sum, logits);
  const Tensor labels_c = label_vector(op, labels, logits);
  const Tensor runner_up_c = runner_up_vector(op, runner_up, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor grad_logits = logits_grad_output(logits);
  check_launch(op, alter_ihl_backward_cuda(grad_c.const_data_ptr<float>(), logits.const_data_ptr(), dtype,
                                           logits.size(0), logits.size(1), logits.stride(0),
                                           labels_c.const_data_ptr<int64_t>(), max_c.const_data_ptr<float>(),
                                           log_sum_c.const_data_ptr<float>(), runner_up_c.const_data_ptr<int32_t>(),
                                           ignore_index, grad_logits.mutable_data_ptr(), current_stream()));
  return grad_logits;
}

std::tuple<Tensor, Tensor, Tensor> moe_align(const Tensor& experts, int64_t num_experts, int64_t block_m) {
  const MoeAlignSizes sizes = check_moe_align(experts, num_experts, block_m);
  TORCH_CHECK_VALUE(num_experts <= ALTER_MOE_ALIGN_MAX_EXPERTS, "moe_align: the CUDA kernel takes at most ",
                    ALTER_MOE_ALIGN_MAX_EXPERTS, " experts, got num_experts = ", num_experts);
  const c10::cuda::CUDAGuard guard(experts.device());
  const Tensor flat = experts.contiguous();
  const auto i32 = experts.options().dtype(at::kInt);
  Tensor sorted_ids = at::empty({sizes.max_blocks * block_m}, i32);
  Tensor block_expert = at::empty({sizes.max_blocks}, i32);
  Tensor num_padded = at::empty({1}, i32);
  check_launch("moe_align",
               alter_moe_align_cuda(flat.const_data_ptr<int32_t>(), sizes.numel, num_experts, block_m,
                                    sizes.max_blocks, sorted_ids.mutable_data_ptr<int32_t>(),
                                    block_expert.mutable_data_ptr<int32_t>(), num_padded.mutable_data_ptr<int32_t>(),
                                    current_stream()));
  return {sorted_ids, block_expert, num_padded};
}

}  // namespace

TORCH_LIBRARY_IMPL(alter_kernels, CUDA, m) {
  m.impl("entropy_forward", &entropy_forward);
  m.impl("entropy_backward", &entropy_backward);
  m.impl("ihl_forward", &ihl_forward);
  m.impl("ihl_backward", &ihl_backward);
  m.impl("moe_align", &moe_align);
}

}  // namespace alter

#endif  // WITH_CUDA
