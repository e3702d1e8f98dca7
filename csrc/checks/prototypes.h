// Argument checks of the five prototype operators (csrc/schemas.h), shared by the CPU ops
// (csrc/cpu/prototypes.cpp) and the CUDA host code (csrc/cuda/prototypes_host.h, also run by
// the host emulation). What they cost: common.h.
#pragma once

#include "../option_codes.h"
#include "common.h"

namespace fastalign::checks {

// A 2-D tensor with at least one row and one column; the CUDA kernels index rows and columns
// with int32.
inline void check_matrix(const char* op, Kernels kernels, const char* name, const at::Tensor& t,
                         const char* layout) {
  check_dims(op, name, t, 2, layout);
  TORCH_CHECK_VALUE(t.size(0) >= 1 && t.size(1) >= 1, op, ": ", name, " ", layout,
                    " must have at least one row and one column, got shape ", t.sizes());
  if (kernels == Kernels::kCuda) check_int32_size(op, name, t.numel());
}

inline void check_same_features(const char* op, const char* name_a, const at::Tensor& a,
                                const char* name_b, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), op, ": ", name_a, " ", a.sizes(), " and ", name_b,
                    " ", b.sizes(), " must share the feature dimension D");
}

inline void check_prototype_assign_forward(Kernels kernels, const at::Tensor& x,
                                           const at::Tensor& prototypes, int64_t mode, double tau,
                                           int64_t iters) {
  constexpr const char* op = "prototype_assign_forward";
  check_matrix(op, kernels, "x", x, "(N, D)");
  check_matrix(op, kernels, "prototypes", prototypes, "(K, D)");
  check_same_features(op, "x", x, "prototypes", prototypes);
  check_floating(op, kernels, {{"x", x}, {"prototypes", prototypes}});
  check_option<AssignMode>(op, "mode", mode);
  check_number(op, "tau", tau, 0.0, false);
  TORCH_CHECK_VALUE(iters >= 1, op, ": iters = ", iters, ", expected iters >= 1");
}

// grad (dL/dassignments) may come in any floating dtype: the ops convert it.
inline void check_prototype_assign_backward(Kernels kernels, const at::Tensor& grad,
                                            const at::Tensor& assignments, const at::Tensor& x,
                                            const at::Tensor& prototypes, double tau) {
  constexpr const char* op = "prototype_assign_backward";
  check_matrix(op, kernels, "x", x, "(N, D)");
  check_matrix(op, kernels, "prototypes", prototypes, "(K, D)");
  check_same_features(op, "x", x, "prototypes", prototypes);
  const std::vector<int64_t> nk{x.size(0), prototypes.size(0)};
  check_shape(op, "assignments", assignments, nk, "(N, K)");
  check_shape(op, "grad", grad, nk, "(N, K)");
  check_floating(op, kernels, {{"x", x}, {"prototypes", prototypes}, {"assignments", assignments}});
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), op,
                   ": grad must be a floating-point tensor, got ", grad.scalar_type());
  check_same_device(op, {{"x", x}, {"grad", grad}});
  check_number(op, "tau", tau, 0.0, false);
}

// The assignments are weights, >= 0 as the Python layer requires: checked on CPU tensors (the
// CPU op's and the host emulation's); on CUDA that would cost a device synchronisation per call,
// so there only the Python layer checks them.
inline void check_prototype_update(Kernels kernels, const at::Tensor& prototypes,
                                   const at::Tensor& x, const at::Tensor& assignments,
                                   double momentum) {
  constexpr const char* op = "prototype_update";
  check_matrix(op, kernels, "prototypes", prototypes, "(K, D)");
  check_matrix(op, kernels, "x", x, "(N, D)");
  check_same_features(op, "prototypes", prototypes, "x", x);
  check_shape(op, "assignments", assignments, {x.size(0), prototypes.size(0)}, "(N, K)");
  check_floating(op, kernels, {{"prototypes", prototypes}, {"x", x}, {"assignments", assignments}});
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, op, ": momentum = ", momentum,
                    ", expected 0 <= momentum <= 1");
  check_non_negative(op, "assignments", assignments, "weight");
}

inline void check_topk_mix_inputs(const char* op, Kernels kernels, const at::Tensor& queries,
                                  const at::Tensor& keys, const at::Tensor& values, int64_t m,
                                  double tau) {
  check_matrix(op, kernels, "queries", queries, "(N, D)");
  check_matrix(op, kernels, "keys", keys, "(K, D)");
  check_matrix(op, kernels, "values", values, "(K, Dv)");
  check_same_features(op, "queries", queries, "keys", keys);
  TORCH_CHECK_VALUE(values.size(0) == keys.size(0), op,
                    ": values (K, Dv) must have one row per key (K = ", keys.size(0),
                    "), got shape ", values.sizes());
  check_floating(op, kernels, {{"queries", queries}, {"keys", keys}, {"values", values}});
  TORCH_CHECK_VALUE(m >= 1 && m <= keys.size(0), op, ": m = ", m, ", expected 1 <= m <= K = ",
                    keys.size(0));
  check_number(op, "tau", tau, 0.0, false);
}

inline void check_prototype_topk_mix_forward(Kernels kernels, const at::Tensor& queries,
                                             const at::Tensor& keys, const at::Tensor& values,
                                             int64_t m, double tau) {
  check_topk_mix_inputs("prototype_topk_mix_forward", kernels, queries, keys, values, m, tau);
}

// indices are the forward's: every one must name a key, 0 <= index < K (on CUDA one device
// synchronisation). Returns them as contiguous int64.
inline at::Tensor check_prototype_topk_mix_backward(Kernels kernels, const at::Tensor& grad,
                                                    const at::Tensor& queries,
                                                    const at::Tensor& keys,
                                                    const at::Tensor& values,
                                                    const at::Tensor& indices,
                                                    const at::Tensor& weights, double tau) {
  constexpr const char* op = "prototype_topk_mix_backward";
  check_dims(op, "indices", indices, 2, "(N, m)");
  const int64_t m = indices.size(1);
  check_topk_mix_inputs(op, kernels, queries, keys, values, m, tau);
  check_shape(op, "indices", indices, {queries.size(0), m}, "(N, m)");
  check_shape(op, "weights", weights, {queries.size(0), m}, "(N, m)");
  check_shape(op, "grad", grad, {queries.size(0), values.size(1)}, "(N, Dv)");
  check_floating(op, kernels, {{"queries", queries}, {"grad", grad}, {"weights", weights}});
  TORCH_CHECK_TYPE(at::isIntegralType(indices.scalar_type(), /*includeBool=*/false), op,
                   ": indices must hold integers (the forward's int64 indices), got dtype ",
                   indices.scalar_type());
  check_same_device(op, {{"queries", queries}, {"indices", indices}});
  const at::Tensor out = indices.to(at::kLong).contiguous();
  check_range(op, "indices", out, 0, keys.size(0) - 1, "index");
  return out;
}

}  // namespace fastalign::checks
