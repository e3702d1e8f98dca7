// The small set of CUDA features the fastalign CUDA kernels are written against, so that one
// kernel source compiles with nvcc (real CUDA) and with a host C++ compiler (the emulation in
// host_emulation.h, run by the tests on the CPU). Kernels use only what is defined here:
// FA_GLOBAL / FA_DEVICE functions, fa_thread_x() ... fa_grid_y(), FA_SHARED arrays (declared
// unconditionally at the top of a kernel, in the same order by every thread), fa_syncthreads(),
// fa_shfl_xor / fa_ballot on full warps, fa_atomic_add, and the bit helpers fa_float_as_uint and
// fa_popc. Host code launches a kernel with
// FA_LAUNCH(kernel, grid, block, args...) from launch.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "../ranking.h"

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#define FA_GLOBAL __global__
#define FA_DEVICE __device__ __forceinline__
#define FA_SHARED(type, name, count) __shared__ __align__(32) type name[count]

using fa_dim3 = dim3;
FA_DEVICE int fa_thread_x() { return threadIdx.x; }
FA_DEVICE int fa_thread_y() { return threadIdx.y; }
FA_DEVICE int fa_block_x() { return blockIdx.x; }
FA_DEVICE int fa_block_y() { return blockIdx.y; }
FA_DEVICE int fa_block_dim_x() { return blockDim.x; }
FA_DEVICE int fa_block_dim_y() { return blockDim.y; }
FA_DEVICE int fa_grid_x() { return gridDim.x; }
FA_DEVICE int fa_grid_y() { return gridDim.y; }
FA_DEVICE void fa_syncthreads() { __syncthreads(); }
FA_DEVICE float fa_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
FA_DEVICE uint32_t fa_ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
FA_DEVICE float fa_atomic_add(float* p, float v) { return atomicAdd(p, v); }
FA_DEVICE uint32_t fa_float_as_uint(float x) { return __float_as_uint(x); }
FA_DEVICE int fa_popc(uint32_t bits) { return __popc(bits); }
FA_DEVICE int fa_atomic_add(int* p, int v) { return atomicAdd(p, v); }
FA_DEVICE float fa_rsqrt(float x) { return rsqrtf(x); }
FA_DEVICE float fa_exp(float x) { return __expf(x); }
FA_DEVICE float fa_log(float x) { return __logf(x); }

#else  // host emulation

#include "host_emulation.h"

#define FA_GLOBAL inline
#define FA_DEVICE inline
#define FA_SHARED(type, name, count) type* name = fa_emu::shared_array<type>(count)

using fa_dim3 = fa_emu::Dim3;
inline int fa_thread_x() { return fa_emu::ctx().thread_x; }
inline int fa_thread_y() { return fa_emu::ctx().thread_y; }
inline int fa_block_x() { return fa_emu::ctx().block_x; }
inline int fa_block_y() { return fa_emu::ctx().block_y; }
inline int fa_block_dim_x() { return fa_emu::ctx().block_dim.x; }
inline int fa_block_dim_y() { return fa_emu::ctx().block_dim.y; }
inline int fa_grid_x() { return fa_emu::ctx().grid_dim.x; }
inline int fa_grid_y() { return fa_emu::ctx().grid_dim.y; }
inline void fa_syncthreads() { fa_emu::syncthreads(); }
inline float fa_shfl_xor(float v, int mask) { return fa_emu::shfl_xor(v, mask); }
inline uint32_t fa_ballot(bool p) { return fa_emu::ballot(p); }
template <typename V>
inline V fa_atomic_add(V* p, V v) { return fa_emu::atomic_add(p, v); }
inline uint32_t fa_float_as_uint(float x) { return fa_emu::float_as_uint(x); }
inline int fa_popc(uint32_t bits) { return fa_emu::popc(bits); }
inline float fa_rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float fa_exp(float x) { return std::exp(x); }
inline float fa_log(float x) { return std::log(x); }

#endif

constexpr int kWarpSize = 32;

// Linear thread index within the block and the thread count of the block.
FA_DEVICE int fa_thread_linear() { return fa_thread_y() * fa_block_dim_x() + fa_thread_x(); }
FA_DEVICE int fa_block_threads() { return fa_block_dim_x() * fa_block_dim_y(); }

// Sum over the 32 lanes of a warp; every lane gets the total.
FA_DEVICE float fa_warp_sum(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v += fa_shfl_xor(v, mask);
  return v;
}

// Maximum over the 32 lanes, a NaN when any lane holds one (as torch.max; fmaxf would drop it).
FA_DEVICE float fa_warp_max(float v) {
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    v = fastalign::nan_max(v, fa_shfl_xor(v, mask));
  }
  return v;
}

// Sum (is_max false) or max (NaN if any is) over the whole block; every thread gets it. `scratch`
// holds at least 32 floats of shared memory; the block has a multiple of 32 threads.
FA_DEVICE float fa_block_reduce(float v, float* scratch, bool is_max) {
  const int tid = fa_thread_linear();
  const int warps = fa_block_threads() / kWarpSize;
  v = is_max ? fa_warp_max(v) : fa_warp_sum(v);
  fa_syncthreads();  // scratch may still be read by a previous reduction
  if (tid % kWarpSize == 0) scratch[tid / kWarpSize] = v;
  fa_syncthreads();
  float total = scratch[0];
  for (int w = 1; w < warps; ++w) {
    total = is_max ? fastalign::nan_max(total, scratch[w]) : total + scratch[w];
  }
  return total;
}
