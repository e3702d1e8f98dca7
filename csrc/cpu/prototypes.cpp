// CPU prototype operators: assignment of rows to prototypes (softmax, hard arg-max,
// log-domain Sinkhorn) with the softmax backward, the EMA update of the prototypes, and MASK's
// top-m mixture with its backward. Every product runs on the BLAS in tiles that one thread
// owns, and each tile is consumed while it is in cache: softmax / arg-max of a block of rows,
// the rows of a gradient, or the merge of a query x key tile into the running top-m of each
// query. Beyond the (N, K) assignment itself no N x K tensor is ever formed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks/prototypes.h"
#include "../option_codes.h"
#include "cpu_info.h"
#include "../ranking.h"

namespace fastalign {
namespace {

using checks::check_finite;
using checks::Kernels;

// F.normalize's eps: rows are divided by max(||row||, kNormEps).
constexpr double kNormEps = 1e-12;
// Rows of the assignment per tile: a 128 x K logits tile (6 MiB at K = 12385) stays in L3
// between the GEMM and the softmax; narrower tiles cost the BLAS 25% of its speed here.
constexpr int64_t kAssignRows = 128;
// Prototypes per tile of the prototypes' gradient: an N x 64 slice of dL/dlogits.
constexpr int64_t kGradPrototypes = 64;
// Rows per block of the Sinkhorn passes (ATen's vectorised kernels on block-sized temporaries).
constexpr int64_t kSinkhornRows = 256;
// Query x key tile of the top-m search: 256 x 256 floats (256 KiB) stay in L2 during the merge,
// and each query block reads the keys once per 256 queries.
constexpr int64_t kQueryRows = 256;
constexpr int64_t kKeyCols = 256;
// Feature columns per task of the scatter-adds of the top-m backward: each task owns its
// columns of dL/dkeys and dL/dvalues, so no two threads write one element.
constexpr int64_t kScatterColumns = 64;

// An input as plain contiguous data: the out= products below refuse tensors that require grad,
// and autograd is registered from Python around these kernels.
at::Tensor as_data(const at::Tensor& t) { return t.detach().contiguous(); }

// 1 / max(||row||, eps) for every row of x (rows, D), as F.normalize divides.
at::Tensor inverse_norms(const at::Tensor& x) {
  return at::linalg_vector_norm(x, 2, {1}, false, std::nullopt).clamp_min(kNormEps).reciprocal();
}

// x * scale / max(||row||, eps) row by row when normalize, else x * scale.
at::Tensor scaled_rows(const at::Tensor& x, bool normalize, double scale) {
  if (!normalize) return scale == 1.0 ? x : x * scale;
  return x * (inverse_norms(x) * scale).unsqueeze(1);
}

// In place, the gradient through y = x / max(||x||, eps) row by row: g becomes
// (g - y <g, y>) / ||x|| where ||x|| > eps, and g / eps where the norm was clamped.
template <typename scalar_t>
void normalize_backward(at::Tensor& g, const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gp = g.data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* xr = xp + r * cols;
      scalar_t* gr = gp + r * cols;
      double squares = 0.0, dot = 0.0;
#pragma omp simd reduction(+ : squares, dot)
      for (int64_t c = 0; c < cols; ++c) {
        squares += static_cast<double>(xr[c]) * xr[c];
        dot += static_cast<double>(xr[c]) * gr[c];
      }
      const double norm = std::sqrt(squares);
      if (norm < kNormEps) {  // clamped: y = x / eps
        const auto inv = static_cast<scalar_t>(1.0 / kNormEps);
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) gr[c] *= inv;
        continue;
      }
      // (g - y <g, y>) / ||x|| with y = x / ||x||: <g, y> y = <g, x> x / ||x||^2
      const auto inv = static_cast<scalar_t>(1.0 / norm);
      const auto along = static_cast<scalar_t>(dot / squares);
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) gr[c] = (gr[c] - along * xr[c]) * inv;
    }
  });
}

// --------------------------------------------------------------------------- assignment
// Logits of rows [r0, r0 + rows) into `tile` (rows x K): the scaled rows times the unit
// prototypes, on this thread's BLAS.
void logits_tile(const at::Tensor& x_scaled, const at::Tensor& p_unit, int64_t r0, int64_t rows,
                 at::Tensor& tile) {
  at::mm_out(tile, x_scaled.narrow(0, r0, rows), p_unit.t());
}

// One-hot of the first arg-max of every row of `tile` into the same rows of out.
template <typename scalar_t>
void one_hot_rows(const at::Tensor& tile, at::Tensor& out_rows) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  const scalar_t* t = tile.data_ptr<scalar_t>();
  scalar_t* o = out_rows.data_ptr<scalar_t>();
  std::fill(o, o + rows * cols, scalar_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = t + r * cols;
    int64_t best = 0;
    for (int64_t c = 1; c < cols; ++c) best = row[c] > row[best] ? c : best;  // first wins ties
    o[r * cols + best] = scalar_t(1);
  }
}

// Sinkhorn-Knopp on log_q (N, K) = logits, in place, ending with Q = exp(log_q): each iteration
// shifts every column so that it sums to N / K, then every row so that it sums to 1 (SwAV's
// convention, transposed). Every exponential is of a value minus its column's or row's maximum:
// no overflow at any temperature. Block-sized temporaries only.
void sinkhorn_in_place(at::Tensor& log_q, int64_t iters) {
  const int64_t n = log_q.size(0), k = log_q.size(1);
  const double log_column_mass = std::log(static_cast<double>(n) / static_cast<double>(k));
  for (int64_t it = 0; it < iters; ++it) {
    const at::Tensor column_max = at::amax(log_q, {0}, true);  // (1, K)
    at::Tensor column_sum = at::zeros_like(column_max);
    for (int64_t r0 = 0; r0 < n; r0 += kSinkhornRows) {
      const at::Tensor block = log_q.narrow(0, r0, std::min(kSinkhornRows, n - r0));
      column_sum.add_(at::exp(block - column_max).sum(0, true));
    }
    const at::Tensor column_shift = column_max + column_sum.log_() - log_column_mass;
    for (int64_t r0 = 0; r0 < n; r0 += kSinkhornRows) {
      at::Tensor block = log_q.narrow(0, r0, std::min(kSinkhornRows, n - r0));
      block.sub_(column_shift);
      block.sub_(at::logsumexp(block, {1}, true));
    }
  }
  log_q.exp_();
}

at::Tensor prototype_assign_forward_cpu(const at::Tensor& x_in, const at::Tensor& p_in,
                                        int64_t mode, double tau, int64_t iters, bool normalize) {
  checks::check_prototype_assign_forward(Kernels::kCpu, x_in, p_in, mode, tau, iters);
  const at::Tensor x = as_data(x_in), p = as_data(p_in);
  constexpr const char* op = "prototype_assign_forward";
  check_finite(op, "x", x);
  check_finite(op, "prototypes", p);
  const int64_t n = x.size(0), k = p.size(0);
  // 1 / tau goes into the rows of x: the GEMM yields the logits (hard ignores the scale).
  const at::Tensor x_scaled =
      scaled_rows(x, normalize, mode == AssignMode::kHard ? 1.0 : 1.0 / tau);
  const at::Tensor p_unit = scaled_rows(p, normalize, 1.0);
  at::Tensor out = at::empty({n, k}, x.options());
  if (mode == AssignMode::kSinkhorn) {
    for (int64_t r0 = 0; r0 < n; r0 += kSinkhornRows) {  // the BLAS threads each block
      at::Tensor block = out.narrow(0, r0, std::min(kSinkhornRows, n - r0));
      logits_tile(x_scaled, p_unit, r0, block.size(0), block);
    }
    sinkhorn_in_place(out, iters);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prototype_assign_forward_cpu", [&] {
    at::parallel_for(0, ceil_div(n, kAssignRows), 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({kAssignRows, k}, x.options());
      for (int64_t block = begin; block < end; ++block) {
        const int64_t r0 = block * kAssignRows, rows = std::min(kAssignRows, n - r0);
        at::Tensor tile = buffer.narrow(0, 0, rows);
        logits_tile(x_scaled, p_unit, r0, rows, tile);
        at::Tensor out_rows = out.narrow(0, r0, rows);
        if (mode == AssignMode::kSoftmax) {
          at::_softmax_out(out_rows, tile, 1, false);
        } else {
          one_hot_rows<scalar_t>(tile, out_rows);
        }
      }
    });
  });
  return out;
}

// dL/dlogits = P * (G - <G, P>_row) / tau for rows [r0, r0 + rows) and columns [c0, c0 + cols)
// of G and P (N, K), into dst (rows x cols, row stride cols); row_dot holds <G, P> per row.
template <typename scalar_t>
void logits_gradient(const scalar_t* g, const scalar_t* p, const std::vector<double>& row_dot,
                     int64_t k, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                     double inv_tau, scalar_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gr = g + (r0 + r) * k + c0;
    const scalar_t* pr = p + (r0 + r) * k + c0;
    const auto dot = static_cast<scalar_t>(row_dot[r0 + r]);
    const auto scale = static_cast<scalar_t>(inv_tau);
    scalar_t* d = dst + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = pr[c] * (gr[c] - dot) * scale;
  }
}

template <typename scalar_t>
void assign_backward(const at::Tensor& g, const at::Tensor& assign, const at::Tensor& x,
                     const at::Tensor& p, const at::Tensor& x_unit, const at::Tensor& p_unit,
                     double inv_tau, bool normalize, at::Tensor& grad_x, at::Tensor& grad_p) {
  const int64_t n = x.size(0), k = p.size(0);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* ap = assign.data_ptr<scalar_t>();
  std::vector<double> row_dot(n);
  std::vector<char> finite(n);
  at::parallel_for(0, ceil_div(n, kAssignRows), 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({kAssignRows, k}, x.options());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kAssignRows, rows = std::min(kAssignRows, n - r0);
      at::Tensor tile = buffer.narrow(0, 0, rows);
      for (int64_t r = r0; r < r0 + rows; ++r) {  // the row's dS right after its <G, P>: in L2
        double dot = 0.0;
        scalar_t check = 0;  // NaN once a NaN or an infinity is read (v - v)
#pragma omp simd reduction(+ : dot, check)
        for (int64_t c = 0; c < k; ++c) {
          dot += static_cast<double>(gp[r * k + c]) * ap[r * k + c];
          check += (gp[r * k + c] - gp[r * k + c]) + (ap[r * k + c] - ap[r * k + c]);
        }
        row_dot[r] = dot;
        finite[r] = check == scalar_t(0);
        scalar_t* tile_row = tile.data_ptr<scalar_t>() + (r - r0) * k;
        logits_gradient(gp, ap, row_dot, k, r, 1, 0, k, inv_tau, tile_row);
      }
      at::Tensor grad_rows = grad_x.narrow(0, r0, rows);
      at::mm_out(grad_rows, tile, p_unit);
    }
  });
  if (std::find(finite.begin(), finite.end(), 0) != finite.end())  // located only now
    checks::raise_non_finite("prototype_assign_backward", {{"grad", g}, {"assignments", assign}});
  at::parallel_for(0, ceil_div(k, kGradPrototypes), 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({n, kGradPrototypes}, x.options());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kGradPrototypes, cols = std::min(kGradPrototypes, k - c0);
      at::Tensor tile = buffer.view({-1}).narrow(0, 0, n * cols).view({n, cols});
      logits_gradient(gp, ap, row_dot, k, 0, n, c0, cols, inv_tau, tile.data_ptr<scalar_t>());
      at::Tensor grad_rows = grad_p.narrow(0, c0, cols);
      at::mm_out(grad_rows, tile.t(), x_unit);
    }
  });
  if (normalize) {
    normalize_backward<scalar_t>(grad_x, x);
    normalize_backward<scalar_t>(grad_p, p);
  }
}

// Gradients of the softmax assignment w.r.t. x and the prototypes, from G = dL/dP and P itself
// (the forward's output: nothing else was saved). dL/dx_unit = dS p_unit row block by row
// block, dL/dp_unit = dS^T x_unit prototype block by prototype block, dS rebuilt per tile from
// G and P; then the gradient through the normalisation.
std::tuple<at::Tensor, at::Tensor> prototype_assign_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& assign_in, const at::Tensor& x_in,
    const at::Tensor& p_in, double tau, bool normalize) {
  checks::check_prototype_assign_backward(Kernels::kCpu, grad_in, assign_in, x_in, p_in, tau);
  const at::Tensor g = as_data(grad_in).to(x_in.scalar_type());
  const at::Tensor assign = as_data(assign_in), x = as_data(x_in), p = as_data(p_in);
  constexpr const char* op = "prototype_assign_backward";
  check_finite(op, "x", x);  // grad and assignments: in the kernel's first pass
  check_finite(op, "prototypes", p);
  const int64_t n = x.size(0), k = p.size(0), d = x.size(1);
  const at::Tensor x_unit = scaled_rows(x, normalize, 1.0);
  const at::Tensor p_unit = scaled_rows(p, normalize, 1.0);
  at::Tensor grad_x = at::empty({n, d}, x.options()), grad_p = at::empty({k, d}, p.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prototype_assign_backward_cpu", [&] {
    assign_backward<scalar_t>(g, assign, x, p, x_unit, p_unit, 1.0 / tau, normalize, grad_x,
                              grad_p);
  });
  return {grad_x, grad_p};
}

// --------------------------------------------------------------------------- EMA update
template <typename scalar_t>
void ema_rows(const at::Tensor& p, const at::Tensor& mass, double momentum, bool normalize,
              at::Tensor& out) {
  const int64_t k = p.size(0), d = p.size(1);
  const scalar_t* pp = p.data_ptr<scalar_t>();
  const double* mp = mass.data_ptr<double>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, k, std::max<int64_t>(1, (1 << 14) / d), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      scalar_t* row = o + r * d;
      const scalar_t* old = pp + r * d;
      if (!(mp[r] > 0.0)) {  // no mass: the prototype keeps its value
        std::copy(old, old + d, row);
        continue;
      }
      const auto keep = static_cast<scalar_t>(momentum);
      const auto take = static_cast<scalar_t>((1.0 - momentum) / mp[r]);
      double squares = 0.0;
#pragma omp simd reduction(+ : squares)
      for (int64_t c = 0; c < d; ++c) {
        row[c] = keep * old[c] + take * row[c];
        squares += static_cast<double>(row[c]) * row[c];
      }
      if (normalize) {
        const auto inv = static_cast<scalar_t>(1.0 / std::max(std::sqrt(squares), kNormEps));
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) row[c] *= inv;
      }
    }
  });
}

at::Tensor prototype_update_cpu(const at::Tensor& p_in, const at::Tensor& x_in,
                                const at::Tensor& assign_in, double momentum, bool normalize) {
  checks::check_prototype_update(Kernels::kCpu, p_in, x_in, assign_in, momentum);
  const at::Tensor p = as_data(p_in), x = as_data(x_in);
  const at::Tensor assign = as_data(assign_in);
  constexpr const char* op = "prototype_update";
  check_finite(op, "prototypes", p);
  check_finite(op, "x", x);
  check_finite(op, "assignments", assign);
  at::Tensor out = at::mm(assign.t(), x);  // (K, D) sums of assignment-weighted rows
  const at::Tensor mass = assign.sum(0, false, at::kDouble);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "prototype_update_cpu", [&] {
    ema_rows<scalar_t>(p, mass, momentum, normalize, out);
  });
  return out;
}

// --------------------------------------------------------------------------- top-m mixture
// A query's running top-m, sorted by cosine, descending: cosine, raw dot product, key index.
template <typename scalar_t>
struct TopList {
  scalar_t* cosine;
  scalar_t* dot;
  int64_t* index;
  int64_t m;

  scalar_t worst() const { return cosine[m - 1]; }

  // Called when c takes over worst(); keys arrive in increasing index order, so on a tie the
  // lower index stays ahead (the insertion is the CUDA scan's, csrc/ranking.h).
  void insert(scalar_t c, scalar_t raw, int64_t j) {
    top_list_insert(cosine, dot, index, m, c, raw, j);
  }
};

template <typename scalar_t>
void topk_mix_forward(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& v, int64_t m,
                      double tau, at::Tensor& out, at::Tensor& indices, at::Tensor& weights) {
  const int64_t n = q.size(0), k = keys.size(0), dv = v.size(1);
  const at::Tensor inv_q = inverse_norms(q), inv_k = inverse_norms(keys);
  const scalar_t* iq = inv_q.data_ptr<scalar_t>();
  const scalar_t* ik = inv_k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  int64_t* idx = indices.data_ptr<int64_t>();
  scalar_t* w = weights.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, ceil_div(n, kQueryRows), 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({kQueryRows, kKeyCols}, q.options());
    std::vector<scalar_t> cosine(kQueryRows * m), dot(kQueryRows * m);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kQueryRows, rows = std::min(kQueryRows, n - r0);
      std::fill(cosine.begin(), cosine.end(), -std::numeric_limits<scalar_t>::infinity());
      std::fill(dot.begin(), dot.end(), -std::numeric_limits<scalar_t>::infinity());
      // A key index even where a cosine overflows to -inf and never enters.
      std::fill(idx + r0 * m, idx + (r0 + rows) * m, int64_t(0));
      auto list = [&](int64_t r) {
        return TopList<scalar_t>{cosine.data() + r * m, dot.data() + r * m, idx + (r0 + r) * m,
                                 m};
      };
      const at::Tensor q_rows = q.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < k; c0 += kKeyCols) {
        const int64_t cols = std::min(kKeyCols, k - c0);
        at::Tensor dots = tile.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(dots, q_rows, keys.narrow(0, c0, cols).t());
        const scalar_t* t = dots.data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r) {
          TopList<scalar_t> top = list(r);
          const scalar_t* row = t + r * cols;
          const scalar_t scale = iq[r0 + r];
          scalar_t worst = top.worst();
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t cos = row[c] * scale * ik[c0 + c];
            if (takes_over(cos, worst)) {
              top.insert(cos, row[c], c0 + c);
              worst = top.worst();
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax over the m raw dot products / tau
        const TopList<scalar_t> top = list(r);
        scalar_t* wr = w + (r0 + r) * m;
        double best = -std::numeric_limits<double>::infinity(), total = 0.0;
        for (int64_t j = 0; j < m; ++j) best = std::max(best, static_cast<double>(top.dot[j]));
        for (int64_t j = 0; j < m; ++j) total += std::exp((top.dot[j] - best) / tau);
        for (int64_t j = 0; j < m; ++j)
          wr[j] = static_cast<scalar_t>(std::exp((top.dot[j] - best) / tau) / total);
        scalar_t* orow = o + (r0 + r) * dv;
        std::fill(orow, orow + dv, scalar_t(0));
        for (int64_t j = 0; j < m; ++j) {
          const scalar_t* vr = vp + top.index[j] * dv;
          const scalar_t wj = wr[j];
#pragma omp simd
          for (int64_t c = 0; c < dv; ++c) orow[c] += wj * vr[c];
        }
      }
    }
  });
}

// Forward of the top-m mixture: per query, the m keys of highest cosine similarity (lowest
// index first on ties), softmax of their raw dot products / tau, and the weighted sum of their
// values. Query blocks run in parallel; each streams over the keys in kKeyCols tiles (raw dot
// products on the BLAS, cosine = dot / (|q| |k|) in the merge).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_topk_mix_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t m,
    double tau) {
  checks::check_prototype_topk_mix_forward(Kernels::kCpu, q_in, k_in, v_in, m, tau);
  const at::Tensor q = as_data(q_in), keys = as_data(k_in), v = as_data(v_in);
  constexpr const char* op = "prototype_topk_mix_forward";
  check_finite(op, "queries", q);
  check_finite(op, "keys", keys);
  check_finite(op, "values", v);
  const int64_t n = q.size(0), dv = v.size(1);
  at::Tensor out = at::empty({n, dv}, q.options());
  at::Tensor indices = at::empty({n, m}, q.options().dtype(at::kLong));
  at::Tensor weights = at::empty({n, m}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prototype_topk_mix_forward_cpu", [&] {
    topk_mix_forward<scalar_t>(q, keys, v, m, tau, out, indices, weights);
  });
  return {out, indices, weights};
}

template <typename scalar_t>
void topk_mix_backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& keys,
                       const at::Tensor& v, const at::Tensor& indices, const at::Tensor& weights,
                       double tau, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  const int64_t n = q.size(0), d = q.size(1), dv = v.size(1), m = indices.size(1);
  at::Tensor coef = at::empty({n, m}, q.options());
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = keys.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const scalar_t* w = weights.data_ptr<scalar_t>();
  scalar_t* cp = coef.data_ptr<scalar_t>();
  scalar_t* gq = grad_q.data_ptr<scalar_t>();
  std::vector<char> finite(n);
  at::parallel_for(0, n, std::max<int64_t>(1, 256 / m), [&](int64_t b, int64_t e) {
    std::vector<double> gv(m);
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* gr = gp + r * dv;
      scalar_t check = 0;  // NaN once a NaN or an infinity of G_n or a picked row is read
      double mean = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        const scalar_t* vr = vp + idx[r * m + j] * dv;
        double dot = 0.0;
#pragma omp simd reduction(+ : dot, check)
        for (int64_t c = 0; c < dv; ++c) {
          dot += static_cast<double>(gr[c]) * vr[c];
          check += (gr[c] - gr[c]) + (vr[c] - vr[c]);
        }
        gv[j] = dot;
        mean += w[r * m + j] * dot;
      }
      scalar_t* out = gq + r * d;
      std::fill(out, out + d, scalar_t(0));
      for (int64_t j = 0; j < m; ++j) {
        const auto cj = static_cast<scalar_t>(w[r * m + j] * (gv[j] - mean) / tau);
        cp[r * m + j] = cj;
        const scalar_t* kr = kp + idx[r * m + j] * d;
#pragma omp simd reduction(+ : check)
        for (int64_t c = 0; c < d; ++c) {
          out[c] += cj * kr[c];
          check += kr[c] - kr[c];
        }
      }
      finite[r] = check == scalar_t(0);
    }
  });
  if (std::find(finite.begin(), finite.end(), 0) != finite.end())  // located only now
    checks::raise_non_finite("prototype_topk_mix_backward",
                             {{"grad", g}, {"keys", keys}, {"values", v}});
  // Column slices of dL/dkeys (D columns) then of dL/dvalues (Dv columns), one task each.
  const int64_t key_tasks = ceil_div(d, kScatterColumns);
  const int64_t tasks = key_tasks + ceil_div(dv, kScatterColumns);
  scalar_t* gk = grad_k.data_ptr<scalar_t>();
  scalar_t* gvp = grad_v.data_ptr<scalar_t>();
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const bool key_side = task < key_tasks;
      const int64_t width = key_side ? d : dv;
      const int64_t c0 = (key_side ? task : task - key_tasks) * kScatterColumns;
      const int64_t c1 = std::min(width, c0 + kScatterColumns);
      const scalar_t* src = key_side ? qp : gp;  // q_n for dk, G_n for dv
      const scalar_t* scale = key_side ? cp : w;
      scalar_t* dst = key_side ? gk : gvp;
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* sr = src + r * width;
        for (int64_t j = 0; j < m; ++j) {
          scalar_t* dr = dst + idx[r * m + j] * width;
          const scalar_t s = scale[r * m + j];
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) dr[c] += s * sr[c];
        }
      }
    }
  });
}

// Backward of the top-m mixture through the selected keys only (the selection carries no
// gradient): with gv_j = <G_n, v_idx_j> and coefficients c_j = w_j (gv_j - sum_i w_i gv_i) / tau,
// dq_n = sum_j c_j k_idx_j, dk_idx_j += c_j q_n, dv_idx_j += w_j G_n. The scatter-adds run over
// column slices, one per task, so no two threads add into one element and the order is fixed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_topk_mix_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& idx_in, const at::Tensor& w_in, double tau) {
  const at::Tensor indices = checks::check_prototype_topk_mix_backward(
      Kernels::kCpu, grad_in, q_in, k_in, v_in, idx_in, w_in, tau);
  const at::Tensor g = as_data(grad_in);
  const at::Tensor q = as_data(q_in), keys = as_data(k_in), v = as_data(v_in);
  const at::Tensor weights = as_data(w_in);
  // grad and the key and value rows the indices pick: in the kernel's first pass (the rows
  // no index picks are never read, and the reference's gradient does not see them either)
  constexpr const char* op = "prototype_topk_mix_backward";
  check_finite(op, "queries", q);
  check_finite(op, "weights", weights);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::zeros_like(keys), grad_v = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prototype_topk_mix_backward_cpu", [&] {
    topk_mix_backward<scalar_t>(g, q, keys, v, indices, weights, tau, grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("prototype_assign_forward", &prototype_assign_forward_cpu);
  m.impl("prototype_assign_backward", &prototype_assign_backward_cpu);
  m.impl("prototype_update", &prototype_update_cpu);
  m.impl("prototype_topk_mix_forward", &prototype_topk_mix_forward_cpu);
  m.impl("prototype_topk_mix_backward", &prototype_topk_mix_backward_cpu);
}

}  // namespace fastalign
