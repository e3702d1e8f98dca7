// CUDA kernels of the dimension-correlation loss. column_stats standardises the
// columns of a and b into float32 workspaces (one block per 32 columns of one input, 8 row
// phases); C = A^T B / N, dL/dA = B G^T / N and dL/dB = A G / N run through the tensor-core
// strided_gemm_kernel; the loss and G = dL/dC come from C elementwise (barlow) or with the
// row and column log-sum-exps (softmax); std_backward maps dL/dA_hat back through the
// standardisation, column by column like column_stats.
#pragma once

#include "device_api.h"
#include "tile_gemm.cuh"

namespace fastalign_cuda {

constexpr int kColumns = 32, kRowPhases = 8, kLineThreads = 256;

// grid (ceil(d / 32), 2): blockIdx.y 0 standardises a, 1 b; block (32, 8). A NaN or an
// infinity in a column makes its mean, and so the whole standardised column, NaN: C, the loss
// and the gradients then hold NaN as the reference's do (no check here: it would cost the host
// a device synchronisation).
template <typename T>
FA_GLOBAL void column_stats_kernel(const T* __restrict__ a, const T* __restrict__ b, int n, int d,
                                   float eps, float* __restrict__ standardized,
                                   float* __restrict__ rstd) {
  FA_SHARED(float, partial, kRowPhases * (kColumns + 1));
  const int which = fa_block_y();
  const T* x = which == 0 ? a : b;
  float* xs = standardized + static_cast<long>(which) * n * d;
  const int tx = fa_thread_x(), ty = fa_thread_y();
  const int col = fa_block_x() * kColumns + tx;
  const bool valid = col < d;
  float sum = 0.0f;
  if (valid) {
    for (int r = ty; r < n; r += kRowPhases) {
      sum += static_cast<float>(x[static_cast<long>(r) * d + col]);
    }
  }
  partial[ty * (kColumns + 1) + tx] = sum;
  fa_syncthreads();
  float mean = 0.0f;
  for (int y = 0; y < kRowPhases; ++y) mean += partial[y * (kColumns + 1) + tx];
  mean /= n;
  fa_syncthreads();
  float squares = 0.0f;
  if (valid) {
    for (int r = ty; r < n; r += kRowPhases) {
      const float c = static_cast<float>(x[static_cast<long>(r) * d + col]) - mean;
      squares += c * c;
    }
  }
  partial[ty * (kColumns + 1) + tx] = squares;
  fa_syncthreads();
  float variance = 0.0f;
  for (int y = 0; y < kRowPhases; ++y) variance += partial[y * (kColumns + 1) + tx];
  const float r_std = fa_rsqrt(variance / n + eps);
  if (valid) {
    for (int r = ty; r < n; r += kRowPhases) {
      const long i = static_cast<long>(r) * d + col;
      xs[i] = (static_cast<float>(x[i]) - mean) * r_std;
    }
    if (ty == 0) rstd[which * d + col] = r_std;
  }
}

// Barlow: the loss terms of C (d x d) summed per block into partials[blockIdx.x], and C
// overwritten by G = dL/dC. grid-stride, block kLineThreads.
FA_GLOBAL void barlow_kernel(float* __restrict__ c_to_g, int d, float off_diagonal_weight,
                             float* __restrict__ partials) {
  FA_SHARED(float, scratch, kWarpSize);
  float loss = 0.0f;
  const long total = static_cast<long>(d) * d;
  const long step = static_cast<long>(fa_grid_x()) * kLineThreads;
  for (long e = static_cast<long>(fa_block_x()) * kLineThreads + fa_thread_x(); e < total;
       e += step) {
    const float c = c_to_g[e];
    if (e / d == e % d) {
      loss += (1.0f - c) * (1.0f - c);
      c_to_g[e] = -2.0f * (1.0f - c);
    } else {
      loss += off_diagonal_weight * c * c;
      c_to_g[e] = 2.0f * off_diagonal_weight * c;
    }
  }
  const float block_loss = fa_block_reduce(loss, scratch, false);
  if (fa_thread_x() == 0) partials[fa_block_x()] = block_loss;
}

// lse[line] = log sum_j exp(c[line * line_stride + j * element_stride] / tau): one block per
// line (rows: strides d, 1; columns: 1, d).
FA_GLOBAL void line_lse_kernel(const float* __restrict__ c, int d, long line_stride,
                               long element_stride, float inv_tau, float* __restrict__ lse) {
  FA_SHARED(float, scratch, kWarpSize);
  const float* line = c + fa_block_x() * line_stride;
  float m = -INFINITY;
  for (int j = fa_thread_x(); j < d; j += kLineThreads) {
    m = fastalign::nan_max(m, line[j * element_stride]);  // a NaN in the line: lse NaN
  }
  m = fa_block_reduce(m, scratch, true) * inv_tau;
  float s = 0.0f;
  for (int j = fa_thread_x(); j < d; j += kLineThreads) {
    s += fa_exp(line[j * element_stride] * inv_tau - m);
  }
  s = fa_block_reduce(s, scratch, false);
  if (fa_thread_x() == 0) lse[fa_block_x()] = m + fa_log(s);
}

// Softmax: G_kl = (P_row_kl + P_col_kl - 2 [k == l]) / (2 d tau) overwrites C; the loss terms
// -(2 C_kk / tau - row_lse_k - col_lse_k) / (2 d) go into partials. grid-stride.
FA_GLOBAL void softmax_kernel(float* __restrict__ c_to_g, int d, float inv_tau,
                              const float* __restrict__ row_lse, const float* __restrict__ col_lse,
                              float* __restrict__ partials) {
  FA_SHARED(float, scratch, kWarpSize);
  float loss = 0.0f;
  const long total = static_cast<long>(d) * d;
  const long step = static_cast<long>(fa_grid_x()) * kLineThreads;
  const float scale = 0.5f * inv_tau / d;
  for (long e = static_cast<long>(fa_block_x()) * kLineThreads + fa_thread_x(); e < total;
       e += step) {
    const int k = static_cast<int>(e / d), l = static_cast<int>(e % d);
    const float z = c_to_g[e] * inv_tau;
    float g = fa_exp(z - row_lse[k]) + fa_exp(z - col_lse[l]);
    if (k == l) {
      g -= 2.0f;
      loss -= (2.0f * z - row_lse[k] - col_lse[k]) * 0.5f / d;
    }
    c_to_g[e] = g * scale;
  }
  const float block_loss = fa_block_reduce(loss, scratch, false);
  if (fa_thread_x() == 0) partials[fa_block_x()] = block_loss;
}

// dL/dx = rstd (g - mean(g) - x_hat mean(g x_hat)) per column, for a (blockIdx.y 0) and b (1).
// grid (ceil(d / 32), 2), block (32, 8).
template <typename T>
FA_GLOBAL void std_backward_kernel(const float* __restrict__ grad_standardized,
                                   const float* __restrict__ standardized,
                                   const float* __restrict__ rstd, int n, int d,
                                   T* __restrict__ grad_a, T* __restrict__ grad_b) {
  FA_SHARED(float, partial_g, kRowPhases * (kColumns + 1));
  FA_SHARED(float, partial_gx, kRowPhases * (kColumns + 1));
  const int which = fa_block_y();
  const long offset = static_cast<long>(which) * n * d;
  const float* g = grad_standardized + offset;
  const float* xs = standardized + offset;
  T* out = which == 0 ? grad_a : grad_b;
  const int tx = fa_thread_x(), ty = fa_thread_y();
  const int col = fa_block_x() * kColumns + tx;
  const bool valid = col < d;
  float sum_g = 0.0f, sum_gx = 0.0f;
  if (valid) {
    for (int r = ty; r < n; r += kRowPhases) {
      const long i = static_cast<long>(r) * d + col;
      sum_g += g[i];
      sum_gx += g[i] * xs[i];
    }
  }
  partial_g[ty * (kColumns + 1) + tx] = sum_g;
  partial_gx[ty * (kColumns + 1) + tx] = sum_gx;
  fa_syncthreads();
  float mean_g = 0.0f, mean_gx = 0.0f;
  for (int y = 0; y < kRowPhases; ++y) {
    mean_g += partial_g[y * (kColumns + 1) + tx];
    mean_gx += partial_gx[y * (kColumns + 1) + tx];
  }
  mean_g /= n;
  mean_gx /= n;
  if (valid) {
    const float r_std = rstd[which * d + col];
    for (int r = ty; r < n; r += kRowPhases) {
      const long i = static_cast<long>(r) * d + col;
      out[i] = static_cast<T>(r_std * (g[i] - mean_g - xs[i] * mean_gx));
    }
  }
}

}  // namespace fastalign_cuda
