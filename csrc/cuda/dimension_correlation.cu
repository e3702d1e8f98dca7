// Registers the CUDA dimension-correlation loss (kernels in dimension_correlation.cuh, host
// code in dimension_correlation_host.h) under the CUDA dispatch key of fastalign::.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dimension_correlation_host.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dimension_correlation_loss_forward_cuda(
    const at::Tensor& a, const at::Tensor& b, int64_t mode, double off_diagonal_weight,
    double tau, double eps, bool need_grad, int64_t path) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "a and b must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(a.device());
  return fastalign_cuda::dimension_correlation_loss_forward(a, b, mode, off_diagonal_weight, tau,
                                                            eps, need_grad, path);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("dimension_correlation_loss_forward", &dimension_correlation_loss_forward_cuda);
}
