// CPU dimension-correlation loss: the loss and its gradients w.r.t. a and b in
// one call. One pass over the rows of a and b gives every column's statistics (in double)
// and C's diagonal, and catches NaN and infinity. Every product runs on the BLAS. Without a
// gradient, C comes from one product of the raw a with standardised b (blocks of up to 4096
// rows) and a rank-one correction. With one, A_hat and B_hat are built in the gradients' buffers,
// C = A^T B, dL/dC overwrites C (with the column sums that the standardisation's backward
// needs, which follow from C and dL/dC), and dL/dA_hat = B_hat G^T, dL/dB_hat = A_hat G
// replace them block by block. For barlow with N < D the two symmetric N x N Gram matrices
// replace C: ||C||_F^2 = <A A^T, B B^T>_F / N^2, and the gradients follow without forming C.
// Few, large parallel regions: on a loaded machine each one may wait for a descheduled thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../checks/dimension_correlation.h"
#include "../option_codes.h"
#include "cpu_info.h"

namespace fastalign {
namespace {

// Column sums stream the rows in at most kMaxChunks chunks of at least kMinChunkRows rows (and
// kGrainElements elements), one partial per chunk, added in a fixed order: the result does not
// depend on the thread count.
constexpr int64_t kMaxChunks = 16;
constexpr int64_t kMinChunkRows = 64;
// Rows per block of standardised rows. One long product runs measurably faster than several
// accumulated ones (15-30% at N = 4096 with blocks of 1024 rows, on 2 threads), so up to this
// many rows take one GEMM; beyond, the blocks bound the memory.
constexpr int64_t kProductRows = 4096;
// Rows per block of the symmetric Gram products.
constexpr int64_t kGramRows = 64;
// Elements a thread gets at least in the elementwise passes: smaller passes run inline. On a
// loaded machine every parallel region may wait for a descheduled thread.
constexpr int64_t kGrainElements = 1 << 15;
// Rows summed in the inputs' precision before the sums go into double.
constexpr int64_t kSubRows = 16;
// Rows of C per block of the softmax passes, which bounds ATen's temporaries to kRows x D.
constexpr int64_t kRows = 64;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrainElements / cols); }

struct Options {
  int64_t mode;
  double off_diagonal_weight, tau, eps;
};

// n_sums column sums over the rows [0, rows): accumulate_row(r, local) adds row r into local
// (n_sums x cols, in scalar_t: full SIMD width), which goes into double every kSubRows rows.
// The chunks of rows run in parallel.
template <typename scalar_t, typename F>
std::vector<double> column_sums(int64_t rows, int64_t cols, int64_t n_sums,
                                const F& accumulate_row) {
  const int64_t min_rows = std::max(kMinChunkRows, row_grain(cols));
  const int64_t n_chunks = std::min(kMaxChunks, ceil_div(rows, min_rows));
  const int64_t chunk_rows = ceil_div(rows, n_chunks);
  const int64_t width = n_sums * cols;
  std::vector<double> partial(n_chunks * width, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> local(width);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* p = partial.data() + chunk * width;
      const int64_t r1 = std::min(rows, (chunk + 1) * chunk_rows);
      for (int64_t q0 = chunk * chunk_rows; q0 < r1; q0 += kSubRows) {
        std::fill(local.begin(), local.end(), scalar_t(0));
        for (int64_t r = q0; r < std::min(r1, q0 + kSubRows); ++r) accumulate_row(r, local.data());
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) p[i] += local[i];
      }
    }
  });
  std::vector<double> total(partial.begin(), partial.begin() + width);
  for (int64_t chunk = 1; chunk < n_chunks; ++chunk) {
    const double* p = partial.data() + chunk * width;
    for (int64_t i = 0; i < width; ++i) total[i] += p[i];
  }
  return total;
}

// Column statistics of a and b: x_hat = (x - mean) * rstd, rstd = 1 / sqrt(biased variance +
// eps), in the inputs' precision as the kernels apply them; diag[k] = C_kk in double.
template <typename scalar_t>
struct Stats {
  std::vector<scalar_t> mean_a, rstd_a, mean_b, rstd_b;
  std::vector<double> diag;
};

// One pass over the rows of a and b (rows, cols), shifted by the first row so that a large
// mean costs no precision. Raises ValueError naming the first NaN or infinity.
template <typename scalar_t>
Stats<scalar_t> column_stats(const scalar_t* a, const scalar_t* b, int64_t rows, int64_t cols,
                             double eps) {
  const std::vector<scalar_t> shift_a(a, a + cols), shift_b(b, b + cols);
  const scalar_t* sa = shift_a.data();
  const scalar_t* sb = shift_b.data();
  enum { kSumA, kSquaresA, kSumB, kSquaresB, kCross, kCheckA, kCheckB, kSums };
  const auto sums = column_sums<scalar_t>(rows, cols, kSums, [&](int64_t r, scalar_t* local) {
    const scalar_t* ar = a + r * cols;
    const scalar_t* br = b + r * cols;
    scalar_t* sum_a = local + kSumA * cols;
    scalar_t* squares_a = local + kSquaresA * cols;
    scalar_t* sum_b = local + kSumB * cols;
    scalar_t* squares_b = local + kSquaresB * cols;
    scalar_t* cross = local + kCross * cols;
    scalar_t* check_a = local + kCheckA * cols;
    scalar_t* check_b = local + kCheckB * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const scalar_t x = ar[c] - sa[c], y = br[c] - sb[c];
      sum_a[c] += x;
      squares_a[c] += x * x;
      sum_b[c] += y;
      squares_b[c] += y * y;
      cross[c] += x * y;
      check_a[c] += ar[c] - ar[c];  // NaN from a NaN or an infinity on
      check_b[c] += br[c] - br[c];
    }
  });
  for (const auto& [name, check] : {std::pair{"a", kCheckA}, std::pair{"b", kCheckB}}) {
    for (int64_t c = 0; c < cols; ++c) {
      if (sums[check * cols + c] == 0.0) continue;
      // located only now: the first non-finite element in row-major order, as everywhere
      const at::Tensor x = at::from_blob(const_cast<scalar_t*>(check == kCheckA ? a : b),
                                         {rows, cols}, at::dtype<scalar_t>());
      checks::raise_non_finite("dimension_correlation_loss_forward", {{name, x}});
    }
  }
  Stats<scalar_t> s{std::vector<scalar_t>(cols), std::vector<scalar_t>(cols),
                    std::vector<scalar_t>(cols), std::vector<scalar_t>(cols),
                    std::vector<double>(cols)};
  const double inv_rows = 1.0 / static_cast<double>(rows);
  for (int64_t c = 0; c < cols; ++c) {
    const double mean_a = sums[kSumA * cols + c] * inv_rows;  // of the shifted values
    const double mean_b = sums[kSumB * cols + c] * inv_rows;
    const double var_a = std::max(sums[kSquaresA * cols + c] * inv_rows - mean_a * mean_a, 0.0);
    const double var_b = std::max(sums[kSquaresB * cols + c] * inv_rows - mean_b * mean_b, 0.0);
    const double cov = sums[kCross * cols + c] * inv_rows - mean_a * mean_b;
    const double rstd_a = 1.0 / std::sqrt(var_a + eps), rstd_b = 1.0 / std::sqrt(var_b + eps);
    s.mean_a[c] = static_cast<scalar_t>(static_cast<double>(sa[c]) + mean_a);
    s.mean_b[c] = static_cast<scalar_t>(static_cast<double>(sb[c]) + mean_b);
    s.rstd_a[c] = static_cast<scalar_t>(rstd_a);
    s.rstd_b[c] = static_cast<scalar_t>(rstd_b);
    s.diag[c] = cov * rstd_a * rstd_b;
  }
  return s;
}

// Columns [c0, c1) of rows [r0, r1) of x (rows of `ld` elements), standardised with the column
// statistics mean and rstd into out ((r1 - r0) x (c1 - c0), contiguous).
template <typename scalar_t>
void standardize_block(const scalar_t* x, const scalar_t* mean, const scalar_t* rstd, int64_t ld,
                       int64_t r0, int64_t r1, int64_t c0, int64_t c1, scalar_t* out) {
  const int64_t width = c1 - c0;
  at::parallel_for(r0, r1, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src = x + r * ld;
      scalar_t* dst = out + (r - r0) * width - c0;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] = (src[c] - mean[c]) * rstd[c];
    }
  });
}

// Rows [r0, r1) of a and b (rows, cols), standardised into a_out and b_out (r1 - r0, cols).
template <typename scalar_t>
void standardize_rows(const scalar_t* a, const scalar_t* b, const Stats<scalar_t>& s, int64_t r0,
                      int64_t r1, scalar_t* a_out, scalar_t* b_out) {
  const int64_t cols = static_cast<int64_t>(s.mean_a.size());
  standardize_block(a, s.mean_a.data(), s.rstd_a.data(), cols, r0, r1, 0, cols, a_out);
  standardize_block(b, s.mean_b.data(), s.rstd_b.data(), cols, r0, r1, 0, cols, b_out);
}

// N * C = A_hat^T B_hat without a gradient, with only b standardised (in blocks of
// kProductRows rows): since A_hat = (A - 1 mean_a^T) diag(rstd_a),
// N C = diag(rstd_a) (A^T B_hat - mean_a s^T), s = the column sums of B_hat as stored (zero but
// for rounding). One product over the raw rows of a, and one standardised copy instead of two.
template <typename scalar_t>
at::Tensor correlation_from_raw_a(const at::Tensor& a, const at::Tensor& b,
                                  const Stats<scalar_t>& s) {
  const int64_t n = a.size(0), d = a.size(1);
  at::Tensor b_hat = at::empty({std::min(n, kProductRows), d}, b.options());
  at::Tensor c = at::empty({d, d}, a.options());
  std::vector<scalar_t> column_sums_b(d, scalar_t(0));
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const scalar_t* mean_b = s.mean_b.data();
  const scalar_t* rstd_b = s.rstd_b.data();
  for (int64_t r0 = 0; r0 < n; r0 += kProductRows) {
    const int64_t r1 = std::min(n, r0 + kProductRows);
    scalar_t* out = b_hat.data_ptr<scalar_t>() - r0 * d;
    // Standardise the block and sum its columns as stored, in one pass.
    const std::vector<double> sums =
        column_sums<scalar_t>(r1 - r0, d, 1, [&](int64_t r, scalar_t* local) {
          const scalar_t* src = bp + (r0 + r) * d;
          scalar_t* dst = out + (r0 + r) * d;
#pragma omp simd
          for (int64_t col = 0; col < d; ++col) {
            dst[col] = (src[col] - mean_b[col]) * rstd_b[col];
            local[col] += dst[col];
          }
        });
    for (int64_t col = 0; col < d; ++col) column_sums_b[col] += static_cast<scalar_t>(sums[col]);
    const at::Tensor b_rows = b_hat.narrow(0, 0, r1 - r0);
    const at::Tensor a_rows = a.narrow(0, r0, r1 - r0);
    if (r0 == 0) {
      at::mm_out(c, a_rows.t(), b_rows);
    } else {
      c.addmm_(a_rows.t(), b_rows);
    }
  }
  const scalar_t* sums = column_sums_b.data();
  at::parallel_for(0, d, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      scalar_t* row = c.data_ptr<scalar_t>() + k * d;
      const scalar_t mean = s.mean_a[k], rstd = s.rstd_a[k];
#pragma omp simd
      for (int64_t l = 0; l < d; ++l) row[l] = (row[l] - mean * sums[l]) * rstd;
    }
  });
  return c;
}

// The sums the standardisation's backward needs, added into sums (4 x cols): sum_r ga,
// sum_r ga * a_hat, sum_r gb, sum_r gb * b_hat over `rows` rows (every pointer at the block's
// first row). A null ga (or gb) skips that pair.
template <typename scalar_t>
void add_gradient_sums(const scalar_t* ga, const scalar_t* a_hat, const scalar_t* gb,
                       const scalar_t* b_hat, int64_t rows, int64_t cols,
                       std::vector<double>& sums) {
  const auto block = column_sums<scalar_t>(rows, cols, 4, [&](int64_t r, scalar_t* local) {
    if (ga) {
      const scalar_t* gr = ga + r * cols;
      const scalar_t* xr = a_hat + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        local[c] += gr[c];
        local[cols + c] += gr[c] * xr[c];
      }
    }
    if (gb) {
      const scalar_t* gr = gb + r * cols;
      const scalar_t* xr = b_hat + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        local[2 * cols + c] += gr[c];
        local[3 * cols + c] += gr[c] * xr[c];
      }
    }
  });
  for (int64_t i = 0; i < 4 * cols; ++i) sums[i] += block[i];
}

// The gradient through the standardisation, for a and b at once: out = rstd * (g - mean(g) -
// x_hat * mean(g * x_hat)) for g = dL/dx_hat (rows, cols), given the sums of add_gradient_sums;
// x_hat is recomputed from x. out may be g.
template <typename scalar_t>
void standardize_backward(const scalar_t* a, const scalar_t* b, const Stats<scalar_t>& s,
                          const std::vector<double>& sums, const scalar_t* ga,
                          const scalar_t* gb, scalar_t* out_a, scalar_t* out_b, int64_t rows) {
  const int64_t cols = static_cast<int64_t>(s.mean_a.size());
  std::vector<scalar_t> means(4 * cols);  // mean(ga), mean(ga * a_hat), mean(gb), ...
  for (int64_t i = 0; i < 4 * cols; ++i)
    means[i] = static_cast<scalar_t>(sums[i] / static_cast<double>(rows));
  const scalar_t* ma = s.mean_a.data();
  const scalar_t* ra = s.rstd_a.data();
  const scalar_t* mb = s.mean_b.data();
  const scalar_t* rb = s.rstd_b.data();
  const scalar_t* mga = means.data();
  const scalar_t* mgxa = means.data() + cols;
  const scalar_t* mgb = means.data() + 2 * cols;
  const scalar_t* mgxb = means.data() + 3 * cols;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* ar = a + r * cols;
      const scalar_t* br = b + r * cols;
      const scalar_t* gar = ga + r * cols;
      const scalar_t* gbr = gb + r * cols;
      scalar_t* a_dst = out_a + r * cols;
      scalar_t* b_dst = out_b + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const scalar_t x = (ar[c] - ma[c]) * ra[c], y = (br[c] - mb[c]) * rb[c];
        a_dst[c] = ra[c] * (gar[c] - mga[c] - x * mgxa[c]);
        b_dst[c] = rb[c] * (gbr[c] - mgb[c] - y * mgxb[c]);
      }
    }
  });
}

// With A_hat in grad_a and B_hat in grad_b: dL/dA_hat = B_hat H^T and dL/dB_hat = A_hat H
// (H = dL/dC / N, in h) in their place, kProductRows rows at a time: a block's rows of both
// results depend only on the same rows of A_hat and B_hat, so each overwrites rows already
// consumed, and only one block of rows is extra memory.
void gradients_by_row_blocks(const at::Tensor& h, at::Tensor& grad_a, at::Tensor& grad_b) {
  const int64_t n = grad_a.size(0);
  at::Tensor buffer = at::empty({std::min(n, kProductRows), grad_a.size(1)}, grad_a.options());
  for (int64_t r0 = 0; r0 < n; r0 += kProductRows) {
    const int64_t rows = std::min(n - r0, kProductRows);
    at::Tensor a_rows = grad_a.narrow(0, r0, rows), b_rows = grad_b.narrow(0, r0, rows);
    at::Tensor result_a = buffer.narrow(0, 0, rows);
    at::mm_out(result_a, b_rows, h.t());
    at::mm_out(b_rows, a_rows, h);  // B_hat's rows are consumed
    a_rows.copy_(result_a);         // and now A_hat's
  }
}

// Through C the sums that standardize_backward needs come from C and H alone (D x D work
// instead of N x D): sum_n dL/dA_hat[n, k] * A_hat[n, k] = sum_l H_kl (A_hat^T B_hat)_kl =
// sum_l H_kl c_kl, likewise sum_k H_kl c_kl for B, and sum_n dL/dA_hat[n, k] = sum_l H_kl
// (1^T B_hat)_l = 0, as every column of B_hat (and A_hat) sums to 0.

// The barlow loss from c = N * C. With sums (4 x D, zeroed), c becomes H = dL/dC / N (2 lambda
// C off the diagonal, -2 (1 - C_kk) on it, over N) and sums[D + k] = sum_l H_kl c_kl,
// sums[3 D + l] = sum_k H_kl c_kl (see gradients_by_row_blocks).
template <typename scalar_t>
double barlow_from_c(at::Tensor& c, int64_t n, double lambda, std::vector<double>* sums) {
  const int64_t d = c.size(0);
  const double inv_n = 1.0 / static_cast<double>(n);
  scalar_t* data = c.data_ptr<scalar_t>();
  std::vector<double> off(d), on(d);
  const auto off_scale = static_cast<scalar_t>(2.0 * lambda * inv_n * inv_n);
  // rows in at most kMaxChunks fixed chunks, one partial of the column sums each
  const int64_t n_chunks = std::min(kMaxChunks, ceil_div(d, row_grain(d)));
  const int64_t chunk_rows = ceil_div(d, n_chunks);
  std::vector<double> col_partial(sums ? n_chunks * d : 0, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* cols = sums ? col_partial.data() + chunk * d : nullptr;
      for (int64_t k = chunk * chunk_rows; k < std::min(d, (chunk + 1) * chunk_rows); ++k) {
        scalar_t* row = data + k * d;
        double squares = 0.0;
#pragma omp simd reduction(+ : squares)
        for (int64_t l = 0; l < d; ++l) squares += static_cast<double>(row[l]) * row[l];
        const scalar_t raw_kk = row[k];
        const double c_kk = raw_kk * inv_n;
        off[k] = squares * inv_n * inv_n - c_kk * c_kk;
        on[k] = (1.0 - c_kk) * (1.0 - c_kk);
        if (!sums) continue;
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (int64_t l = 0; l < d; ++l) {
          const scalar_t h = row[l] * off_scale;
          const double hc = static_cast<double>(h) * row[l];
          dot += hc;
          cols[l] += hc;
          row[l] = h;
        }
        const auto h_kk = static_cast<scalar_t>(-2.0 * (1.0 - c_kk) * inv_n);
        const double fix = (static_cast<double>(h_kk) - static_cast<double>(row[k])) * raw_kk;
        row[k] = h_kk;
        (*sums)[d + k] = dot + fix;
        cols[k] += fix;
      }
    }
  });
  for (int64_t chunk = 0; sums && chunk < n_chunks; ++chunk)
    for (int64_t l = 0; l < d; ++l) (*sums)[3 * d + l] += col_partial[chunk * d + l];
  return std::accumulate(on.begin(), on.end(), 0.0) +
         lambda * std::accumulate(off.begin(), off.end(), 0.0);
}

// The softmax loss from c = N * C. With sums (4 x D, zeroed), c becomes H = dL/dC / N =
// (P_rows + P_cols - 2 I) / (2 D tau N), and sums gets sum_l H_kl c_kl and sum_k H_kl c_kl as
// in barlow_from_c. The exponentials run through ATen's vectorised kernels, kRows rows (or
// columns) of C at a time.
template <typename scalar_t>
double softmax_from_c(at::Tensor& c, int64_t n, double tau, std::vector<double>* sums) {
  const int64_t d = c.size(0);
  const double c_per_s = static_cast<double>(n) * tau;
  at::Tensor& s = c.mul_(1.0 / c_per_s);  // C / tau
  at::Tensor lse_rows = at::empty({d}, s.options()), lse_cols = at::empty({d}, s.options());
  const int64_t n_blocks = ceil_div(d, kRows);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kRows, nr = std::min(kRows, d - r0);
      at::Tensor rows = lse_rows.narrow(0, r0, nr), cols = lse_cols.narrow(0, r0, nr);
      at::logsumexp_out(rows, s.narrow(0, r0, nr), {1});
      at::logsumexp_out(cols, s.narrow(1, r0, nr), {0});
    }
  });
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* lr = lse_rows.data_ptr<scalar_t>();
  const scalar_t* lc = lse_cols.data_ptr<scalar_t>();
  double total = 0.0;  // both log-softmax values at the diagonal, summed over k
  for (int64_t k = 0; k < d; ++k) total += 2.0 * sp[k * d + k] - lr[k] - lc[k];
  if (sums) {
    const double scale = 1.0 / (2.0 * static_cast<double>(d) * tau * static_cast<double>(n));
    at::Tensor row_dots = at::empty({d}, s.options());
    at::Tensor col_partial = at::empty({n_blocks, d}, s.options());
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t r0 = block * kRows, nr = std::min(kRows, d - r0);
        at::Tensor rows = s.narrow(0, r0, nr);
        at::Tensor h = at::exp(rows - lse_rows.narrow(0, r0, nr).unsqueeze(1));
        h.add_(at::exp(rows - lse_cols.unsqueeze(0))).mul_(scale);
        h.diagonal(r0).sub_(2.0 * scale);
        const at::Tensor hs = h * rows;
        at::Tensor dots = row_dots.narrow(0, r0, nr), cols = col_partial[block];
        at::sum_out(dots, hs, {1});
        at::sum_out(cols, hs, {0});
        rows.copy_(h);
      }
    });
    const scalar_t* rd = row_dots.data_ptr<scalar_t>();
    const scalar_t* cp = col_partial.data_ptr<scalar_t>();
    for (int64_t k = 0; k < d; ++k) (*sums)[d + k] = rd[k] * c_per_s;
    for (int64_t block = 0; block < n_blocks; ++block)
      for (int64_t l = 0; l < d; ++l) (*sums)[3 * d + l] += cp[block * d + l] * c_per_s;
  }
  return -total / (2.0 * static_cast<double>(d));
}

// x x^T (rows x rows) from the kGramRows-row blocks on and above the diagonal, the others
// mirrored: about half the multiply-adds of one GEMM once the rows span a few blocks.
at::Tensor symmetric_gram(const at::Tensor& x) {
  const int64_t n = x.size(0);
  at::Tensor gram = at::empty({n, n}, x.options());
  for (int64_t i0 = 0; i0 < n; i0 += kGramRows) {
    const int64_t ni = std::min(kGramRows, n - i0);
    for (int64_t j0 = i0; j0 < n; j0 += kGramRows) {
      const int64_t nj = std::min(kGramRows, n - j0);
      at::Tensor block = gram.narrow(0, i0, ni).narrow(1, j0, nj);
      at::mm_out(block, x.narrow(0, i0, ni), x.narrow(0, j0, nj).t());
      if (j0 > i0) gram.narrow(0, j0, nj).narrow(1, i0, ni).copy_(block.t());
    }
  }
  return gram;
}

// Barlow through the Gram matrices Ga = A_hat A_hat^T, Gb = B_hat B_hat^T (cheaper when N is
// below D). With grad_b defined, also the gradients: grad_b = A_hat diag(g) + k Ga B_hat
// and b_hat becomes A's: B_hat diag(g) + k Gb A_hat, where g_k = dL/dC_kk / N (the diagonal
// part of dL/dC; the off-diagonal part is 2 lambda C) and k = 2 lambda / N^2; and their sums
// for standardize_backward.
template <typename scalar_t>
double barlow_gram(const at::Tensor& a_hat, at::Tensor& b_hat, const std::vector<double>& diag,
                   double lambda, at::Tensor* grad_b, std::vector<double>& sums) {
  const int64_t n = a_hat.size(0), d = a_hat.size(1);
  const double inv_n = 1.0 / static_cast<double>(n);
  const at::Tensor gram_a = symmetric_gram(a_hat), gram_b = symmetric_gram(b_hat);
  const scalar_t* ga = gram_a.data_ptr<scalar_t>();
  const scalar_t* gb = gram_b.data_ptr<scalar_t>();
  std::vector<double> inner(n);  // <Ga, Gb>_F row by row
  at::parallel_for(0, n, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double total = 0.0;
#pragma omp simd reduction(+ : total)
      for (int64_t m = 0; m < n; ++m) total += static_cast<double>(ga[r * n + m]) * gb[r * n + m];
      inner[r] = total;
    }
  });
  double on = 0.0, on_squares = 0.0;
  for (const double c_kk : diag) {
    on += (1.0 - c_kk) * (1.0 - c_kk);
    on_squares += c_kk * c_kk;
  }
  const double frobenius = std::accumulate(inner.begin(), inner.end(), 0.0) * inv_n * inv_n;
  if (grad_b) {
    at::Tensor g = at::empty({1, d}, a_hat.options());
    scalar_t* gp = g.data_ptr<scalar_t>();
    for (int64_t k = 0; k < d; ++k)
      gp[k] = static_cast<scalar_t>((-2.0 * (1.0 - diag[k]) - 2.0 * lambda * diag[k]) * inv_n);
    const double k = 2.0 * lambda * inv_n * inv_n;
    at::mul_out(*grad_b, a_hat, g).addmm_(gram_a, b_hat, 1.0, k);
    add_gradient_sums<scalar_t>(nullptr, nullptr, grad_b->data_ptr<scalar_t>(),
                                b_hat.data_ptr<scalar_t>(), n, d, sums);
    b_hat.mul_(g).addmm_(gram_b, a_hat, 1.0, k);
    add_gradient_sums<scalar_t>(b_hat.data_ptr<scalar_t>(), a_hat.data_ptr<scalar_t>(), nullptr,
                                nullptr, n, d, sums);
  }
  return on + lambda * (frobenius - on_squares);
}

template <typename scalar_t>
double loss_and_gradients(const at::Tensor& a, const at::Tensor& b, const Options& o, bool gram,
                          at::Tensor& grad_a, at::Tensor& grad_b) {
  const int64_t n = a.size(0), d = a.size(1);
  const bool need_grad = grad_a.numel() > 0;
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const Stats<scalar_t> s = column_stats(ap, bp, n, d, o.eps);
  if (gram) {
    at::Tensor a_hat = need_grad ? grad_a : at::empty_like(a);
    at::Tensor b_hat = at::empty_like(b);
    standardize_rows(ap, bp, s, 0, n, a_hat.data_ptr<scalar_t>(), b_hat.data_ptr<scalar_t>());
    std::vector<double> sums(4 * d, 0.0);
    const double loss = barlow_gram<scalar_t>(a_hat, b_hat, s.diag, o.off_diagonal_weight,
                                              need_grad ? &grad_b : nullptr, sums);
    if (need_grad) {  // b_hat holds dL/dA_hat now, grad_b dL/dB_hat
      scalar_t* gb = grad_b.data_ptr<scalar_t>();
      standardize_backward(ap, bp, s, sums, b_hat.data_ptr<scalar_t>(), gb,
                           grad_a.data_ptr<scalar_t>(), gb, n);
    }
    return loss;
  }
  at::Tensor c;
  if (need_grad) {  // A_hat and B_hat in the gradients' buffers, consumed by the products
    standardize_rows(ap, bp, s, 0, n, grad_a.data_ptr<scalar_t>(), grad_b.data_ptr<scalar_t>());
    c = at::mm(grad_a.t(), grad_b);
  } else {
    c = correlation_from_raw_a(a, b, s);
  }
  std::vector<double> sums(need_grad ? 4 * d : 0, 0.0);
  std::vector<double>* want = need_grad ? &sums : nullptr;
  const double loss = o.mode == CorrelationMode::kSoftmax
                          ? softmax_from_c<scalar_t>(c, n, o.tau, want)
                          : barlow_from_c<scalar_t>(c, n, o.off_diagonal_weight, want);
  if (need_grad) {
    gradients_by_row_blocks(c, grad_a, grad_b);
    scalar_t* ga = grad_a.data_ptr<scalar_t>();
    scalar_t* gb = grad_b.data_ptr<scalar_t>();
    standardize_backward(ap, bp, s, sums, ga, gb, ga, gb, n);
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dimension_correlation_loss_forward_cpu(
    const at::Tensor& a_in, const at::Tensor& b_in, int64_t mode, double off_diagonal_weight,
    double tau, double eps, bool need_grad, int64_t path) {
  checks::check_dimension_correlation_arguments(checks::Kernels::kCpu, a_in, b_in, mode,
                                                off_diagonal_weight, tau, eps, path);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t n = a.size(0), d = a.size(1);
  // Multiply-adds: through C N D^2 (+ 2 N D^2 for the gradients); through the two symmetric
  // Gram matrices about N^2 D (+ 2 N^2 D): the Gram path wins when N < D.
  const bool gram = mode == CorrelationMode::kBarlow &&
                    (path == CorrelationPath::kGram || (path == CorrelationPath::kAuto && n < d));
  at::Tensor grad_a = need_grad ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor grad_b = need_grad ? at::empty_like(b) : at::empty({0}, b.options());
  const Options o{mode, off_diagonal_weight, tau, eps};
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dimension_correlation_loss_forward_cpu", [&] {
    loss = loss_and_gradients<scalar_t>(a, b, o, gram, grad_a, grad_b);
  });
  return {at::scalar_tensor(loss, a.options()), grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("dimension_correlation_loss_forward", &dimension_correlation_loss_forward_cpu);
}

}  // namespace fastalign
