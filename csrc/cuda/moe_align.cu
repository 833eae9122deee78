// moe_align on the GPU: the exact output of the CPU kernel (a stable counting sort of the
// flat slots by expert). Each block owns a contiguous range of the slots (one block up to
// kSlotsPerBlock slots, more above): it counts every slot's expert in shared memory (all
// slots, for the padded group starts, and those before its range, for its cursors), so
// the blocks need no scratch memory and no synchronisation with each other. Each expert's
// block range of block_expert and its padding in sorted_ids are written directly, by one
// block. The scatter goes tile by tile: a slot's position is its expert's cursor plus the
// number of same-expert slots before it in the tile (lanes below it in its warp by
// __match_any_sync, then earlier warps through a per-warp count table).
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kSharedInts = 48 * 1024 / 4;  // the default dynamic shared memory limit
// Slots per block above which the slots are split over several blocks. Every block reads
// all the experts (T*K int32, from L2), so the blocks are capped at kMaxBlocks.
constexpr int64_t kSlotsPerBlock = 4096;
constexpr int64_t kMaxBlocks = 64;

__global__ void moe_align_kernel(const int32_t* __restrict__ experts, int32_t numel, int32_t num_experts,
                                 int32_t block_m, int32_t padded_len, int32_t* __restrict__ sorted_ids,
                                 int32_t* __restrict__ block_expert, int32_t* __restrict__ num_padded) {
  extern __shared__ int32_t shared[];
  int32_t* group_end = shared;                     // [N] end of each expert's padded group
  int32_t* cursor = shared + num_experts;          // [N] slots before this block's range, then next free position
  int32_t* warp_count = shared + 2 * num_experts;  // [warps][N] slots per expert in each warp of a tile
  int32_t* count = warp_count;                     // [N] slots per expert (all blocks), until the scatter
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  const int32_t per_block = (numel + gridDim.x - 1) / gridDim.x;
  const int32_t begin = min(numel, static_cast<int32_t>(blockIdx.x) * per_block);
  const int32_t end = min(numel, begin + per_block);

  for (int e = tid; e < num_experts; e += blockDim.x) count[e] = cursor[e] = 0;
  __syncthreads();
  for (int i = tid; i < numel; i += blockDim.x) {
    const int32_t e = experts[i];
    if (e >= 0 && e < num_experts) {
      atomicAdd(&count[e], 1);
      if (i < begin) atomicAdd(&cursor[e], 1);
    }
  }
  __syncthreads();
  if (tid == 0) {
    int32_t offset = 0;
    for (int e = 0; e < num_experts; ++e) {
      cursor[e] += offset;
      offset += (count[e] + block_m - 1) / block_m * block_m;
      group_end[e] = offset;
    }
    if (blockIdx.x == 0) *num_padded = offset;
  }
  __syncthreads();

  // Each expert's blocks and its padding, by one warp of one block: no slot lands there.
  const int32_t used = group_end[num_experts - 1];
  for (int e = blockIdx.x * warps + warp; e < num_experts; e += gridDim.x * warps) {
    const int32_t start = e == 0 ? 0 : group_end[e - 1];
    for (int32_t b = start / block_m + lane; b < group_end[e] / block_m; b += 32) block_expert[b] = e;
    for (int32_t i = start + count[e] + lane; i < group_end[e]; i += 32) sorted_ids[i] = numel;
  }
  for (int32_t i = used + blockIdx.x * blockDim.x + tid; i < padded_len; i += gridDim.x * blockDim.x) {
    sorted_ids[i] = numel;
    if (i % block_m == 0) block_expert[i / block_m] = -1;
  }
  __syncthreads();  // count is dead: the scatter reuses its memory

  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = begin; base < end; base += blockDim.x) {  // uniform trip count: every thread syncs
    const int i = base + tid;
    int32_t e = i < end ? experts[i] : -1;
    if (e >= num_experts || e < 0) e = -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank_in_warp = __popc(peers & lanes_below);
    for (int k = tid; k < warps * num_experts; k += blockDim.x) warp_count[k] = 0;
    __syncthreads();
    if (e >= 0 && rank_in_warp == 0) warp_count[warp * num_experts + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int32_t pos = cursor[e] + rank_in_warp;
      for (int w = 0; w < warp; ++w) pos += warp_count[w * num_experts + e];
      sorted_ids[pos] = i;
    }
    __syncthreads();
    for (int ex = tid; ex < num_experts; ex += blockDim.x) {
      int32_t total = 0;
      for (int w = 0; w < warps; ++w) total += warp_count[w * num_experts + ex];
      cursor[ex] += total;
    }
    __syncthreads();
  }
}

}  // namespace

extern "C" cudaError_t alter_moe_align_cuda(const int32_t* experts, int64_t numel, int64_t num_experts,
                                            int64_t block_m, int64_t max_blocks, int32_t* sorted_ids,
                                            int32_t* block_expert, int32_t* num_padded, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > ALTER_MOE_ALIGN_MAX_EXPERTS || block_m < 1) return cudaErrorInvalidValue;
  // as many warps as the per-warp count table leaves room for in shared memory
  const int64_t warps_fit = kSharedInts / num_experts - 2;
  const int warps = static_cast<int>(warps_fit < kMaxThreads / 32 ? warps_fit : kMaxThreads / 32);
  const size_t shared_bytes = sizeof(int32_t) * static_cast<size_t>(num_experts) * (2 + warps);
  const int64_t wanted = (numel + kSlotsPerBlock - 1) / kSlotsPerBlock;
  const int blocks = static_cast<int>(wanted < 1 ? 1 : wanted < kMaxBlocks ? wanted : kMaxBlocks);
  moe_align_kernel<<<blocks, warps * 32, shared_bytes, stream>>>(
      experts, static_cast<int32_t>(numel), static_cast<int32_t>(num_experts), static_cast<int32_t>(block_m),
      static_cast<int32_t>(max_blocks * block_m), sorted_ids, block_expert, num_padded);
  return cudaGetLastError();
}
