// Argument checks of fastalign::sparse_spatial_loss_forward (csrc/ops.cpp), shared by the CPU op
// (csrc/cpu/sparse_spatial.cpp) and the CUDA host code (csrc/cuda/sparse_spatial_host.h), so
// that every device raises the same errors. kind: 0 inter, 1 intra; select: 0 threshold, 1 soft,
// 2 topk.
#pragma once

#include <ATen/ATen.h>

namespace fastalign {

inline void check_sparse_spatial_arguments(const at::Tensor& img, const at::Tensor& txt,
                                           const at::Tensor& alpha, int64_t kind, int64_t select,
                                           int64_t k, double temperature) {
  TORCH_CHECK(img.dim() == 2 && img.sizes() == txt.sizes(),
              "img and txt must be (N, D) matrices of one shape, got ", img.sizes(), " and ",
              txt.sizes());
  TORCH_CHECK(img.scalar_type() == txt.scalar_type() && img.scalar_type() == alpha.scalar_type(),
              "img, txt and alpha must share a dtype");
  const int64_t n = img.size(0);
  TORCH_CHECK_VALUE(n >= 2 && img.size(1) >= 1,
                    "sparse_spatial_loss needs N >= 2 rows and D >= 1 columns, got ", img.sizes());
  TORCH_CHECK_VALUE(alpha.dim() == 1 && alpha.size(0) == n, "alpha must be (N,) = (", n,
                    ",), got ", alpha.sizes());
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, "kind must be 0 (inter) or 1 (intra)");
  TORCH_CHECK_VALUE(select == 0 || select == 1 || select == 2,
                    "select must be 0 (threshold), 1 (soft) or 2 (topk), got ", select);
  TORCH_CHECK_VALUE(select != 2 || (k >= 1 && k <= n - 1), "k must be in [1, N - 1 = ", n - 1,
                    "], got ", k);
  TORCH_CHECK_VALUE(select != 1 || temperature > 0.0, "temperature must be > 0");
}

}  // namespace fastalign
