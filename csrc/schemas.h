// The schema of every fastalign operator, defined once: csrc/ops.cpp declares them for
// torch.ops.fastalign, and the host emulation of the CUDA kernels (csrc/emulation/*.cpp) for
// torch.ops.fastalign_emulated. Option codes: csrc/option_codes.h.
#pragma once

namespace fastalign::schemas {

// direction (Direction), align (Align), aggregate (Aggregate). Returns (scores, a_t2i, idx_t2i,
// a_i2t, idx_i2t): the aligned values are kept when need_values, the arg-max indices (align max)
// when need_indices, else the tensors are empty (see fastalign/ops/region_word.py for their
// exact meaning).
constexpr const char* kRegionWordForward =
    "region_word_forward(Tensor regions, Tensor words, Tensor region_lengths, "
    "Tensor word_lengths, int direction, int align, int aggregate, float align_tau, "
    "float aggregate_tau, bool leaky, bool need_indices, bool need_values) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)";

// Gradients of regions and words from per-query-token coefficients dL/da (any strides; padded
// tokens are never read); aux_* holds the arg-max indices (align max) or the aligned values
// (align lse) of the forward.
constexpr const char* kRegionWordBackward =
    "region_word_backward(Tensor coef_t2i, Tensor aux_t2i, Tensor coef_i2t, "
    "Tensor aux_i2t, Tensor regions, Tensor words, Tensor region_lengths, "
    "Tensor word_lengths, int align, float align_tau, bool leaky) -> (Tensor, Tensor)";

// Dimension-correlation loss of a, b (N, D) and, when need_grad, its gradients w.r.t. a and b
// (for an upstream gradient of 1; empty tensors otherwise). mode: CorrelationMode; path:
// CorrelationPath. Returns (loss (), grad_a (N, D), grad_b (N, D)).
constexpr const char* kDimensionCorrelationLossForward =
    "dimension_correlation_loss_forward(Tensor a, Tensor b, int mode, "
    "float off_diagonal_weight, float tau, float eps, bool need_grad, int path) "
    "-> (Tensor, Tensor, Tensor)";

// Sparse spatial loss of img, txt (N, D) and, when need_grad, its gradients w.r.t. img, txt and
// alpha (N,) (for an upstream gradient of 1; empty tensors otherwise). kind: SpatialKind;
// select: SpatialSelect (k used only by topk). Returns (loss (), grad_img (N, D),
// grad_txt (N, D), grad_alpha (N,)).
constexpr const char* kSparseSpatialLossForward =
    "sparse_spatial_loss_forward(Tensor img, Tensor txt, Tensor alpha, int kind, int select, "
    "int k, float temperature, bool largest, bool need_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

// Prototype assignment of x (N, D) to prototypes (K, D): mode AssignMode (hard: one-hot of the
// first arg-max; sinkhorn: iters iterations in the log domain); cosine scores when normalize.
// Returns the (N, K) assignments.
constexpr const char* kPrototypeAssignForward =
    "prototype_assign_forward(Tensor x, Tensor prototypes, int mode, float tau, int iters, "
    "bool normalize) -> Tensor";

// Gradients of the softmax assignment w.r.t. x and prototypes from dL/dassignments and the
// assignments themselves. Returns (grad_x (N, D), grad_prototypes (K, D)).
constexpr const char* kPrototypeAssignBackward =
    "prototype_assign_backward(Tensor grad, Tensor assignments, Tensor x, "
    "Tensor prototypes, float tau, bool normalize) -> (Tensor, Tensor)";

// EMA of the assignment-weighted means: (K, D); prototypes without mass keep their value; rows
// that moved are L2-normalised when normalize.
constexpr const char* kPrototypeUpdate =
    "prototype_update(Tensor prototypes, Tensor x, Tensor assignments, float momentum, "
    "bool normalize) -> Tensor";

// MASK's top-m mixture: per query (N, D), the m keys (K, D) of highest cosine similarity,
// softmax of their raw dot products / tau, weighted sum of their values (K, Dv). Returns
// (out (N, Dv), indices (N, m) int64, weights (N, m)).
constexpr const char* kPrototypeTopkMixForward =
    "prototype_topk_mix_forward(Tensor queries, Tensor keys, Tensor values, int m, "
    "float tau) -> (Tensor, Tensor, Tensor)";

// Gradients of the top-m mixture through the selected keys. Returns (grad_queries, grad_keys,
// grad_values).
constexpr const char* kPrototypeTopkMixBackward =
    "prototype_topk_mix_backward(Tensor grad, Tensor queries, Tensor keys, Tensor values, "
    "Tensor indices, Tensor weights, float tau) -> (Tensor, Tensor, Tensor)";

}  // namespace fastalign::schemas
