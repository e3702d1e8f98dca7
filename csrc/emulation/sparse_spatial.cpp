// Test-only: the CUDA sparse-spatial kernels compiled by the host compiler against
// csrc/cuda/host_emulation.h and registered as torch.ops.fastalign_emulated.<op> on CPU tensors,
// with the schema of the real op (tests/cuda_emulation.py builds every file of this folder).
#include <torch/library.h>

#include "../cuda/sparse_spatial_host.h"
#include "../schemas.h"

TORCH_LIBRARY_FRAGMENT(fastalign_emulated, m) {
  m.def(fastalign::schemas::kSparseSpatialLossForward,
        &fastalign_cuda::sparse_spatial_loss_forward);
}
