// Test-only: the CUDA dimension-correlation kernels compiled by the host compiler against
// csrc/cuda/host_emulation.h and registered as torch.ops.fastalign_emulated.<op> on CPU tensors,
// with the schema of the real op (tests/cuda_emulation.py builds every file of this folder).
#include <torch/library.h>

#include "../cuda/dimension_correlation_host.h"
#include "../schemas.h"

TORCH_LIBRARY_FRAGMENT(fastalign_emulated, m) {
  m.def(fastalign::schemas::kDimensionCorrelationLossForward,
        &fastalign_cuda::dimension_correlation_loss_forward);
}
