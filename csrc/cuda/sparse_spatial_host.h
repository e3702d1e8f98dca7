// Host side of the CUDA sparse spatial loss: checks, workspaces and the kernel launches. Shared
// by the nvcc build (sparse_spatial.cu, CUDA tensors) and the host emulation
// (csrc/emulation/sparse_spatial.cpp, CPU tensors): FA_LAUNCH decides where the kernels run.
// Both kinds go through one N x N x D product P: inter D = P - P^T with P = V U^T, intra
// D = P + P^T with P = (V - U)(V + U)^T / 2 (= V V^T - U U^T, exactly 0 where U = V).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "../checks/sparse_spatial.h"
#include "../option_codes.h"
#include "gemm_host.h"
#include "sparse_spatial.cuh"

namespace fastalign_cuda {

// The schema fastalign::sparse_spatial_loss_forward (csrc/schemas.h), with the checks of the CPU
// op; the CUDA kernels take float32, float16 and bfloat16. Non-finite inputs are not looked for
// (reading a flag back would cost a device synchronisation; the Python layer checks when asked
// to): a NaN or an infinity gives a NaN loss and gradients, as the reference.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_spatial_loss_forward(
    const at::Tensor& img_in, const at::Tensor& txt_in, const at::Tensor& alpha_in, int64_t kind,
    int64_t select, int64_t k, double temperature, bool largest, bool need_grad) {
  fastalign::checks::check_sparse_spatial_arguments(fastalign::checks::Kernels::kCuda, img_in,
                                                    txt_in, alpha_in, kind, select, k,
                                                    temperature);
  const auto dtype = img_in.scalar_type();
  const int64_t rows = img_in.size(0);
  const at::Tensor img = img_in.contiguous(), txt = txt_in.contiguous();
  const int n = static_cast<int>(rows), d = static_cast<int>(img.size(1));
  const bool inter = kind == fastalign::SpatialKind::kInter;
  const auto f32 = img.options().dtype(at::kFloat);

  // [u, v] per row; for intra also [v - u, v + u], the operands of P.
  at::Tensor normalized = at::empty({n, 2 * d}, f32);
  at::Tensor sum_diff = inter ? at::Tensor() : at::empty({n, 2 * d}, f32);
  at::Tensor norms = at::empty({2, n}, f32);
  float* const w = normalized.data_ptr<float>();
  float* const sd = inter ? nullptr : sum_diff.data_ptr<float>();
  FA_DISPATCH(dtype, "normalize_rows", [&] {
    FA_LAUNCH(normalize_rows_kernel<scalar_t>, fa_dim3(n), fa_dim3(kRowThreads),
              img.data_ptr<scalar_t>(), txt.data_ptr<scalar_t>(), n, d, w, sd,
              norms.data_ptr<float>());
  });

  // D (n x n), later Gamma and Omega in place.
  at::Tensor discrepancy = at::empty({n, n}, f32);
  float* const dp = discrepancy.data_ptr<float>();
  const long ld = 2L * d;
  if (inter) {  // P(i, j) = v_i . u_j
    strided_gemm(w + d, w, dp, n, n, d, ld, 1, 1, ld, 1.0f);
  } else {  // P(i, j) = (v_i - u_i) . (v_j + u_j) / 2
    strided_gemm(sd, sd + d, dp, n, n, d, ld, 1, 1, ld, 0.5f);
  }
  const float mirror_sign = inter ? -1.0f : 1.0f;
  const fa_dim3 pair_grid(ceil_div(n, kPairTile), ceil_div(n, kPairTile));
  const fa_dim3 pair_block(kPairTile, kPairRows);
  FA_LAUNCH(add_transpose_kernel, pair_grid, pair_block, dp, n, mirror_sign);

  const at::Tensor alpha = alpha_in.to(at::kFloat).contiguous();
  at::Tensor row_loss = at::empty({n}, f32);
  at::Tensor grad_alpha = need_grad ? at::empty({n}, f32) : at::Tensor();
  FA_LAUNCH(select_rows_kernel, fa_dim3(n), fa_dim3(kRowThreads), dp, alpha.data_ptr<float>(), n,
            static_cast<int>(select), static_cast<int>(k), static_cast<float>(1.0 / temperature),
            largest, need_grad, row_loss.data_ptr<float>(),
            need_grad ? grad_alpha.data_ptr<float>() : nullptr);
  const at::Tensor loss = (row_loss.sum(at::kDouble) / n).to(dtype);
  if (!need_grad) {  // fresh empties: the outputs of a custom op must not alias
    return {loss, img.new_empty({0}), img.new_empty({0}), img.new_empty({0})};
  }

  // Omega = Gamma + sign Gamma^T; Omega [U | V] holds (inter) -dL/dU in its V half and dL/dV
  // in its U half, (intra) -dL/dU in its U half and dL/dV in its V half.
  FA_LAUNCH(add_transpose_kernel, pair_grid, pair_block, dp, n, mirror_sign);
  at::Tensor grad_normalized = at::empty({n, 2 * d}, f32);
  strided_gemm(dp, w, grad_normalized.data_ptr<float>(), n, 2 * d, n, n, 1, ld, 1, 1.0f);
  discrepancy.reset();
  at::Tensor grad_img = at::empty_like(img), grad_txt = at::empty_like(txt);
  FA_DISPATCH(dtype, "normalize_backward", [&] {
    FA_LAUNCH(normalize_backward_kernel<scalar_t>, fa_dim3(n, 2), fa_dim3(kRowThreads), w,
              norms.data_ptr<float>(), grad_normalized.data_ptr<float>(), n, d, inter ? 1 : 0,
              grad_img.data_ptr<scalar_t>(), grad_txt.data_ptr<scalar_t>());
  });
  return {loss, grad_img, grad_txt, grad_alpha.to(dtype)};
}

}  // namespace fastalign_cuda
