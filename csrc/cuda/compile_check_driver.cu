// Instantiates every CUDA kernel of csrc/cuda without torch headers, for the nvcc compile check
// (fastalign/kernels/cuda_compile_check.py): registers, shared memory, spills, tensor cores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dimension_correlation.cuh"
#include "sparse_spatial.cuh"

namespace fastalign_cuda {

#define FA_INSTANTIATE(T)                                                                    \
  template __global__ void column_stats_kernel<T>(const T*, const T*, int, int, float, float*, \
                                                  float*, int*);                             \
  template __global__ void std_backward_kernel<T>(const float*, const float*, const float*, int, \
                                                  int, T*, T*);
FA_INSTANTIATE(float)
FA_INSTANTIATE(__half)
FA_INSTANTIATE(__nv_bfloat16)

#define FA_INSTANTIATE_SPARSE_SPATIAL(T)                                                        \
  template __global__ void normalize_rows_kernel<T>(const T*, const T*, int, int, float*, float*, \
                                                    float*, int*);                               \
  template __global__ void normalize_backward_kernel<T>(const float*, const float*, const float*, \
                                                        int, int, int, T*, T*);
FA_INSTANTIATE_SPARSE_SPATIAL(float)
FA_INSTANTIATE_SPARSE_SPATIAL(__half)
FA_INSTANTIATE_SPARSE_SPATIAL(__nv_bfloat16)

}  // namespace fastalign_cuda
