// Test-only: the CUDA region-word kernels compiled by the host compiler against
// csrc/cuda/host_emulation.h and registered as torch.ops.fastalign_emulated.<op> on CPU tensors,
// with the schemas of the real ops (tests/cuda_emulation.py builds every file of this folder).
#include <torch/library.h>

#include "../cuda/region_word_host.h"

TORCH_LIBRARY_FRAGMENT(fastalign_emulated, m) {
  m.def(
      "region_word_forward(Tensor regions, Tensor words, Tensor region_lengths, "
      "Tensor word_lengths, int direction, int align, int aggregate, float align_tau, "
      "float aggregate_tau, bool leaky, bool need_indices, bool need_values) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      &fastalign_cuda::region_word_forward);
  m.def(
      "region_word_backward(Tensor coef_t2i, Tensor aux_t2i, Tensor coef_i2t, "
      "Tensor aux_i2t, Tensor regions, Tensor words, Tensor region_lengths, "
      "Tensor word_lengths, int align, float align_tau, bool leaky) -> (Tensor, Tensor)",
      &fastalign_cuda::region_word_backward);
}
