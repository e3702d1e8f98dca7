// Test-only extension: the CUDA kernels of csrc/cuda, compiled by the host compiler against the
// emulation in csrc/cuda/host_emulation.h and run on CPU tensors. Registered as
// torch.ops.fastalign_emulated.<op> with the schemas of the real ops (tests/cuda_emulation.py
// builds and loads it).
#include <torch/library.h>

#include "../cuda/dimension_correlation_host.h"

TORCH_LIBRARY(fastalign_emulated, m) {
  m.def(
      "dimension_correlation_loss_forward(Tensor a, Tensor b, int mode, "
      "float off_diagonal_weight, float tau, float eps, bool need_grad, int path) "
      "-> (Tensor, Tensor, Tensor)",
      &fastalign_cuda::dimension_correlation_loss_forward);
}
