// out1 = M x1 and out2 = M x2 for a square matrix M that is mostly zeros (a hard selection of
// the sparse spatial loss keeps about a sixth of each row), by its nonzeros only: both products
// read each nonzero once (row_gather.h, the two outputs as two parts of each packed row). Where
// M is too dense for the gather to beat the BLAS, sparse_rows_matmul returns false and the
// caller multiplies densely.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "row_gather.h"

namespace fastalign {

// Above this share of nonzeros the BLAS wins: the gather reaches about 40% of its speed.
constexpr double kMaxSparseDensity = 0.35;

// The nonzeros of the n x n row-major m by rows, or an empty `start` when they are more than
// max_density * n * n.
template <typename scalar_t>
RowSums<scalar_t> compress_rows(const scalar_t* m, int64_t n, double max_density) {
  RowSums<scalar_t> rows;
  std::vector<int64_t> counts(n);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / n);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a)
      counts[a] = std::count_if(m + a * n, m + (a + 1) * n, [](scalar_t v) { return v != 0; });
  });
  rows.start.resize(n + 1);
  rows.start[0] = 0;
  for (int64_t a = 0; a < n; ++a) rows.start[a + 1] = rows.start[a] + counts[a];
  if (static_cast<double>(rows.start[n]) > max_density * static_cast<double>(n) * n) {
    rows.start.clear();
    return rows;
  }
  rows.source.resize(rows.start[n]);
  rows.weight.resize(rows.start[n]);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      int64_t p = rows.start[a];
      for (int64_t b = 0; b < n; ++b) {
        const scalar_t v = m[a * n + b];
        if (v != 0) {
          rows.source[p] = static_cast<int32_t>(b);  // n < 2^31: M's n * n entries exist
          rows.weight[p++] = v;
        }
      }
    }
  });
  return rows;
}

// out1 = m x1, out2 = m x2 (m: n x n, x1, x2, out1, out2: n x d, contiguous, one floating type)
// through the nonzeros of m; false (outputs untouched) when m is too dense.
inline bool sparse_rows_matmul(const at::Tensor& m, const at::Tensor& x1, const at::Tensor& x2,
                               at::Tensor& out1, at::Tensor& out2) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "sparse_rows_matmul", [&] {
    const int64_t n = m.size(0), d = x1.size(1);
    const RowSums<scalar_t> rows = compress_rows(m.data_ptr<scalar_t>(), n, kMaxSparseDensity);
    if (rows.start.empty()) return;
    const scalar_t* x[2] = {x1.data_ptr<scalar_t>(), x2.data_ptr<scalar_t>()};
    scalar_t* const outs[2] = {out1.data_ptr<scalar_t>(), out2.data_ptr<scalar_t>()};
    const int64_t width = gather_width(n, 2, sizeof(scalar_t));
    const Isa isa = cpu_isa();
    std::vector<scalar_t> packed(n * 2 * width);
    const int64_t mean_nonzeros = std::max<int64_t>(1, rows.start[n] / n);
    const int64_t grain = std::max<int64_t>(1, 4096 / mean_nonzeros);
    for_each_column_block(d, width, [&](int64_t c0, auto block_width) {
      constexpr int64_t kWidth = decltype(block_width)::value;
      at::parallel_for(0, n, std::max<int64_t>(1, (1 << 14) / kWidth), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t p = 0; p < 2; ++p)
            std::copy_n(x[p] + b * d + c0, kWidth, packed.data() + (b * 2 + p) * kWidth);
      });
      at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
        sum_rows_block<kWidth, 2>(isa, rows.start.data(), rows.source.data(), rows.weight.data(),
                                  begin, end, packed.data(), outs, d, c0);
      });
    });
    done = true;
  });
  return done;
}

}  // namespace fastalign
