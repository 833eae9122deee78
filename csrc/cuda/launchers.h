// C-ABI launchers of the CUDA kernels: raw pointers, sizes and a stream, no torch types,
// so the .cu files build with plain nvcc. csrc/cuda_ops.cpp wraps them into torch ops.
// Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of logits and of grad_logits.
typedef enum { ALTER_FLOAT32 = 0, ALTER_FLOAT16 = 1, ALTER_BFLOAT16 = 2 } alter_dtype;

// logits [T, V] with rows row_stride elements apart, unit stride along V.
// entropy, row_max, log_sum, power_sum: [T] float32; row_max is the max m of the row and
// log_sum is log sum_i e^{z_i - m} (kept apart: p = e^{(z - m) - log_sum} is exact at any
// |z|); power_sum is P_q = sum_i p_i^q (1 for Shannon).
cudaError_t alter_entropy_forward_cuda(const void* logits, alter_dtype dtype, int64_t T, int64_t V,
                                       int64_t row_stride, double q, float* entropy, float* row_max, float* log_sum,
                                       float* power_sum, cudaStream_t stream);

// grad_logits [T, V] contiguous, of logits' dtype.
cudaError_t alter_entropy_backward_cuda(const float* grad_entropy, const void* logits, alter_dtype dtype, int64_t T,
                                        int64_t V, int64_t row_stride, const float* entropy, const float* row_max,
                                        const float* log_sum, const float* power_sum, double q, void* grad_logits,
                                        cudaStream_t stream);

// labels [T] int64. runner_up [T] int32: v* = first argmax_{v != y} z_v, -1 for ignored
// tokens and when every other logit is -inf. A label neither ignore_index nor in [0, V)
// gives NaN loss and weight.
cudaError_t alter_ihl_forward_cuda(const void* logits, alter_dtype dtype, int64_t T, int64_t V, int64_t row_stride,
                                   const int64_t* labels, double q, double threshold, double high_entropy_weight,
                                   int64_t ignore_index, float* loss, float* entropy, float* weight, float* row_max,
                                   float* log_sum, int32_t* runner_up, cudaStream_t stream);

// runner_up as ihl_forward wrote it. A label neither ignore_index nor in [0, V), or a
// runner_up outside [-1, V), gives a NaN gradient row.
cudaError_t alter_ihl_backward_cuda(const float* grad_loss, const void* logits, alter_dtype dtype, int64_t T,
                                    int64_t V, int64_t row_stride, const int64_t* labels, const float* row_max,
                                    const float* log_sum, const int32_t* runner_up, int64_t ignore_index,
                                    void* grad_logits, cudaStream_t stream);

// Most experts moe_align takes (its per-expert tables live in shared memory).
#define ALTER_MOE_ALIGN_MAX_EXPERTS 4096

// experts: numel int32 values (contiguous); a value outside [0, num_experts) is left out
// like -1. sorted_ids [max_blocks * block_m], block_expert [max_blocks], num_padded [1].
cudaError_t alter_moe_align_cuda(const int32_t* experts, int64_t numel, int64_t num_experts, int64_t block_m,
                                 int64_t max_blocks, int32_t* sorted_ids, int32_t* block_expert,
                                 int32_t* num_padded, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
