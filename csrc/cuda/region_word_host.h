// Host side of the CUDA region-word similarity: checks, outputs and the kernel launches of
// region_word.cuh, one launch per direction (t2i: words align over regions; i2t: the reverse).
// Shared by the nvcc build (region_word.cu, CUDA tensors) and the host emulation
// (csrc/emulation/region_word.cpp, CPU tensors): FA_LAUNCH decides where the kernels run.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "../checks/region_word.h"
#include "../option_codes.h"
#include "gemm_host.h"
#include "region_word.cuh"

namespace fastalign_cuda {

using fastalign::Direction;
using fastalign::checks::Kernels;
using fastalign::checks::RegionWordTokens;

// Calls launch(regions, words, region_lengths, word_lengths) with typed pointers.
template <typename Launch>
void with_token_pointers(const RegionWordTokens& in, const Launch& launch) {
  FA_DISPATCH(in.regions.scalar_type(), "region_word", [&] {
    launch(in.regions.data_ptr<scalar_t>(), in.words.data_ptr<scalar_t>(),
           in.region_lengths.data_ptr<int64_t>(), in.word_lengths.data_ptr<int64_t>());
  });
}

// The schema fastalign::region_word_forward (csrc/schemas.h); outputs as the CPU op's, padded
// tokens hold 0 in the aligned values and indices.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_word_forward(
    const at::Tensor& regions_in, const at::Tensor& words_in, const at::Tensor& region_lengths_in,
    const at::Tensor& word_lengths_in, int64_t direction, int64_t align, int64_t aggregate,
    double align_tau, double aggregate_tau, bool leaky, bool need_indices, bool need_values) {
  constexpr const char* op = "region_word_forward";
  const RegionWordTokens in =
      fastalign::checks::check_region_word_tokens(op, Kernels::kCuda, regions_in, words_in,
                                                  region_lengths_in, word_lengths_in);
  fastalign::checks::check_region_word_forward_options(op, direction, align, aggregate, align_tau,
                                                       aggregate_tau);
  const at::Tensor& regions = in.regions;
  const int n_images = static_cast<int>(regions.size(0));
  const int max_regions = static_cast<int>(regions.size(1));
  const int n_captions = static_cast<int>(in.words.size(0));
  const int max_words = static_cast<int>(in.words.size(1)), dim = static_cast<int>(regions.size(2));
  const bool t2i = direction != Direction::kI2T, i2t = direction != Direction::kT2I;
  const bool keep_indices = need_indices && align == Align::kMax;
  const auto f32 = regions.options().dtype(at::kFloat);
  auto aux = [&](bool used, int64_t tokens, at::ScalarType dtype) {
    return used ? at::zeros({n_images, n_captions, tokens}, regions.options().dtype(dtype))
                : at::empty({0}, regions.options().dtype(dtype));
  };
  at::Tensor scores = at::empty({n_images, n_captions}, f32);
  at::Tensor a_t2i = aux(need_values && t2i, max_words, at::kFloat);
  at::Tensor idx_t2i = aux(keep_indices && t2i, max_words, at::kInt);
  at::Tensor a_i2t = aux(need_values && i2t, max_regions, at::kFloat);
  at::Tensor idx_i2t = aux(keep_indices && i2t, max_regions, at::kInt);
  if (dim == 0) {
    return {scores.zero_().to(regions.scalar_type()), a_t2i, idx_t2i, a_i2t, idx_i2t};
  }
  const RegionWordOptions options{static_cast<int>(align), static_cast<int>(aggregate),
                                  static_cast<float>(align_tau), static_cast<float>(aggregate_tau),
                                  leaky};
  auto values = [](at::Tensor& a) { return a.numel() ? a.data_ptr<float>() : nullptr; };
  auto indices = [](at::Tensor& idx) { return idx.numel() ? idx.data_ptr<int>() : nullptr; };
  // t2i: queries are captions (scores column t, aux [i, t, w]); i2t: images (row i, [i, t, r]).
  const PairOutputs out_t2i{scores.data_ptr<float>(), 1, n_captions, false, values(a_t2i),
                            indices(idx_t2i), max_words, static_cast<long>(n_captions) * max_words};
  const PairOutputs out_i2t{scores.data_ptr<float>(), n_captions, 1, direction == Direction::kBoth,
                            values(a_i2t), indices(idx_i2t),
                            static_cast<long>(n_captions) * max_regions, max_regions};
  with_token_pointers(in, [&](const auto* region, const auto* word, const int64_t* region_len,
                              const int64_t* word_len) {
    if (t2i) {
      FA_LAUNCH(region_word_forward_kernel, fa_dim3(ceil_div(n_images, 2), ceil_div(n_captions, 2)),
                fa_dim3(kGemmThreads), word, region, word_len, region_len, n_captions, n_images,
                max_words, max_regions, dim, options, out_t2i);
    }
    if (i2t) {
      FA_LAUNCH(region_word_forward_kernel, fa_dim3(ceil_div(n_captions, 2), ceil_div(n_images, 2)),
                fa_dim3(kGemmThreads), region, word, region_len, word_len, n_images, n_captions,
                max_regions, max_words, dim, options, out_i2t);
    }
  });
  return {scores.to(regions.scalar_type()), a_t2i, idx_t2i, a_i2t, idx_i2t};
}

// The coefficients of one direction as seen from the item whose gradient is formed: coef and
// aux are (Ni, Nt, tokens), and x's item is axis x_axis (0: images, 1: captions).
inline TokenCoefficients token_coefficients(const at::Tensor& coef, const at::Tensor& aux,
                                            int x_axis, bool align_max) {
  if (coef.numel() == 0) return {nullptr, nullptr, nullptr, 0, 0, 0, 0, 0};
  return {coef.data_ptr<float>(),
          align_max ? aux.data_ptr<int>() : nullptr,
          align_max ? nullptr : aux.data_ptr<float>(),
          coef.stride(x_axis),
          coef.stride(1 - x_axis),
          coef.stride(2),
          aux.stride(x_axis),
          aux.stride(1 - x_axis)};
}

// The schema fastalign::region_word_backward: gradients in the inputs' dtype, 0 at padding.
inline std::tuple<at::Tensor, at::Tensor> region_word_backward(
    const at::Tensor& coef_t2i_in, const at::Tensor& aux_t2i_in, const at::Tensor& coef_i2t_in,
    const at::Tensor& aux_i2t_in, const at::Tensor& regions_in, const at::Tensor& words_in,
    const at::Tensor& region_lengths_in, const at::Tensor& word_lengths_in, int64_t align,
    double align_tau, bool leaky) {
  constexpr const char* op = "region_word_backward";
  const RegionWordTokens in =
      fastalign::checks::check_region_word_tokens(op, Kernels::kCuda, regions_in, words_in,
                                                  region_lengths_in, word_lengths_in);
  fastalign::checks::check_option<Align>(op, "align", align);
  fastalign::checks::check_number(op, "align_tau", align_tau, 0.0, false);
  const at::Tensor &regions = in.regions, &words = in.words;
  const int n_images = static_cast<int>(regions.size(0));
  const int max_regions = static_cast<int>(regions.size(1));
  const int n_captions = static_cast<int>(words.size(0));
  const int max_words = static_cast<int>(words.size(1)), dim = static_cast<int>(regions.size(2));
  const bool align_max = align == Align::kMax;
  // The coefficients keep their strides (broadcast views stay views); aux is made contiguous.
  const at::Tensor& coef_t2i = coef_t2i_in;
  const at::Tensor& coef_i2t = coef_i2t_in;
  const at::Tensor aux_t2i = fastalign::checks::check_region_word_saved(
      op, "coef_t2i", coef_t2i, "aux_t2i", aux_t2i_in, in, true, align);
  const at::Tensor aux_i2t = fastalign::checks::check_region_word_saved(
      op, "coef_i2t", coef_i2t, "aux_i2t", aux_i2t_in, in, false, align);
  const auto f32 = regions.options().dtype(at::kFloat);
  at::Tensor grad_regions = at::zeros(regions.sizes(), f32);
  at::Tensor grad_words = at::zeros(words.sizes(), f32);
  if (dim == 0 || (coef_t2i.numel() == 0 && coef_i2t.numel() == 0)) {
    return {grad_regions.to(regions.scalar_type()), grad_words.to(words.scalar_type())};
  }
  const RegionWordOptions options{static_cast<int>(align), 0, static_cast<float>(align_tau), 1.0f,
                                  leaky};
  // align max: one 64-feature chunk per block (no recompute to share); align lse: every
  // feature in one block, so each score tile is recomputed once, not once per chunk.
  const int d_splits = align_max ? ceil_div(dim, kTileN) : 1;
  const int d_per_split = align_max ? kTileN : ceil_div(dim, kTileN) * kTileN;
  // One side of the pair: its item axis in coef and aux, counts, and the direction in which its
  // tokens are the queries (regions: i2t, words: t2i); in the other they are the keys.
  struct Side {
    int axis, items, padded;
    const at::Tensor *coef, *aux;
    at::Tensor* grad;
  };
  const Side images{0, n_images, max_regions, &coef_i2t, &aux_i2t, &grad_regions};
  const Side captions{1, n_captions, max_words, &coef_t2i, &aux_t2i, &grad_words};
  with_token_pointers(in, [&](const auto* region, const auto* word, const int64_t* region_len,
                              const int64_t* word_len) {
    // The gradient of x's tokens against y's, one launch per side.
    auto launch = [&](const Side& x, const Side& y, const auto* x_tokens, const auto* y_tokens,
                      const int64_t* x_len, const int64_t* y_len) {
      FA_LAUNCH(region_word_backward_kernel,
                fa_dim3(x.items, ceil_div(x.padded, kTileM) * d_splits), fa_dim3(kGemmThreads),
                x_tokens, y_tokens, x_len, y_len, y.items, x.padded, y.padded, dim,
                token_coefficients(*x.coef, *x.aux, x.axis, align_max),
                token_coefficients(*y.coef, *y.aux, x.axis, align_max), d_splits, d_per_split,
                options, x.grad->data_ptr<float>());
    };
    launch(images, captions, region, word, region_len, word_len);
    launch(captions, images, word, region, word_len, region_len);
  });
  return {grad_regions.to(regions.scalar_type()), grad_words.to(words.scalar_type())};
}

}  // namespace fastalign_cuda
