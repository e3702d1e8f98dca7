// Host side of the CUDA dimension-correlation loss: checks, workspaces and the kernel launches.
// Shared by the nvcc build (dimension_correlation.cu, CUDA tensors) and the host emulation
// (csrc/emulation/dimension_correlation.cpp, CPU tensors): FA_LAUNCH decides where the kernels run.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "../checks/dimension_correlation.h"
#include "../option_codes.h"
#include "dimension_correlation.cuh"
#include "gemm_host.h"

namespace fastalign_cuda {

// The schema fastalign::dimension_correlation_loss_forward (csrc/schemas.h); the CUDA kernels
// always go through C (path auto or correlation) and compute in float32 (float64 is refused).
// Non-finite inputs are not looked for (reading a flag back would cost a device
// synchronisation; the Python layer checks when asked to): they give NaN, as the reference.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dimension_correlation_loss_forward(
    const at::Tensor& a_in, const at::Tensor& b_in, int64_t mode, double off_diagonal_weight,
    double tau, double eps, bool need_grad, int64_t path) {
  fastalign::checks::check_dimension_correlation_arguments(fastalign::checks::Kernels::kCuda, a_in,
                                                           b_in, mode, off_diagonal_weight, tau,
                                                           eps, path);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int n = static_cast<int>(a.size(0)), d = static_cast<int>(a.size(1));
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor standardized = at::empty({2, n, d}, f32);
  at::Tensor rstd = at::empty({2, d}, f32);
  at::Tensor c = at::empty({d, d}, f32);
  const fa_dim3 column_grid(ceil_div(d, kColumns), 2), column_block(kColumns, kRowPhases);
  float* const a_hat = standardized.data_ptr<float>();
  float* const b_hat = a_hat + static_cast<long>(n) * d;
  FA_DISPATCH(a.scalar_type(), "column_stats", [&] {
    FA_LAUNCH(column_stats_kernel<scalar_t>, column_grid, column_block, a.data_ptr<scalar_t>(),
              b.data_ptr<scalar_t>(), n, d, static_cast<float>(eps), a_hat,
              rstd.data_ptr<float>());
  });
  // C = A_hat^T B_hat / N: A(k, i) = a_hat[i * d + k].
  strided_gemm(a_hat, b_hat, c.data_ptr<float>(), d, d, n, 1, d, d, 1, 1.0f / n);
  const int elementwise_blocks = std::min(1024, ceil_div(static_cast<long>(d) * d, kLineThreads));
  at::Tensor partials = at::empty({elementwise_blocks}, f32);
  if (mode == fastalign::CorrelationMode::kBarlow) {
    FA_LAUNCH(barlow_kernel, fa_dim3(elementwise_blocks), fa_dim3(kLineThreads),
              c.data_ptr<float>(), d, static_cast<float>(off_diagonal_weight),
              partials.data_ptr<float>());
  } else {
    at::Tensor lse = at::empty({2, d}, f32);
    const float inv_tau = static_cast<float>(1.0 / tau);
    float* const row_lse = lse.data_ptr<float>();
    float* const col_lse = row_lse + d;
    FA_LAUNCH(line_lse_kernel, fa_dim3(d), fa_dim3(kLineThreads), c.data_ptr<float>(), d,
              static_cast<long>(d), 1L, inv_tau, row_lse);
    FA_LAUNCH(line_lse_kernel, fa_dim3(d), fa_dim3(kLineThreads), c.data_ptr<float>(), d, 1L,
              static_cast<long>(d), inv_tau, col_lse);
    FA_LAUNCH(softmax_kernel, fa_dim3(elementwise_blocks), fa_dim3(kLineThreads),
              c.data_ptr<float>(), d, inv_tau, row_lse, col_lse, partials.data_ptr<float>());
  }
  const at::Tensor loss = partials.sum(at::kDouble).to(a.scalar_type());
  if (!need_grad) {
    const auto empty = a.new_empty({0});
    return {loss, empty, empty.clone()};
  }
  // G is in c. dL/dA_hat = B_hat G^T / N: B(k, j) = G[j * d + k]; dL/dB_hat = A_hat G / N.
  at::Tensor grad_standardized = at::empty({2, n, d}, f32);
  float* const grad_a_hat = grad_standardized.data_ptr<float>();
  float* const grad_b_hat = grad_a_hat + static_cast<long>(n) * d;
  const float* g = c.data_ptr<float>();
  strided_gemm(b_hat, g, grad_a_hat, n, d, d, d, 1, 1, d, 1.0f / n);
  strided_gemm(a_hat, g, grad_b_hat, n, d, d, d, 1, d, 1, 1.0f / n);
  at::Tensor grad_a = at::empty_like(a), grad_b = at::empty_like(b);
  FA_DISPATCH(a.scalar_type(), "std_backward", [&] {
    FA_LAUNCH(std_backward_kernel<scalar_t>, column_grid, column_block, grad_a_hat, a_hat,
              rstd.data_ptr<float>(), n, d, grad_a.data_ptr<scalar_t>(),
              grad_b.data_ptr<scalar_t>());
  });
  return {loss, grad_a, grad_b};
}

}  // namespace fastalign_cuda
