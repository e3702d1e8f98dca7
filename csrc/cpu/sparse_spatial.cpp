// CPU sparse spatial loss (DIAS L_inter / L_intra): the loss and, when asked, its
// gradients w.r.t. img, txt and alpha in one call, in O(N^2) memory (one N x N buffer).
// Both kinds are one signed discrepancy D with E = |D|: inter D = V U^T - U V^T (= X - X^T,
// antisymmetric), intra D = V V^T - U U^T (= Y - Z, symmetric), for the row-normalised U, V.
// Inter D = P - P^T from one full BLAS product P = V U^T and a tiled in-place pass; intra D is
// built by the BLAS in strips of rows on and right of the diagonal and mirrored (exact zeros
// stay exact: a zero image row and a zero text row give D = 0, where |.| has its kink). One
// pass over the rows gives each row's mean and biased std (in double), selection, loss and,
// with a gradient, overwrites the row with Gamma = dL/dD (row-local). A tiled pass turns Gamma
// into Omega = Gamma +- Gamma^T in place, and two products with U and V give the gradients of
// the normalised rows: GEMMs, or for a hard selection (mostly zeros in Omega) a gather over the
// nonzeros (sparse_rows_matmul.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "../checks/sparse_spatial.h"
#include "../option_codes.h"
#include "cpu_info.h"
#include "sparse_rows_matmul.h"

namespace fastalign {
namespace {

// F.normalize's eps: a row of norm below it is divided by eps instead (a zero row gives
// zeros, never NaN).
constexpr double kNormEps = 1e-12;
// Rows per strip of the intra products: large enough that the BLAS runs at full speed.
constexpr int64_t kStripRows = 256;
// Side of the square tiles of the mirrored passes: a tile and its mirror stay in L1.
constexpr int64_t kTile = 64;
// Elements a thread gets at least in the row passes: smaller passes run inline.
constexpr int64_t kGrainElements = 1 << 15;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / cols); }

struct Options {
  int64_t kind, select, k;
  double temperature;
  bool largest;
};

// 1 / max(||x_r||, eps) for every row, x normalised into out; clamped[r] when ||x_r|| < eps
// (the norm then carries no gradient, as in F.normalize). Raises ValueError naming the first
// NaN or infinity (found in the same pass, located only then).
template <typename scalar_t>
void normalize_rows(const at::Tensor& x, const char* name, at::Tensor& out,
                    std::vector<double>& rnorm, std::vector<char>& clamped) {
  const int64_t n = x.size(0), d = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  std::vector<char> finite(n);
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = xp + r * d;
      double squares = 0.0;
      scalar_t check = 0;  // NaN once a NaN or an infinity is seen
#pragma omp simd reduction(+ : squares, check)
      for (int64_t c = 0; c < d; ++c) {
        squares += static_cast<double>(row[c]) * row[c];
        check += row[c] - row[c];
      }
      finite[r] = check == scalar_t(0);
      const double norm = std::sqrt(squares);
      clamped[r] = norm < kNormEps;
      rnorm[r] = 1.0 / std::max(norm, kNormEps);
      const auto scale = static_cast<scalar_t>(rnorm[r]);
      scalar_t* dst = op + r * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) dst[c] = row[c] * scale;
    }
  });
  if (std::find(finite.begin(), finite.end(), 0) != finite.end())
    checks::raise_non_finite("sparse_spatial_loss_forward", {{name, x}});
}

// (G_ab, G_ba) = f(G_ab, G_ba) for every pair a < b of the n x n row-major g, by pairs of
// kTile x kTile tiles (I, J >= I) in parallel. The mirror tile is copied, transposed, into a
// local buffer first: walking a column of g directly (a stride of n floats) would map every
// access to one L1 set.
template <typename scalar_t, typename F>
void transform_mirrored_pairs(scalar_t* g, int64_t n, const F& f) {
  const int64_t tiles = ceil_div(n, kTile), pairs = tiles * (tiles + 1) / 2;
  at::parallel_for(0, pairs, std::max<int64_t>(1, kGrainElements / (kTile * kTile)),
                   [&](int64_t begin, int64_t end) {
                     std::vector<scalar_t> mirror(kTile * kTile);  // [i * kTile + j] = G_ba
                     scalar_t* t = mirror.data();
                     for (int64_t pair = begin; pair < end; ++pair) {
                       int64_t ti = 0, rest = pair;  // the pair-th (I, J >= I), row-major
                       while (rest >= tiles - ti) rest -= tiles - ti++;
                       const int64_t tj = ti + rest;
                       const int64_t a0 = ti * kTile, b0 = tj * kTile;
                       const int64_t rows = std::min(kTile, n - a0);
                       const int64_t cols = std::min(kTile, n - b0);
                       for (int64_t j = 0; j < cols; ++j)
                         for (int64_t i = 0; i < rows; ++i)
                           t[i * kTile + j] = g[(b0 + j) * n + a0 + i];
                       for (int64_t i = 0; i < rows; ++i) {
                         scalar_t* row = g + (a0 + i) * n + b0;
                         scalar_t* mirrored = t + i * kTile;
                         // On a diagonal tile only the pairs above the diagonal (j > i).
                         for (int64_t j = ti == tj ? i + 1 : 0; j < cols; ++j)
                           f(row[j], mirrored[j]);
                       }
                       for (int64_t j = 0; j < cols; ++j)
                         for (int64_t i = 0; i < (ti == tj ? j : rows); ++i)
                           g[(b0 + j) * n + a0 + i] = t[i * kTile + j];
                     }
                   });
}

// Intra D = V V^T - U U^T (n x n): strips of rows [i0, i0 + kStripRows) against the columns
// from i0 on by the BLAS, then the lower triangle mirrored in one pass.
template <typename scalar_t>
at::Tensor intra_discrepancy(const at::Tensor& v, const at::Tensor& u) {
  const int64_t n = v.size(0);
  at::Tensor d = at::empty({n, n}, v.options());
  for (int64_t i0 = 0; i0 < n; i0 += kStripRows) {
    const int64_t rows = std::min(kStripRows, n - i0);
    at::Tensor strip = d.narrow(0, i0, rows).narrow(1, i0, n - i0);
    at::mm_out(strip, v.narrow(0, i0, rows), v.narrow(0, i0, n - i0).t());
    strip.addmm_(u.narrow(0, i0, rows), u.narrow(0, i0, n - i0).t(), 1.0, -1.0);
  }
  transform_mirrored_pairs(d.data_ptr<scalar_t>(), n,
                           [](scalar_t& upper, scalar_t& lower) { lower = upper; });
  return d;
}

// f(begin, end) for the column ranges [0, a) and [a + 1, n) of row a (a loop per range can be
// vectorised; one over the row with a test for b == a is not).
template <typename F>
inline void for_off_diagonal_ranges(int64_t a, int64_t n, const F& f) {
  f(0, a);
  f(a + 1, n);
}

// f(b, D_ab) for every column b != a of row a.
template <typename scalar_t, typename F>
inline void for_off_diagonal(scalar_t* row, int64_t a, int64_t n, const F& f) {
  for_off_diagonal_ranges(a, n, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b, row[b]);
  });
}

// The k-th entry of a row in the selection order (larger first when largest, smaller first
// otherwise; ties to the lower column index): an entry (e, b) is selected iff it does not come
// after (value, last) in that order.
template <typename scalar_t>
struct KthEntry {
  scalar_t value;
  int64_t last;
};

// One row's statistics, selection, loss, alpha gradient and (when gamma) Gamma = dL/dD in
// place. scratch holds n entries of per-thread work space.
template <typename scalar_t>
struct RowPass {
  const Options& o;
  int64_t n;
  const scalar_t* alpha;

  // Returns the row's sum of w * E^2; writes grad_alpha[a] (soft) and, when gamma, the row.
  double operator()(scalar_t* row, int64_t a, bool gamma, std::vector<scalar_t>& weights,
                    std::vector<std::pair<scalar_t, int64_t>>& order, scalar_t* grad_alpha) const {
    const double m = static_cast<double>(n - 1);
    const double sign = o.largest ? 1.0 : -1.0;
    double sum = 0.0;
    scalar_t low = std::numeric_limits<scalar_t>::infinity(), high = -low;
    for_off_diagonal_ranges(a, n, [&](int64_t begin, int64_t end) {
#pragma omp simd reduction(+ : sum) reduction(min : low) reduction(max : high)
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t e = std::abs(row[b]);
        sum += e;
        low = e < low ? e : low;
        high = e > high ? e : high;
      }
    });
    // A row of equal entries: mean = that value and std = 0 exactly (the rounded mean of
    // equal numbers can differ from them), so nothing passes a strict threshold.
    double mu = low, sigma = 0.0;
    if (low != high) {
      mu = sum / m;
      double squares = 0.0;
      for_off_diagonal_ranges(a, n, [&](int64_t begin, int64_t end) {
#pragma omp simd reduction(+ : squares)
        for (int64_t b = begin; b < end; ++b) {
          const double centered = std::abs(row[b]) - mu;
          squares += centered * centered;
        }
      });
      sigma = std::sqrt(squares / m);
    }
    const double alpha_a = static_cast<double>(alpha[a]);
    const double threshold = mu + sign * alpha_a * sigma;
    const double inv_n = 1.0 / static_cast<double>(n);
    // The selection, loss and G = 2 w E / N (sign(D) E = D) at once.
    if (o.select == SpatialSelect::kThreshold) {
      if (grad_alpha) grad_alpha[a] = 0;
      const auto scale = static_cast<scalar_t>(gamma ? 2.0 * inv_n : 0.0);
      double loss = 0.0;
      for_off_diagonal_ranges(a, n, [&](int64_t begin, int64_t end) {
#pragma omp simd reduction(+ : loss)
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t e = std::abs(row[b]);
          const scalar_t w = sign * (e - threshold) > 0.0 ? 1 : 0;
          loss += static_cast<double>(w * e) * e;
          if (gamma) row[b] = scale * w * row[b];
        }
      });
      if (gamma) row[a] = 0;
      return loss;
    }
    KthEntry<scalar_t> kth{0, 0};
    if (o.select == SpatialSelect::kTopk) {
      order.clear();
      for_off_diagonal(row, a, n,
                       [&](int64_t b, scalar_t dv) { order.emplace_back(std::abs(dv), b); });
      const bool largest = o.largest;
      auto first = [largest](const auto& p, const auto& q) {
        if (p.first != q.first) return largest ? p.first > q.first : p.first < q.first;
        return p.second < q.second;
      };
      std::nth_element(order.begin(), order.begin() + (o.k - 1), order.end(), first);
      kth = {order[o.k - 1].first, order[o.k - 1].second};
    }
    // Weights of the row (the diagonal gets 0), the loss and, in soft mode, c = sum_b E^2 w
    // (1 - w) / T, from which dL/dthreshold = -sign * c / N.
    double loss = 0.0, c = 0.0;
    weights[a] = 0;
    for_off_diagonal(row, a, n, [&](int64_t b, scalar_t dv) {
      const scalar_t e = std::abs(dv);
      double w;
      if (o.select == SpatialSelect::kTopk) {
        const bool before = o.largest ? e > kth.value : e < kth.value;
        w = before || (e == kth.value && b <= kth.last) ? 1.0 : 0.0;
      } else {
        w = 1.0 / (1.0 + std::exp(-sign * (e - threshold) / o.temperature));
        c += static_cast<double>(e) * e * w * (1.0 - w);
      }
      weights[b] = static_cast<scalar_t>(w);
      loss += w * e * e;
    });
    c /= o.temperature;
    const bool soft = o.select == SpatialSelect::kSoft;
    if (grad_alpha)  // dL/dalpha = dL/dthreshold * sign * sigma
      grad_alpha[a] = static_cast<scalar_t>(soft ? -c * sigma * inv_n : 0.0);
    if (!gamma) return loss;
    if (o.select == SpatialSelect::kTopk) {  // G = 2 w E / N and sign(D) E = D
      const auto scale = static_cast<scalar_t>(2.0 * inv_n);
      for (int64_t b = 0; b < n; ++b) row[b] = scale * weights[b] * row[b];
      return loss;
    }
    // Soft: G_ab = (2 w E + sign E^2 w (1 - w) / T) / N + r (1/M + sign alpha (E - mu) / (M
    // sigma)), r = dL/dthreshold, the second part through mu and sigma (none through sigma
    // where it is 0, as torch.std's backward).
    const double r = -sign * c * inv_n;
    const double through_sigma = sigma > 0.0 ? r * sign * alpha_a / (m * sigma) : 0.0;
    for_off_diagonal(row, a, n, [&](int64_t b, scalar_t dv) {
      const double e = std::abs(dv), w = weights[b];
      const double g = (2.0 * w * e + sign * e * e * w * (1.0 - w) / o.temperature) * inv_n +
                       r / m + through_sigma * (e - mu);
      row[b] = static_cast<scalar_t>(dv > 0 ? g : (dv < 0 ? -g : 0.0));
    });
    row[a] = 0;
    return loss;
  }
};

// G + sign * G^T in place, off the diagonal (left as it is): D from P, Omega from Gamma.
template <typename scalar_t>
void add_transpose_in_place(at::Tensor& square, scalar_t sign) {
  transform_mirrored_pairs(square.data_ptr<scalar_t>(), square.size(0),
                           [sign](scalar_t& upper, scalar_t& lower) {
                             upper += sign * lower;
                             lower = sign * upper;
                           });
}

// grad (dL/d normalised rows times `sign`) becomes dL/dx in place: rnorm * (g - u (u . g)),
// or rnorm * g for a clamped row.
template <typename scalar_t>
void normalize_backward(at::Tensor& grad, const at::Tensor& u, const std::vector<double>& rnorm,
                        const std::vector<char>& clamped, double sign) {
  const int64_t n = grad.size(0), d = grad.size(1);
  scalar_t* gp = grad.data_ptr<scalar_t>();
  const scalar_t* up = u.data_ptr<scalar_t>();
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g = gp + r * d;
      const scalar_t* ur = up + r * d;
      double dot = 0.0;
      if (!clamped[r]) {
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(ur[c]) * g[c];
      }
      const auto scale = static_cast<scalar_t>(sign * rnorm[r]);
      const auto projection = static_cast<scalar_t>(dot);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) g[c] = scale * (g[c] - ur[c] * projection);
    }
  });
}

template <typename scalar_t>
double loss_and_gradients(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& alpha,
                          const Options& o, at::Tensor& grad_img, at::Tensor& grad_txt,
                          at::Tensor& grad_alpha) {
  const int64_t n = img.size(0);
  const bool need_grad = grad_img.numel() > 0;
  at::Tensor u = at::empty_like(img), v = at::empty_like(txt);
  std::vector<double> rnorm_u(n), rnorm_v(n);
  std::vector<char> clamped_u(n), clamped_v(n);
  normalize_rows<scalar_t>(img, "img", u, rnorm_u, clamped_u);
  normalize_rows<scalar_t>(txt, "txt", v, rnorm_v, clamped_v);
  const auto mirror = static_cast<scalar_t>(o.kind == SpatialKind::kInter ? -1 : 1);
  at::Tensor d;
  if (o.kind == SpatialKind::kInter) {
    d = at::mm(v, u.t());  // P: one full product (strips would do 1.25 times its work)
    add_transpose_in_place<scalar_t>(d, mirror);
  } else {
    d = intra_discrepancy<scalar_t>(v, u);
  }

  const RowPass<scalar_t> row_pass{o, n, alpha.data_ptr<scalar_t>()};
  scalar_t* dp = d.data_ptr<scalar_t>();
  scalar_t* ga = need_grad ? grad_alpha.data_ptr<scalar_t>() : nullptr;
  std::vector<double> row_loss(n);
  at::parallel_for(0, n, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> weights(n);
    std::vector<std::pair<scalar_t, int64_t>> order;
    if (o.select == SpatialSelect::kTopk) order.reserve(n);
    for (int64_t a = begin; a < end; ++a)
      row_loss[a] = row_pass(dp + a * n, a, need_grad, weights, order, ga);
  });
  const double loss = std::accumulate(row_loss.begin(), row_loss.end(), 0.0) / n;
  if (!need_grad) return loss;

  add_transpose_in_place<scalar_t>(d, mirror);
  // inter: dL/dU = -Omega V, dL/dV = Omega U; intra: dL/dU = -Omega U, dL/dV = Omega V.
  // A hard selection leaves Omega mostly zeros: its nonzeros alone then make both products.
  const at::Tensor& x_img = o.kind == SpatialKind::kInter ? v : u;
  const at::Tensor& x_txt = o.kind == SpatialKind::kInter ? u : v;
  const bool dense = o.select == SpatialSelect::kSoft;
  if (dense || !sparse_rows_matmul(d, x_img, x_txt, grad_img, grad_txt)) {
    at::mm_out(grad_img, d, x_img);
    at::mm_out(grad_txt, d, x_txt);
  }
  d.reset();  // the N x N buffer is free before the last pass
  normalize_backward<scalar_t>(grad_img, u, rnorm_u, clamped_u, -1.0);
  normalize_backward<scalar_t>(grad_txt, v, rnorm_v, clamped_v, 1.0);
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_spatial_loss_forward_cpu(
    const at::Tensor& img_in, const at::Tensor& txt_in, const at::Tensor& alpha_in, int64_t kind,
    int64_t select, int64_t k, double temperature, bool largest, bool need_grad) {
  checks::check_sparse_spatial_arguments(checks::Kernels::kCpu, img_in, txt_in, alpha_in, kind,
                                         select, k, temperature);
  const at::Tensor img = img_in.contiguous(), txt = txt_in.contiguous();
  const at::Tensor alpha = alpha_in.contiguous();
  const auto grad_shape = [&](const at::Tensor& x) {
    return need_grad ? at::empty_like(x) : at::empty({0}, x.options());
  };
  at::Tensor grad_img = grad_shape(img), grad_txt = grad_shape(txt);
  at::Tensor grad_alpha = grad_shape(alpha);
  const Options o{kind, select, k, temperature, largest};
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "sparse_spatial_loss_forward_cpu", [&] {
    loss = loss_and_gradients<scalar_t>(img, txt, alpha, o, grad_img, grad_txt, grad_alpha);
  });
  return {at::scalar_tensor(loss, img.options()), grad_img, grad_txt, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("sparse_spatial_loss_forward", &sparse_spatial_loss_forward_cpu);
}

}  // namespace fastalign
