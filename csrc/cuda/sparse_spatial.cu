// Registers the CUDA sparse spatial loss (kernels in sparse_spatial.cuh, host code in
// sparse_spatial_host.h) under the CUDA dispatch key of fastalign::.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sparse_spatial_host.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_spatial_loss_forward_cuda(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& alpha, int64_t kind,
    int64_t select, int64_t k, double temperature, bool largest, bool need_grad) {
  TORCH_CHECK(img.is_cuda() && txt.is_cuda() && alpha.is_cuda(),
              "img, txt and alpha must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(img.device());
  return fastalign_cuda::sparse_spatial_loss_forward(img, txt, alpha, kind, select, k,
                                                     temperature, largest, need_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("sparse_spatial_loss_forward", &sparse_spatial_loss_forward_cuda);
}
