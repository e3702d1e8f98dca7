// Host-side launch of the tiled GEMM of tile_gemm.cuh, shared by every operator's host code.
// FA_LAUNCH (launch.h) decides whether it runs on the GPU or in the host emulation.
#pragma once

#include "launch.h"
#include "tile_gemm.cuh"

namespace fastalign_cuda {

inline int ceil_div(long a, long b) { return static_cast<int>((a + b - 1) / b); }

// out (m x n, row-major) = scale * A B with A(i, k) = a[i * a_sm + k * a_sk] etc.
inline void strided_gemm(const float* a, const float* b, float* out, int m, int n, int k,
                         long a_sm, long a_sk, long b_sk, long b_sn, float scale) {
  const fa_dim3 grid(ceil_div(n, kTileN), ceil_div(m, kTileM));
  FA_LAUNCH(strided_gemm_kernel, grid, fa_dim3(kGemmThreads), a, b, out, m, n, k, a_sm, a_sk,
            b_sk, b_sn, static_cast<long>(n), scale);
}

}  // namespace fastalign_cuda
