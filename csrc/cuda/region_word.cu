// Registers the CUDA region-word similarity (kernels in region_word.cuh, host code in
// region_word_host.h) under the CUDA dispatch key of fastalign::.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "region_word_host.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_word_forward_cuda(
    const at::Tensor& regions, const at::Tensor& words, const at::Tensor& region_lengths,
    const at::Tensor& word_lengths, int64_t direction, int64_t align, int64_t aggregate,
    double align_tau, double aggregate_tau, bool leaky, bool need_indices, bool need_values) {
  TORCH_CHECK(regions.is_cuda() && words.is_cuda(), "regions and words must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(regions.device());
  return fastalign_cuda::region_word_forward(regions, words, region_lengths, word_lengths,
                                             direction, align, aggregate, align_tau,
                                             aggregate_tau, leaky, need_indices, need_values);
}

std::tuple<at::Tensor, at::Tensor> region_word_backward_cuda(
    const at::Tensor& coef_t2i, const at::Tensor& aux_t2i, const at::Tensor& coef_i2t,
    const at::Tensor& aux_i2t, const at::Tensor& regions, const at::Tensor& words,
    const at::Tensor& region_lengths, const at::Tensor& word_lengths, int64_t align,
    double align_tau, bool leaky) {
  TORCH_CHECK(regions.is_cuda() && words.is_cuda(), "regions and words must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(regions.device());
  return fastalign_cuda::region_word_backward(coef_t2i, aux_t2i, coef_i2t, aux_i2t, regions,
                                              words, region_lengths, word_lengths, align,
                                              align_tau, leaky);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("region_word_forward", &region_word_forward_cuda);
  m.impl("region_word_backward", &region_word_backward_cuda);
}
