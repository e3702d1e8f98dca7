// Test-only: the CUDA prototype kernels compiled by the host compiler against
// csrc/cuda/host_emulation.h and registered as torch.ops.fastalign_emulated.<op> on CPU tensors,
// with the schemas of the real ops (tests/cuda_emulation.py builds every file of this folder).
#include <torch/library.h>

#include "../cuda/prototypes_host.h"

TORCH_LIBRARY_FRAGMENT(fastalign_emulated, m) {
  m.def(
      "prototype_assign_forward(Tensor x, Tensor prototypes, int mode, float tau, int iters, "
      "bool normalize) -> Tensor",
      &fastalign_cuda::prototype_assign_forward);
  m.def(
      "prototype_assign_backward(Tensor grad, Tensor assignments, Tensor x, "
      "Tensor prototypes, float tau, bool normalize) -> (Tensor, Tensor)",
      &fastalign_cuda::prototype_assign_backward);
  m.def(
      "prototype_update(Tensor prototypes, Tensor x, Tensor assignments, float momentum, "
      "bool normalize) -> Tensor",
      &fastalign_cuda::prototype_update);
  m.def(
      "prototype_topk_mix_forward(Tensor queries, Tensor keys, Tensor values, int m, "
      "float tau) -> (Tensor, Tensor, Tensor)",
      &fastalign_cuda::prototype_topk_mix_forward);
  m.def(
      "prototype_topk_mix_backward(Tensor grad, Tensor queries, Tensor keys, Tensor values, "
      "Tensor indices, Tensor weights, float tau) -> (Tensor, Tensor, Tensor)",
      &fastalign_cuda::prototype_topk_mix_backward);
}
