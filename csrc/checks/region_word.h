// Argument checks of fastalign::region_word_forward and region_word_backward (csrc/schemas.h),
// shared by the CPU ops (csrc/cpu/region_word.cpp) and the CUDA host code
// (csrc/cuda/region_word_host.h, also run by the host emulation). What they cost: common.h.
#pragma once

#include <ATen/OpMathType.h>

#include "../option_codes.h"
#include "common.h"

namespace fastalign::checks {

// The token inputs of both ops, checked: contiguous regions and words, int64 lengths.
struct RegionWordTokens {
  at::Tensor regions, words, region_lengths, word_lengths;
};

inline RegionWordTokens check_region_word_tokens(const char* op, Kernels kernels,
                                                 const at::Tensor& regions,
                                                 const at::Tensor& words,
                                                 const at::Tensor& region_lengths,
                                                 const at::Tensor& word_lengths) {
  check_dims(op, "regions", regions, 3, "(Ni, R, D)");
  check_dims(op, "words", words, 3, "(Nt, L, D)");
  for (const Named& x : {Named{"regions", regions}, Named{"words", words}}) {
    TORCH_CHECK_VALUE(x.tensor.size(0) >= 1 && x.tensor.size(1) >= 1, op, ": ", x.name,
                      " must have at least one item and one token, got shape ", x.tensor.sizes());
  }
  TORCH_CHECK_VALUE(regions.size(2) == words.size(2), op,
                    ": regions and words must share the feature size D, got ", regions.size(2),
                    " and ", words.size(2));
  check_floating(op, kernels, {{"regions", regions}, {"words", words}});
  check_same_device(op, {{"regions", regions},
                         {"region_lengths", region_lengths},
                         {"word_lengths", word_lengths}});
  // Arg-max indices are int32; the CUDA forward's grid.y counts pairs of items and its token
  // and feature offsets are int32 products.
  check_int32_size(op, "R", regions.size(1));
  check_int32_size(op, "L", words.size(1));
  if (kernels == Kernels::kCuda) {
    for (const Named& x : {Named{"regions", regions}, Named{"words", words}}) {
      TORCH_CHECK_VALUE(x.tensor.size(0) <= 2 * 65535 && x.tensor.size(1) < (1L << 24) &&
                            x.tensor.size(2) < (1L << 24),
                        op, ": ", x.name,
                        " has too many items (at most 131070), tokens or features (below 2^24) "
                        "for the CUDA kernels, got shape ",
                        x.tensor.sizes());
    }
  }
  return {regions.contiguous(), words.contiguous(),
          checked_lengths(op, "region_lengths", region_lengths, regions.size(0), regions.size(1)),
          checked_lengths(op, "word_lengths", word_lengths, words.size(0), words.size(1))};
}

inline void check_region_word_forward_options(const char* op, int64_t direction, int64_t align,
                                              int64_t aggregate, double align_tau,
                                              double aggregate_tau) {
  check_option<Direction>(op, "direction", direction);
  check_option<Align>(op, "align", align);
  check_option<Aggregate>(op, "aggregate", aggregate);
  check_number(op, "align_tau", align_tau, 0.0, false);
  check_number(op, "aggregate_tau", aggregate_tau, 0.0, false);
}

// One direction's saved tensors for the backward: coef (dL/da, any strides) is empty when the
// direction is unused, else (Ni, Nt, Q) in the accumulation dtype; aux then holds the forward's
// arg-max indices (int32, align max) or aligned values (align lse) of that shape. Every valid
// query token's index must name a valid key token of its pair: checked exactly on CPU, and
// within 0..(padded keys - 1) on CUDA (one device synchronisation; the forward writes 0 at
// padded query tokens). Returns aux, contiguous.
inline at::Tensor check_region_word_saved(const char* op, const char* coef_name,
                                          const at::Tensor& coef, const char* aux_name,
                                          const at::Tensor& aux, const RegionWordTokens& in,
                                          bool t2i, int64_t align) {
  if (coef.numel() == 0) return aux;
  const int64_t n_images = in.regions.size(0), n_captions = in.words.size(0);
  const int64_t queries = t2i ? in.words.size(1) : in.regions.size(1);
  const int64_t keys = t2i ? in.regions.size(1) : in.words.size(1);
  const std::vector<int64_t> shape{n_images, n_captions, queries};
  const char* layout = t2i ? "(Ni, Nt, L)" : "(Ni, Nt, R)";
  const auto acc = at::toOpMathType(in.regions.scalar_type());
  check_shape(op, coef_name, coef, shape, layout);
  TORCH_CHECK_TYPE(coef.scalar_type() == acc, op, ": ", coef_name, " must be ", acc,
                   " (the accumulation dtype), got ", coef.scalar_type());
  check_shape(op, aux_name, aux, shape, layout);
  check_same_device(op, {{"regions", in.regions}, {coef_name, coef}, {aux_name, aux}});
  const at::Tensor out = aux.contiguous();
  if (align != Align::kMax) {
    TORCH_CHECK_TYPE(aux.scalar_type() == acc, op, ": ", aux_name, " must be ", acc,
                     " (the forward's aligned values, align lse), got ", aux.scalar_type());
    return out;
  }
  TORCH_CHECK_TYPE(aux.scalar_type() == at::kInt, op, ": ", aux_name,
                   " must be int32 (the forward's arg-max indices, align max), got ",
                   aux.scalar_type());
  if (!out.is_cpu()) {
    check_range(op, aux_name, out, 0, keys - 1, "index");
    return out;
  }
  const int64_t* region_len = in.region_lengths.data_ptr<int64_t>();
  const int64_t* word_len = in.word_lengths.data_ptr<int64_t>();
  const int32_t* index = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < n_images; ++i) {
    for (int64_t t = 0; t < n_captions; ++t) {
      const int64_t query_len = t2i ? word_len[t] : region_len[i];
      const int64_t key_len = t2i ? region_len[i] : word_len[t];
      const int32_t* pair = index + (i * n_captions + t) * queries;
      for (int64_t q = 0; q < query_len; ++q) {
        TORCH_CHECK_VALUE(pair[q] >= 0 && pair[q] < key_len, op, ": ", aux_name, "[", i, ", ", t,
                          ", ", q, "] = ", pair[q], ", expected an arg-max index 0 <= index < ",
                          t2i ? "region_lengths[" : "word_lengths[", t2i ? i : t, "] = ",
                          key_len);
      }
    }
  }
  return out;
}

}  // namespace fastalign::checks
