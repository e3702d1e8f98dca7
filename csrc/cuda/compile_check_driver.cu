// Instantiates every CUDA kernel of csrc/cuda without torch headers, for the nvcc compile check
// (fastalign/kernels/cuda_compile_check.py): registers, shared memory, spills, tensor cores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dimension_correlation.cuh"
#include "prototypes.cuh"
#include "region_word.cuh"
#include "sparse_spatial.cuh"

namespace fastalign_cuda {

#define FA_INSTANTIATE(T)                                                                    \
  template __global__ void column_stats_kernel<T>(const T*, const T*, int, int, float, float*, \
                                                  float*);                                   \
  template __global__ void std_backward_kernel<T>(const float*, const float*, const float*, int, \
                                                  int, T*, T*);                          \
  template __global__ void region_word_forward_kernel<T>(const T*, const T*, const int64_t*,     \
                                                         const int64_t*, int, int, int, int, int, \
                                                         RegionWordOptions, PairOutputs);      \
  template __global__ void region_word_backward_kernel<T>(                                    \
      const T*, const T*, const int64_t*, const int64_t*, int, int, int, int, TokenCoefficients, \
      TokenCoefficients, int, int, RegionWordOptions, float*);
FA_INSTANTIATE(float)
FA_INSTANTIATE(__half)
FA_INSTANTIATE(__nv_bfloat16)

#define FA_INSTANTIATE_PROTOTYPES(T)                                                             \
  template __global__ void prototype_scaled_rows_kernel<T>(const T*, int, int, int, float,      \
                                                           float*, float*);                     \
  template __global__ void prototype_row_normalize_kernel<T>(float*, int, int, const float*,    \
                                                             float*, T*);                       \
  template __global__ void prototype_row_argmax_kernel<T>(const float*, int, int, T*);          \
  template __global__ void prototype_softmax_grad_kernel<T>(const T*, const T*, int, int, float, \
                                                            float*);                            \
  template __global__ void prototype_unit_rows_backward_kernel<T>(                              \
      const float*, const float*, const float*, int, int, int, T*);                             \
  template __global__ void prototype_ema_kernel<T>(const T*, float*, const float*, int, int,    \
                                                   float, int, T*);                             \
  template __global__ void prototype_topk_scan_kernel<T>(const T*, const T*, const float*,      \
                                                         const float*, int, int, int, int, int, \
                                                         float*, float*, int*);                 \
  template __global__ void prototype_topk_mix_finish_kernel<T>(                                 \
      const T*, const float*, const float*, const int*, int, int, int, int, float, float*,      \
      int64_t*, T*, T*);                                                                        \
  template __global__ void prototype_topk_mix_backward_kernel<T>(                               \
      const T*, const T*, const T*, const T*, const int64_t*, const T*, int, int, int, int,     \
      float, float*, T*, float*, float*);
FA_INSTANTIATE_PROTOTYPES(float)
FA_INSTANTIATE_PROTOTYPES(__half)
FA_INSTANTIATE_PROTOTYPES(__nv_bfloat16)
#define FA_INSTANTIATE_SPARSE_SPATIAL(T)                                                        \
  template __global__ void normalize_rows_kernel<T>(const T*, const T*, int, int, float*, float*, \
                                                    float*);                                     \
  template __global__ void normalize_backward_kernel<T>(const float*, const float*, const float*, \
                                                        int, int, int, T*, T*);
FA_INSTANTIATE_SPARSE_SPATIAL(float)
FA_INSTANTIATE_SPARSE_SPATIAL(__half)
FA_INSTANTIATE_SPARSE_SPATIAL(__nv_bfloat16)

}  // namespace fastalign_cuda
