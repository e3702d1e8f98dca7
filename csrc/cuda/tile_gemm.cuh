// out = scale * A B for float32 matrices given by strides (A(m, k) = a[m * a_sm + k * a_sk],
// B(k, n) = b[k * b_sk + n * b_sn]); out is row-major with leading dimension ld_out. Each block
// of 128 threads (4 warps) owns a 64 x 64 tile of out, stages 64 x 16 of A and 16 x 64 of B in
// shared memory per step, and every warp multiplies a 32 x 32 quarter. The inner tile product
// is the only part that differs between builds: FA_USE_MMA (nvcc) uses tensor cores through
// WMMA tf32 in the 3xTF32 split (a = hi + lo, a b ~ hi hi + hi lo + lo hi: float32 accuracy),
// the plain version (host emulation) a loop over the same shared tiles.
#pragma once

#include "device_api.h"

#if defined(__CUDACC__) && !defined(FA_USE_MMA)
#define FA_USE_MMA 1
#endif
#if defined(FA_USE_MMA) && FA_USE_MMA
#include <mma.h>
#endif

namespace fastalign_cuda {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kGemmThreads = 128;
constexpr int kPadA = kTileK + 4, kPadB = kTileN + 4;  // row lengths of the shared tiles

#if defined(FA_USE_MMA) && FA_USE_MMA
namespace wmma = nvcuda::wmma;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

struct WarpAccumulator {
  FragC f[2][2];
};

FA_DEVICE void accumulator_zero(WarpAccumulator& acc, int) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc.f[i][j], 0.0f);
}

template <typename Frag>
FA_DEVICE void split_tf32(Frag& hi, Frag& lo) {
  for (int t = 0; t < hi.num_elements; ++t) {
    const float x = hi.x[t];
    hi.x[t] = wmma::__float_to_tf32(x);
    lo.x[t] = wmma::__float_to_tf32(x - hi.x[t]);
  }
}

// acc += A_s[row0:row0+32, :] B_s[:, col0:col0+32] over the kTileK staged columns.
FA_DEVICE void tile_product(WarpAccumulator& acc, const float* a_s, const float* b_s, int row0,
                            int col0, int) {
  for (int k0 = 0; k0 < kTileK; k0 += 8) {
    FragA a_hi[2], a_lo[2];
    FragB b_hi[2], b_lo[2];
    for (int i = 0; i < 2; ++i) {
      wmma::load_matrix_sync(a_hi[i], a_s + (row0 + 16 * i) * kPadA + k0, kPadA);
      split_tf32(a_hi[i], a_lo[i]);
      wmma::load_matrix_sync(b_hi[i], b_s + k0 * kPadB + col0 + 16 * i, kPadB);
      split_tf32(b_hi[i], b_lo[i]);
    }
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        wmma::mma_sync(acc.f[i][j], a_lo[i], b_hi[j], acc.f[i][j]);
        wmma::mma_sync(acc.f[i][j], a_hi[i], b_lo[j], acc.f[i][j]);
        wmma::mma_sync(acc.f[i][j], a_hi[i], b_hi[j], acc.f[i][j]);
      }
    }
  }
}

FA_DEVICE void accumulator_store(const WarpAccumulator& acc, float* c_s, int row0, int col0,
                                 int) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c_s + (row0 + 16 * i) * kPadB + col0 + 16 * j, acc.f[i][j], kPadB,
                              wmma::mem_row_major);
}
#else
// Lane l owns row row0 + l of the warp's 32 x 32 quarter.
struct WarpAccumulator {
  float v[32];
};

FA_DEVICE void accumulator_zero(WarpAccumulator& acc, int) {
  for (int j = 0; j < 32; ++j) acc.v[j] = 0.0f;
}

FA_DEVICE void tile_product(WarpAccumulator& acc, const float* a_s, const float* b_s, int row0,
                            int col0, int lane) {
  for (int k = 0; k < kTileK; ++k) {
    const float a = a_s[(row0 + lane) * kPadA + k];
    for (int j = 0; j < 32; ++j) acc.v[j] += a * b_s[k * kPadB + col0 + j];
  }
}

FA_DEVICE void accumulator_store(const WarpAccumulator& acc, float* c_s, int row0, int col0,
                                 int lane) {
  for (int j = 0; j < 32; ++j) c_s[(row0 + lane) * kPadB + col0 + j] = acc.v[j];
}
#endif

// acc += A B over the k columns of A in steps of kTileK: stage(k0) writes that step's operands
// (A 64 x 16 into a_s, B 16 x 64 into b_s, zeros past the edges) with the whole block; the
// barriers keep each stage whole while the warps multiply it.
template <typename Stage>
FA_DEVICE void tile_product_over_k(WarpAccumulator& acc, const float* a_s, const float* b_s, int k,
                                   int row0, int col0, int lane, const Stage& stage) {
  for (int k0 = 0; k0 < k; k0 += kTileK) {
    stage(k0);
    fa_syncthreads();
    tile_product(acc, a_s, b_s, row0, col0, lane);
    fa_syncthreads();
  }
}

// grid (ceil(n_cols / 64), ceil(m / 64)), block kGemmThreads. static: every operator's object
// file of the extension includes this header, and a kernel that is not a template would
// otherwise be defined in each of them.
static FA_GLOBAL void strided_gemm_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                   float* __restrict__ out, int m, int n, int k, long a_sm,
                                   long a_sk, long b_sk, long b_sn, long ld_out, float scale) {
  FA_SHARED(float, a_s, kTileM * kPadA);
  FA_SHARED(float, b_s, kTileK * kPadB);
  FA_SHARED(float, c_s, kTileM * kPadB);
  const int tid = fa_thread_linear();
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
  const int tile_m = fa_block_y() * kTileM, tile_n = fa_block_x() * kTileN;
  const bool a_m_contiguous = a_sm == 1, b_n_contiguous = b_sn == 1;
  WarpAccumulator acc;
  accumulator_zero(acc, lane);
  tile_product_over_k(acc, a_s, b_s, k, row0, col0, lane, [&](int k0) {
    for (int e = tid; e < kTileM * kTileK; e += kGemmThreads) {
      const int mm = a_m_contiguous ? e % kTileM : e / kTileK;
      const int kk = a_m_contiguous ? e / kTileM : e % kTileK;
      const int gm = tile_m + mm, gk = k0 + kk;
      a_s[mm * kPadA + kk] = (gm < m && gk < k) ? a[gm * a_sm + gk * a_sk] : 0.0f;
    }
    for (int e = tid; e < kTileK * kTileN; e += kGemmThreads) {
      const int nn = b_n_contiguous ? e % kTileN : e / kTileK;
      const int kk = b_n_contiguous ? e / kTileN : e % kTileK;
      const int gn = tile_n + nn, gk = k0 + kk;
      b_s[kk * kPadB + nn] = (gn < n && gk < k) ? b[gk * b_sk + gn * b_sn] : 0.0f;
    }
  });
  accumulator_store(acc, c_s, row0, col0, lane);
  fa_syncthreads();
  for (int e = tid; e < kTileM * kTileN; e += kGemmThreads) {
    const int mm = e / kTileN, nn = e % kTileN;
    const int gm = tile_m + mm, gn = tile_n + nn;
    if (gm < m && gn < n) out[gm * ld_out + gn] = scale * c_s[mm * kPadB + nn];
  }
}

}  // namespace fastalign_cuda
