// CPU kernel of moe_align: groups the (token, slot) pairs of a top-K routing by expert so
// the grouped matmuls can take one expert per block of block_m rows. A stable counting
// sort: count per expert, padded prefix sum, scatter in slot order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "op_checks.h"

namespace alter {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> moe_align(const Tensor& experts, int64_t num_experts, int64_t block_m) {
  const MoeAlignSizes sizes = check_moe_align(experts, num_experts, block_m);
  const Tensor flat = experts.contiguous();
  const int32_t* expert_of = flat.const_data_ptr<int32_t>();
  const int64_t numel = sizes.numel;

  std::vector<int64_t> count(num_experts, 0);
  for (int64_t i = 0; i < numel; ++i) {
    const int32_t e = expert_of[i];
    TORCH_CHECK_VALUE(e >= -1 && e < num_experts, "moe_align: experts must hold values in [-1, num_experts = ",
                      num_experts, "), got ", e, " at flat slot ", i);
    if (e >= 0) ++count[e];
  }

  auto i32 = experts.options().dtype(at::kInt);
  Tensor sorted_ids = at::full({sizes.max_blocks * block_m}, static_cast<int32_t>(numel), i32);
  Tensor block_expert = at::full({sizes.max_blocks}, -1, i32);
  int32_t* ids = sorted_ids.mutable_data_ptr<int32_t>();
  int32_t* block_of = block_expert.mutable_data_ptr<int32_t>();

  std::vector<int64_t> cursor(num_experts);  // next free position of each expert's group
  int64_t offset = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    cursor[e] = offset;
    const int64_t padded = (count[e] + block_m - 1) / block_m * block_m;
    std::fill(block_of + offset / block_m, block_of + (offset + padded) / block_m, static_cast<int32_t>(e));
    offset += padded;
  }
  for (int64_t i = 0; i < numel; ++i) {
    if (expert_of[i] >= 0) ids[cursor[expert_of[i]]++] = static_cast<int32_t>(i);
  }
  Tensor num_padded = at::full({1}, static_cast<int32_t>(offset), i32);
  return {sorted_ids, block_expert, num_padded};
}

}  // namespace

TORCH_LIBRARY_IMPL(alter_kernels, CPU, m) { m.impl("moe_align", &moe_align); }

}  // namespace alter
