// Test-only: the CUDA sparse-spatial kernels compiled by the host compiler against
// csrc/cuda/host_emulation.h and registered as torch.ops.fastalign_emulated.<op> on CPU tensors,
// with the schema of the real op (tests/cuda_emulation.py builds every file of this folder).
#include <torch/library.h>

#include "../cuda/sparse_spatial_host.h"

TORCH_LIBRARY_FRAGMENT(fastalign_emulated, m) {
  m.def(
      "sparse_spatial_loss_forward(Tensor img, Tensor txt, Tensor alpha, int kind, int select, "
      "int k, float temperature, bool largest, bool need_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      &fastalign_cuda::sparse_spatial_loss_forward);
}
