// Test-only: the CUDA prototype kernels compiled by the host compiler against
// csrc/cuda/host_emulation.h and registered as torch.ops.fastalign_emulated.<op> on CPU tensors,
// with the schemas of the real ops (tests/cuda_emulation.py builds every file of this folder).
#include <torch/library.h>

#include "../cuda/prototypes_host.h"
#include "../schemas.h"

TORCH_LIBRARY_FRAGMENT(fastalign_emulated, m) {
  using namespace fastalign::schemas;
  m.def(kPrototypeAssignForward, &fastalign_cuda::prototype_assign_forward);
  m.def(kPrototypeAssignBackward, &fastalign_cuda::prototype_assign_backward);
  m.def(kPrototypeUpdate, &fastalign_cuda::prototype_update);
  m.def(kPrototypeTopkMixForward, &fastalign_cuda::prototype_topk_mix_forward);
  m.def(kPrototypeTopkMixBackward, &fastalign_cuda::prototype_topk_mix_backward);
}
