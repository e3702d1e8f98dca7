// Test-only: the CUDA region-word kernels compiled by the host compiler against
// csrc/cuda/host_emulation.h and registered as torch.ops.fastalign_emulated.<op> on CPU tensors,
// with the schemas of the real ops (tests/cuda_emulation.py builds every file of this folder).
#include <torch/library.h>

#include "../cuda/region_word_host.h"
#include "../schemas.h"

TORCH_LIBRARY_FRAGMENT(fastalign_emulated, m) {
  m.def(fastalign::schemas::kRegionWordForward, &fastalign_cuda::region_word_forward);
  m.def(fastalign::schemas::kRegionWordBackward, &fastalign_cuda::region_word_backward);
}
