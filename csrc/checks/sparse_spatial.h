// Argument checks of fastalign::sparse_spatial_loss_forward (csrc/schemas.h), shared by the CPU
// op (csrc/cpu/sparse_spatial.cpp) and the CUDA host code (csrc/cuda/sparse_spatial_host.h,
// also run by the host emulation), so that every device raises the same errors. The CPU kernel
// raises on a non-finite img or txt element itself (its norm pass finds it); the CUDA host code
// does not look (that would cost a device synchronisation).
#pragma once

#include "../option_codes.h"
#include "common.h"

namespace fastalign::checks {

inline void check_sparse_spatial_arguments(Kernels kernels, const at::Tensor& img,
                                           const at::Tensor& txt, const at::Tensor& alpha,
                                           int64_t kind, int64_t select, int64_t k,
                                           double temperature) {
  constexpr const char* op = "sparse_spatial_loss_forward";
  check_dims(op, "img", img, 2, "(N, D)");
  TORCH_CHECK_VALUE(img.sizes() == txt.sizes(), op,
                    ": img and txt must be (N, D) matrices of one shape, got ", img.sizes(),
                    " and ", txt.sizes());
  const int64_t n = img.size(0);
  TORCH_CHECK_VALUE(n >= 2 && img.size(1) >= 1, op,
                    ": img and txt need N >= 2 rows and D >= 1 columns, got ", img.sizes());
  TORCH_CHECK_VALUE(alpha.dim() == 1 && alpha.size(0) == n, op, ": alpha must be (N,) = (", n,
                    ",), got ", alpha.sizes());
  check_floating(op, kernels, {{"img", img}, {"txt", txt}, {"alpha", alpha}});
  check_option<SpatialKind>(op, "kind", kind);
  check_option<SpatialSelect>(op, "select", select);
  TORCH_CHECK_VALUE(select != SpatialSelect::kTopk || (k >= 1 && k <= n - 1), op,
                    ": k must be in [1, N - 1 = ", n - 1, "], got ", k);
  if (select == SpatialSelect::kSoft) check_number(op, "temperature", temperature, 0.0, false);
  if (kernels == Kernels::kCuda) {  // int32 rows, and int32 offsets into the (N, 2 D) buffers
    check_int32_size(op, "N", n);
    check_int32_size(op, "2 D", 2 * img.size(1));
  }
}

}  // namespace fastalign::checks
