// Registers the CUDA prototype operators (kernels in prototypes.cuh, host code in
// prototypes_host.h) under the CUDA dispatch key of fastalign::.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "prototypes_host.h"

namespace {

void check_cuda(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda(), "the CUDA prototype kernels need CUDA tensors, got ", t->device());
  }
}

at::Tensor prototype_assign_forward_cuda(const at::Tensor& x, const at::Tensor& prototypes,
                                         int64_t mode, double tau, int64_t iters, bool normalize) {
  check_cuda({&x, &prototypes});
  const c10::cuda::CUDAGuard guard(x.device());
  return fastalign_cuda::prototype_assign_forward(x, prototypes, mode, tau, iters, normalize);
}

std::tuple<at::Tensor, at::Tensor> prototype_assign_backward_cuda(const at::Tensor& grad,
                                                                  const at::Tensor& assignments,
                                                                  const at::Tensor& x,
                                                                  const at::Tensor& prototypes,
                                                                  double tau, bool normalize) {
  check_cuda({&grad, &assignments, &x, &prototypes});
  const c10::cuda::CUDAGuard guard(x.device());
  return fastalign_cuda::prototype_assign_backward(grad, assignments, x, prototypes, tau,
                                                   normalize);
}

at::Tensor prototype_update_cuda(const at::Tensor& prototypes, const at::Tensor& x,
                                 const at::Tensor& assignments, double momentum, bool normalize) {
  check_cuda({&prototypes, &x, &assignments});
  const c10::cuda::CUDAGuard guard(x.device());
  return fastalign_cuda::prototype_update(prototypes, x, assignments, momentum, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_topk_mix_forward_cuda(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values, int64_t m,
    double tau) {
  check_cuda({&queries, &keys, &values});
  const c10::cuda::CUDAGuard guard(queries.device());
  return fastalign_cuda::prototype_topk_mix_forward(queries, keys, values, m, tau);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_topk_mix_backward_cuda(
    const at::Tensor& grad, const at::Tensor& queries, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weights, double tau) {
  check_cuda({&grad, &queries, &keys, &values, &indices, &weights});
  const c10::cuda::CUDAGuard guard(queries.device());
  return fastalign_cuda::prototype_topk_mix_backward(grad, queries, keys, values, indices, weights,
                                                     tau);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("prototype_assign_forward", &prototype_assign_forward_cuda);
  m.impl("prototype_assign_backward", &prototype_assign_backward_cuda);
  m.impl("prototype_update", &prototype_update_cuda);
  m.impl("prototype_topk_mix_forward", &prototype_topk_mix_forward_cuda);
  m.impl("prototype_topk_mix_backward", &prototype_topk_mix_backward_cuda);
}
