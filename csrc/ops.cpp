// Schemas of every fastalign operator. Device implementations register themselves in
// cpu/*.cpp and cuda/*.cu; fake (meta) kernels and autograd are registered from Python
// (fastalign/ops/*.py), following PyTorch's extension-cpp layout.
#include <Python.h>
#include <torch/library.h>

// Importing fastalign._C from Python runs the static TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastalign, m) {
  // direction: 0 t2i, 1 i2t, 2 both; align: 0 max, 1 lse; aggregate: 0 mean, 1 sum, 2 max,
  // 3 lse. Returns (scores, a_t2i, idx_t2i, a_i2t, idx_i2t): the aligned values are kept
  // when need_values, the arg-max indices (align max) when need_indices, else the tensors
  // are empty (see fastalign/ops/region_word.py for their exact meaning).
  m.def(
      "region_word_forward(Tensor regions, Tensor words, Tensor region_lengths, "
      "Tensor word_lengths, int direction, int align, int aggregate, float align_tau, "
      "float aggregate_tau, bool leaky, bool need_indices, bool need_values) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of regions and words from per-query-token coefficients dL/da (any strides;
  // padded tokens are never read); aux_* holds the arg-max indices (align max) or the
  // aligned values (align lse) of the forward.
  m.def(
      "region_word_backward(Tensor coef_t2i, Tensor aux_t2i, Tensor coef_i2t, "
      "Tensor aux_i2t, Tensor regions, Tensor words, Tensor region_lengths, "
      "Tensor word_lengths, int align, float align_tau, bool leaky) -> (Tensor, Tensor)");
  // Dimension-correlation loss of a, b (N, D) and, when need_grad, its gradients w.r.t. a
  // and b (for an upstream gradient of 1; empty tensors otherwise). mode: 0 barlow,
  // 1 softmax; path: 0 auto, 1 through C = A^T B / N, 2 through the N x N Gram matrices
  // (barlow only). Returns (loss (), grad_a (N, D), grad_b (N, D)).
  m.def(
      "dimension_correlation_loss_forward(Tensor a, Tensor b, int mode, "
      "float off_diagonal_weight, float tau, float eps, bool need_grad, int path) "
      "-> (Tensor, Tensor, Tensor)");
  // Sparse spatial loss of img, txt (N, D) and, when need_grad, its gradients w.r.t. img, txt
  // and alpha (N,) (for an upstream gradient of 1; empty tensors otherwise). kind: 0 inter,
  // 1 intra; select: 0 threshold, 1 soft, 2 topk (k used only there). Returns (loss (),
  // grad_img (N, D), grad_txt (N, D), grad_alpha (N,)).
  m.def(
      "sparse_spatial_loss_forward(Tensor img, Tensor txt, Tensor alpha, int kind, int select, "
      "int k, float temperature, bool largest, bool need_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Prototype assignment of x (N, D) to prototypes (K, D): mode 0 softmax, 1 hard (one-hot
  // of the first arg-max), 2 Sinkhorn in the log domain (iters iterations); cosine scores when
  // normalize. Returns the (N, K) assignments.
  m.def(
      "prototype_assign_forward(Tensor x, Tensor prototypes, int mode, float tau, int iters, "
      "bool normalize) -> Tensor");
  // Gradients of the softmax assignment w.r.t. x and prototypes from dL/dassignments and the
  // assignments themselves. Returns (grad_x (N, D), grad_prototypes (K, D)).
  m.def(
      "prototype_assign_backward(Tensor grad, Tensor assignments, Tensor x, "
      "Tensor prototypes, float tau, bool normalize) -> (Tensor, Tensor)");
  // EMA of the assignment-weighted means: (K, D); prototypes without mass keep their value;
  // rows that moved are L2-normalised when normalize.
  m.def(
      "prototype_update(Tensor prototypes, Tensor x, Tensor assignments, float momentum, "
      "bool normalize) -> Tensor");
  // MASK's top-m mixture: per query (N, D), the m keys (K, D) of highest cosine similarity,
  // softmax of their raw dot products / tau, weighted sum of their values (K, Dv). Returns
  // (out (N, Dv), indices (N, m) int64, weights (N, m)).
  m.def(
      "prototype_topk_mix_forward(Tensor queries, Tensor keys, Tensor values, int m, "
      "float tau) -> (Tensor, Tensor, Tensor)");
  // Gradients of the top-m mixture through the selected keys. Returns (grad_queries,
  // grad_keys, grad_values).
  m.def(
      "prototype_topk_mix_backward(Tensor grad, Tensor queries, Tensor keys, Tensor values, "
      "Tensor indices, Tensor weights, float tau) -> (Tensor, Tensor, Tensor)");
}
