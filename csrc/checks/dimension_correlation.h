// Argument checks of fastalign::dimension_correlation_loss_forward (csrc/schemas.h), shared by
// the CPU op (csrc/cpu/dimension_correlation.cpp) and the CUDA host code
// (csrc/cuda/dimension_correlation_host.h, also run by the host emulation). The CPU kernel raises
// on a non-finite element itself (its column-statistics pass finds it); the CUDA host code does
// not look (that would cost a device synchronisation).
#pragma once

#include "../option_codes.h"
#include "common.h"

namespace fastalign::checks {

inline void check_dimension_correlation_arguments(Kernels kernels, const at::Tensor& a,
                                                  const at::Tensor& b, int64_t mode,
                                                  double off_diagonal_weight, double tau,
                                                  double eps, int64_t path) {
  constexpr const char* op = "dimension_correlation_loss_forward";
  check_dims(op, "a", a, 2, "(N, D)");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op,
                    ": a and b must be (N, D) matrices of one shape, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(a.size(0) >= 2 && a.size(1) >= 1, op,
                    ": a and b need N >= 2 rows and D >= 1 columns, got ", a.sizes());
  check_floating(op, kernels, {{"a", a}, {"b", b}});
  check_option<CorrelationMode>(op, "mode", mode);
  check_option<CorrelationPath>(op, "path", path);
  TORCH_CHECK_VALUE(path != CorrelationPath::kGram || mode == CorrelationMode::kBarlow, op,
                    ": path = 2 (gram) needs mode = 0 (barlow), got mode = ", mode);
  check_number(op, "off_diagonal_weight", off_diagonal_weight, 0.0, true);
  check_number(op, "tau", tau, 0.0, false);
  check_number(op, "eps", eps, 0.0, false);
  if (kernels == Kernels::kCuda) {
    TORCH_CHECK_VALUE(path != CorrelationPath::kGram, op,
                      ": the CUDA kernels compute the loss through C: path must be 0 (auto) or "
                      "1 (correlation), got 2 (gram)");
    check_int32_size(op, "N * D", a.numel());
  }
}

}  // namespace fastalign::checks
