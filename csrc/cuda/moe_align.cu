// moe_align on the GPU: the exact output of the CPU kernel (a stable counting sort of the
// flat slots by expert), in one block: per-expert counts in shared memory, a padded
// prefix sum, then a scatter tile by tile in which each slot's position is its expert's
// cursor plus the number of same-expert slots before it in the tile (lanes below it in
// its warp by __match_any_sync, then earlier warps through a per-warp count table).
// T*K is small (tokens times top-k), so one block keeps it simple and deterministic.
#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kSharedInts = 48 * 1024 / 4;  // the default dynamic shared memory limit

__global__ void moe_align_kernel(const int32_t* __restrict__ experts, int32_t numel, int32_t num_experts,
                                 int32_t block_m, int32_t padded_len, int32_t* __restrict__ sorted_ids,
                                 int32_t* __restrict__ block_expert, int32_t* __restrict__ num_padded) {
  extern __shared__ int32_t shared[];
  int32_t* group_end = shared;                     // [N] end of each expert's padded group
  int32_t* cursor = shared + num_experts;          // [N] count, then next free position
  int32_t* warp_count = shared + 2 * num_experts;  // [warps][N] slots per expert in each warp of a tile
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;

  for (int e = tid; e < num_experts; e += blockDim.x) cursor[e] = 0;
  __syncthreads();
  for (int i = tid; i < numel; i += blockDim.x) {
    const int32_t e = experts[i];
    if (e >= 0 && e < num_experts) atomicAdd(&cursor[e], 1);
  }
  __syncthreads();
  if (tid == 0) {
    int32_t offset = 0;
    for (int e = 0; e < num_experts; ++e) {
      const int32_t count = cursor[e];
      cursor[e] = offset;
      offset += (count + block_m - 1) / block_m * block_m;
      group_end[e] = offset;
    }
    *num_padded = offset;
  }
  __syncthreads();

  const int32_t used = group_end[num_experts - 1];
  for (int i = tid; i < padded_len; i += blockDim.x) sorted_ids[i] = numel;
  for (int b = tid; b < padded_len / block_m; b += blockDim.x) {
    const int32_t pos = b * block_m;
    int32_t expert = -1;
    if (pos < used) {  // first expert whose group ends after pos (empty groups end where they start)
      int lo = 0, hi = num_experts - 1;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (group_end[mid] > pos) hi = mid; else lo = mid + 1;
      }
      expert = lo;
    }
    block_expert[b] = expert;
  }
  __syncthreads();  // the padding must land before the scatter overwrites it

  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = 0; base < numel; base += blockDim.x) {  // uniform trip count: every thread syncs
    const int i = base + tid;
    int32_t e = i < numel ? experts[i] : -1;
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
  moe_align_kernel<<<1, warps * 32, shared_bytes, stream>>>(
      experts, static_cast<int32_t>(numel), static_cast<int32_t>(num_experts), static_cast<int32_t>(block_m),
      static_cast<int32_t>(max_blocks * block_m), sorted_ids, block_expert, num_padded);
  return cudaGetLastError();
}
