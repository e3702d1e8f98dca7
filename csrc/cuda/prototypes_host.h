// Host side of the CUDA prototype operators: checks, float32 workspaces and the kernel launches.
// Shared by the nvcc build (prototypes.cu, CUDA tensors) and the host emulation
// (csrc/emulation/prototypes.cpp, CPU tensors): FA_LAUNCH decides where the kernels run.
// Inputs are float32, float16 or bfloat16 (as for the Triton backend); every product, sum and
// exponential is float32, and results come back in the inputs' dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks/prototypes.h"
#include "../option_codes.h"
#include "gemm_host.h"
#include "prototypes.cuh"

namespace fastalign_cuda {

using fastalign::AssignMode;
using fastalign::checks::Kernels;

inline fa_dim3 prototype_row_grid(int rows) { return fa_dim3(ceil_div(rows, kPrototypeRowWarps)); }

inline fa_dim3 prototype_column_grid(int cols) {
  return fa_dim3(ceil_div(cols, kPrototypeColumns));
}

inline fa_dim3 prototype_column_block() { return fa_dim3(kPrototypeColumns, kPrototypeRowPhases); }

// out = scale x / max(|x|, eps) row by row when normalize, scale x otherwise, into a float32
// (rows, cols) out (undefined: none); norms, when not null, receives |x| of every row.
inline void prototype_scaled_rows(const at::Tensor& x, bool normalize, float scale,
                                  const at::Tensor& out, float* norms) {
  const int rows = static_cast<int>(x.size(0)), cols = static_cast<int>(x.size(1));
  float* out_data = out.defined() ? out.data_ptr<float>() : nullptr;
  FA_DISPATCH(x.scalar_type(), "prototype_scaled_rows", [&] {
    FA_LAUNCH(prototype_scaled_rows_kernel<scalar_t>, prototype_row_grid(rows),
              fa_dim3(kPrototypeRowThreads), x.data_ptr<scalar_t>(), rows, cols, normalize ? 1 : 0,
              scale, out_data, norms);
  });
}

// x itself when float32, else a float32 copy (the GEMM's inputs).
inline at::Tensor prototype_float32_copy(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  prototype_scaled_rows(x, false, 1.0f, out, nullptr);
  return out;
}

// The schema fastalign::prototype_assign_forward (csrc/schemas.h).
inline at::Tensor prototype_assign_forward(const at::Tensor& x_in, const at::Tensor& p_in,
                                           int64_t mode, double tau, int64_t iters,
                                           bool normalize) {
  fastalign::checks::check_prototype_assign_forward(Kernels::kCuda, x_in, p_in, mode, tau,
                                                    iters);
  const at::Tensor x = x_in.contiguous(), p = p_in.contiguous();
  const int n = static_cast<int>(x.size(0)), k = static_cast<int>(p.size(0));
  const int d = static_cast<int>(x.size(1));
  const auto f32 = x.options().dtype(at::kFloat);
  // 1 / tau goes into the rows of x, so the GEMM yields the logits (hard ignores the scale).
  at::Tensor x_scaled = at::empty({n, d}, f32), p_unit = at::empty({k, d}, f32);
  const float scale = mode == AssignMode::kHard ? 1.0f : static_cast<float>(1.0 / tau);
  prototype_scaled_rows(x, normalize, scale, x_scaled, nullptr);
  prototype_scaled_rows(p, normalize, 1.0f, p_unit, nullptr);
  at::Tensor out = at::empty({n, k}, x.options());
  // float32 results overwrite the logits in place (each lane reads an element, then writes it).
  const at::Tensor logits = x.scalar_type() == at::kFloat ? out : at::empty({n, k}, f32);
  float* const lg = logits.data_ptr<float>();
  strided_gemm(x_scaled.data_ptr<float>(), p_unit.data_ptr<float>(), lg, n, k, d, d, 1, 1, d, 1.0f);
  FA_DISPATCH(x.scalar_type(), "prototype_assign_forward", [&] {
    scalar_t* const o = out.data_ptr<scalar_t>();
    if (mode == AssignMode::kHard) {
      FA_LAUNCH(prototype_row_argmax_kernel<scalar_t>, prototype_row_grid(n),
                fa_dim3(kPrototypeRowThreads), lg, n, k, o);
    } else if (mode == AssignMode::kSoftmax) {
      FA_LAUNCH(prototype_row_normalize_kernel<scalar_t>, prototype_row_grid(n),
                fa_dim3(kPrototypeRowThreads), lg, n, k, nullptr, nullptr, o);
    } else {
      // Sinkhorn-Knopp in the log domain, as on the CPU: per iteration every column shifted to
      // sum to N / K, then every row to 1. Each row's shift waits in row_shift and is applied by
      // the next column step; the last row step writes exp of the result.
      at::Tensor shifts = at::zeros({n + k}, f32);
      float* const row_shift = shifts.data_ptr<float>();
      float* const col_shift = row_shift + n;
      const auto log_column_mass = static_cast<float>(std::log(static_cast<double>(n) / k));
      for (int64_t it = 0; it < iters; ++it) {
        FA_LAUNCH(prototype_sinkhorn_columns_kernel, prototype_column_grid(k),
                  prototype_column_block(), lg, n, k, row_shift, log_column_mass, col_shift);
        scalar_t* const last = it + 1 == iters ? o : nullptr;
        FA_LAUNCH(prototype_row_normalize_kernel<scalar_t>, prototype_row_grid(n),
                  fa_dim3(kPrototypeRowThreads), lg, n, k, col_shift, row_shift, last);
      }
    }
  });
  return out;
}

// The schema fastalign::prototype_assign_backward: the softmax assignment's gradients from
// G = dL/dP and P. dS = P (G - <G, P>) / tau (n x k, float32), dL/dx_unit = dS p_unit and
// dL/dp_unit = dS^T x_unit on the GEMM, then the gradient through the normalisation.
inline std::tuple<at::Tensor, at::Tensor> prototype_assign_backward(const at::Tensor& grad_in,
                                                                    const at::Tensor& assign_in,
                                                                    const at::Tensor& x_in,
                                                                    const at::Tensor& p_in,
                                                                    double tau, bool normalize) {
  fastalign::checks::check_prototype_assign_backward(Kernels::kCuda, grad_in, assign_in, x_in,
                                                     p_in, tau);
  const int64_t n = x_in.size(0), k = p_in.size(0);
  const at::Tensor grad = grad_in.to(x_in.scalar_type()).contiguous();
  const at::Tensor assign = assign_in.contiguous(), x = x_in.contiguous(), p = p_in.contiguous();
  const int rows = static_cast<int>(n), protos = static_cast<int>(k);
  const int d = static_cast<int>(x.size(1));
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor x_unit = at::empty({n, d}, f32), p_unit = at::empty({k, d}, f32);
  at::Tensor norms = at::empty({n + k}, f32);
  float* const x_norms = norms.data_ptr<float>();
  float* const p_norms = x_norms + n;
  prototype_scaled_rows(x, normalize, 1.0f, x_unit, x_norms);
  prototype_scaled_rows(p, normalize, 1.0f, p_unit, p_norms);
  at::Tensor ds = at::empty({n, k}, f32);
  FA_DISPATCH(x.scalar_type(), "prototype_softmax_grad", [&] {
    FA_LAUNCH(prototype_softmax_grad_kernel<scalar_t>, prototype_row_grid(rows),
              fa_dim3(kPrototypeRowThreads), grad.data_ptr<scalar_t>(), assign.data_ptr<scalar_t>(),
              rows, protos, static_cast<float>(1.0 / tau), ds.data_ptr<float>());
  });
  at::Tensor grad_x_unit = at::empty({n, d}, f32), grad_p_unit = at::empty({k, d}, f32);
  // dS (n x k) p_unit (k x d), and dS^T: A(k, n) = ds[n * K + k], times x_unit (n x d).
  strided_gemm(ds.data_ptr<float>(), p_unit.data_ptr<float>(), grad_x_unit.data_ptr<float>(), rows,
               d, protos, k, 1, d, 1, 1.0f);
  strided_gemm(ds.data_ptr<float>(), x_unit.data_ptr<float>(), grad_p_unit.data_ptr<float>(),
               protos, d, rows, 1, k, d, 1, 1.0f);
  at::Tensor grad_x = at::empty_like(x), grad_p = at::empty_like(p);
  FA_DISPATCH(x.scalar_type(), "prototype_unit_rows_backward", [&] {
    FA_LAUNCH(prototype_unit_rows_backward_kernel<scalar_t>, prototype_row_grid(rows),
              fa_dim3(kPrototypeRowThreads), grad_x_unit.data_ptr<float>(),
              x_unit.data_ptr<float>(), x_norms, rows, d, normalize ? 1 : 0,
              grad_x.data_ptr<scalar_t>());
    FA_LAUNCH(prototype_unit_rows_backward_kernel<scalar_t>, prototype_row_grid(protos),
              fa_dim3(kPrototypeRowThreads), grad_p_unit.data_ptr<float>(),
              p_unit.data_ptr<float>(), p_norms, protos, d, normalize ? 1 : 0,
              grad_p.data_ptr<scalar_t>());
  });
  return {grad_x, grad_p};
}

// The schema fastalign::prototype_update: sum_n a_nk x_n on the GEMM, the mass sum_n a_nk by
// columns, then the EMA row by row.
inline at::Tensor prototype_update(const at::Tensor& p_in, const at::Tensor& x_in,
                                   const at::Tensor& assign_in, double momentum, bool normalize) {
  fastalign::checks::check_prototype_update(Kernels::kCuda, p_in, x_in, assign_in, momentum);
  const int64_t n = x_in.size(0), k = p_in.size(0);
  const at::Tensor p = p_in.contiguous();
  const at::Tensor x = prototype_float32_copy(x_in.contiguous());
  const at::Tensor assign = prototype_float32_copy(assign_in.contiguous());
  const int rows = static_cast<int>(n), protos = static_cast<int>(k);
  const int d = static_cast<int>(p.size(1));
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({k, d}, f32), mass = at::empty({k}, f32);
  // A^T X: A(k, n) = assign[n * K + k].
  strided_gemm(assign.data_ptr<float>(), x.data_ptr<float>(), sums.data_ptr<float>(), protos, d,
               rows, 1, k, d, 1, 1.0f);
  FA_LAUNCH(prototype_column_sums_kernel, prototype_column_grid(protos), prototype_column_block(),
            assign.data_ptr<float>(), rows, protos, mass.data_ptr<float>());
  at::Tensor out = at::empty_like(p);
  FA_DISPATCH(p.scalar_type(), "prototype_ema", [&] {
    FA_LAUNCH(prototype_ema_kernel<scalar_t>, prototype_row_grid(protos),
              fa_dim3(kPrototypeRowThreads), p.data_ptr<scalar_t>(), sums.data_ptr<float>(),
              mass.data_ptr<float>(), protos, d, static_cast<float>(momentum), normalize ? 1 : 0,
              out.data_ptr<scalar_t>());
  });
  return out;
}

// The schema fastalign::prototype_topk_mix_forward: (out (N, Dv), indices (N, m) int64, sorted
// by cosine, descending, weights (N, m)). Memory beyond them: the scan's (splits, N, m) lists
// (12 bytes an entry, splits <= 32), N x m float32 weights and the N + K norms.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_topk_mix_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t m, double tau) {
  fastalign::checks::check_prototype_topk_mix_forward(Kernels::kCuda, q_in, k_in, v_in, m, tau);
  const at::Tensor q = q_in.contiguous(), keys = k_in.contiguous(), v = v_in.contiguous();
  const int n = static_cast<int>(q.size(0)), k = static_cast<int>(keys.size(0));
  const int d = static_cast<int>(q.size(1)), dv = static_cast<int>(v.size(1));
  const int top = static_cast<int>(m);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor norms = at::empty({n + k}, f32);
  float* const q_norms = norms.data_ptr<float>();
  float* const key_norms = q_norms + n;
  prototype_scaled_rows(q, true, 1.0f, at::Tensor(), q_norms);
  prototype_scaled_rows(keys, true, 1.0f, at::Tensor(), key_norms);
  const int query_blocks = ceil_div(n, kTileM), key_tiles = ceil_div(k, kTileN);
  const int wanted =
      std::min({key_tiles, kTopkMaxSplits, ceil_div(kTopkTargetBlocks, query_blocks)});
  const int keys_per_split = ceil_div(key_tiles, wanted) * kTileN;
  const int splits = ceil_div(k, keys_per_split);  // no range is empty
  at::Tensor lists = at::empty({2, splits, n, top}, f32);
  at::Tensor list_index = at::empty({splits, n, top}, q.options().dtype(at::kInt));
  at::Tensor final_weights = at::empty({n, top}, f32);
  at::Tensor out = at::empty({n, dv}, q.options());
  at::Tensor indices = at::empty({n, top}, q.options().dtype(at::kLong));
  at::Tensor weights = at::empty({n, top}, q.options());
  float* const top_cos = lists.data_ptr<float>();
  float* const top_dot = top_cos + static_cast<long>(splits) * n * top;
  FA_DISPATCH(q.scalar_type(), "prototype_topk_mix_forward", [&] {
    FA_LAUNCH(prototype_topk_scan_kernel<scalar_t>, fa_dim3(query_blocks, splits),
              fa_dim3(kGemmThreads), q.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), q_norms,
              key_norms, n, k, d, top, keys_per_split, top_cos, top_dot,
              list_index.data_ptr<int>());
    FA_LAUNCH(prototype_topk_mix_finish_kernel<scalar_t>, fa_dim3(query_blocks),
              fa_dim3(kGemmThreads), v.data_ptr<scalar_t>(), top_cos, top_dot,
              list_index.data_ptr<int>(), n, dv, top, splits, static_cast<float>(1.0 / tau),
              final_weights.data_ptr<float>(), indices.data_ptr<int64_t>(),
              weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return {out, indices, weights};
}

// The schema fastalign::prototype_topk_mix_backward: through the selected keys; dL/dkeys and
// dL/dvalues accumulate in float32 with atomics (their rounding depends on the order). The
// range check of the indices costs one device synchronisation (csrc/checks/prototypes.h).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_topk_mix_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& idx_in, const at::Tensor& w_in, double tau) {
  const at::Tensor indices = fastalign::checks::check_prototype_topk_mix_backward(
      Kernels::kCuda, grad_in, q_in, k_in, v_in, idx_in, w_in, tau);
  const int64_t n = q_in.size(0), m = idx_in.size(1);
  const auto dtype = q_in.scalar_type();
  const at::Tensor grad = grad_in.contiguous(), weights = w_in.contiguous();
  const at::Tensor q = q_in.contiguous(), keys = k_in.contiguous(), v = v_in.contiguous();
  const int rows = static_cast<int>(n), d = static_cast<int>(q.size(1));
  const int dv = static_cast<int>(v.size(1));
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor coef = at::empty({n, m}, f32);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::zeros(keys.sizes(), f32), grad_v = at::zeros(v.sizes(), f32);
  FA_DISPATCH(dtype, "prototype_topk_mix_backward", [&] {
    FA_LAUNCH(prototype_topk_mix_backward_kernel<scalar_t>, prototype_row_grid(rows),
              fa_dim3(kPrototypeRowThreads), grad.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
              keys.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
              weights.data_ptr<scalar_t>(), rows, d, dv, static_cast<int>(m),
              static_cast<float>(1.0 / tau), coef.data_ptr<float>(), grad_q.data_ptr<scalar_t>(),
              grad_k.data_ptr<float>(), grad_v.data_ptr<float>());
  });
  return {grad_q, grad_k.to(dtype), grad_v.to(dtype)};
}

}  // namespace fastalign_cuda
