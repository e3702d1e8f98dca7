// FA_LAUNCH(kernel, grid, block, args...): a real launch on the current CUDA stream under nvcc,
// fa_emu::launch on the CPU otherwise. Host code only (needs torch's c10 under nvcc).
#pragma once

#include <ATen/Dispatch.h>

#include "device_api.h"

// FA_DISPATCH(TYPE, NAME, lambda): the dtypes every CUDA kernel takes, float32, float16 and
// bfloat16 (csrc/checks/common.h refuses the others with a clear error first).
#define FA_DISPATCH(TYPE, NAME, ...)                           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#define FA_LAUNCH(kernel, grid, block, ...)                                         \
  do {                                                                              \
    kernel<<<(grid), (block), 0, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                 \
  } while (0)
#else
#define FA_LAUNCH(kernel, grid, block, ...) \
  fa_emu::launch((grid), (block), [&]() { kernel(__VA_ARGS__); })
#endif
