// out1 = M x1 and out2 = M x2 for a square float32 matrix M that is mostly zeros (a selection
// keeps about a sixth of each row of the sparse spatial loss), by its nonzeros only: both
// products read each nonzero once. The inner loop is AVX-512 (chosen at run time); where it is
// missing, or M is too dense for the gather to beat the BLAS, sparse_rows_matmul returns
// false and the caller multiplies densely.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTALIGN_HAS_AVX512_PATH 1
#endif

namespace fastalign {

// Above this share of nonzeros the BLAS wins: the gather reaches about 40% of its speed.
constexpr double kMaxSparseDensity = 0.35;

// Rows of M as (column, value) lists: row a is entries [start[a], start[a + 1]).
struct SparseRows {
  std::vector<int64_t> start;
  std::vector<int32_t> column;
  std::vector<float> value;
};

// The nonzeros of the n x n row-major m, or an empty `start` when they are more than
// max_density * n * n.
inline SparseRows compress_rows(const float* m, int64_t n, double max_density) {
  SparseRows rows;
  std::vector<int64_t> counts(n);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / n);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      int64_t count = 0;
      for (int64_t b = 0; b < n; ++b) count += m[a * n + b] != 0.0f;
      counts[a] = count;
    }
  });
  rows.start.resize(n + 1);
  rows.start[0] = 0;
  for (int64_t a = 0; a < n; ++a) rows.start[a + 1] = rows.start[a] + counts[a];
  if (static_cast<double>(rows.start[n]) > max_density * static_cast<double>(n) * n) {
    rows.start.clear();
    return rows;
  }
  rows.column.resize(rows.start[n]);
  rows.value.resize(rows.start[n]);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      int64_t p = rows.start[a];
      for (int64_t b = 0; b < n; ++b) {
        const float v = m[a * n + b];
        if (v != 0.0f) {
          rows.column[p] = static_cast<int32_t>(b);
          rows.value[p++] = v;
        }
      }
    }
  });
  return rows;
}

#ifdef FASTALIGN_HAS_AVX512_PATH
// Columns [c0, c0 + 16 * kGroups) of out1 and out2 for rows [begin, end): 2 * kGroups
// accumulators stay in registers while the row's nonzeros stream by; the rows of x1 and x2
// two nonzeros ahead are prefetched (their order is random, so the hardware cannot guess).
constexpr int kGroups = 8;

__attribute__((target("avx512f"))) inline void sparse_rows_chunk_avx512(
    const SparseRows& rows, const float* x1, const float* x2, float* out1, float* out2, int64_t d,
    int64_t c0, int64_t begin, int64_t end) {
  __mmask16 mask[kGroups];
  for (int u = 0; u < kGroups; ++u) {
    const int64_t lanes = std::clamp<int64_t>(d - c0 - 16 * u, 0, 16);
    mask[u] = static_cast<__mmask16>((1u << lanes) - 1u);
  }
  constexpr int kAhead = 2;
  for (int64_t a = begin; a < end; ++a) {
    __m512 acc1[kGroups], acc2[kGroups];
    for (int u = 0; u < kGroups; ++u) acc1[u] = acc2[u] = _mm512_setzero_ps();
    const int64_t last = rows.start[a + 1];
    for (int64_t j = rows.start[a]; j < last; ++j) {
      if (j + kAhead < last) {
        const int64_t ahead = static_cast<int64_t>(rows.column[j + kAhead]) * d + c0;
        for (int u = 0; u < kGroups; ++u) {
          _mm_prefetch(reinterpret_cast<const char*>(x1 + ahead + 16 * u), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(x2 + ahead + 16 * u), _MM_HINT_T0);
        }
      }
      const __m512 w = _mm512_set1_ps(rows.value[j]);
      const int64_t offset = static_cast<int64_t>(rows.column[j]) * d + c0;
      for (int u = 0; u < kGroups; ++u) {
        acc1[u] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask[u], x1 + offset + 16 * u), acc1[u]);
        acc2[u] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask[u], x2 + offset + 16 * u), acc2[u]);
      }
    }
    for (int u = 0; u < kGroups; ++u) {
      _mm512_mask_storeu_ps(out1 + a * d + c0 + 16 * u, mask[u], acc1[u]);
      _mm512_mask_storeu_ps(out2 + a * d + c0 + 16 * u, mask[u], acc2[u]);
    }
  }
}
#endif

// out1 = m x1, out2 = m x2 (m: n x n, x1, x2, out1, out2: n x d, float32, contiguous) through
// the nonzeros of m; false (outputs untouched) when there is no AVX-512 or m is too dense.
inline bool sparse_rows_matmul(const at::Tensor& m, const at::Tensor& x1, const at::Tensor& x2,
                               at::Tensor& out1, at::Tensor& out2) {
#ifdef FASTALIGN_HAS_AVX512_PATH
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  if (!has_avx512 || m.scalar_type() != at::kFloat) return false;
  const int64_t n = m.size(0), d = x1.size(1);
  const SparseRows rows = compress_rows(m.data_ptr<float>(), n, kMaxSparseDensity);
  if (rows.start.empty()) return false;
  const float* x1p = x1.data_ptr<float>();
  const float* x2p = x2.data_ptr<float>();
  float* o1 = out1.data_ptr<float>();
  float* o2 = out2.data_ptr<float>();
  // Column chunks outermost: the chunk of x1 and x2 (n x 128 floats each) stays in cache
  // while every row gathers from it.
  const int64_t mean_nonzeros = std::max<int64_t>(1, rows.start[n] / n);
  const int64_t grain = std::max<int64_t>(1, 4096 / mean_nonzeros);
  for (int64_t c0 = 0; c0 < d; c0 += 16 * kGroups) {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      sparse_rows_chunk_avx512(rows, x1p, x2p, o1, o2, d, c0, begin, end);
    });
  }
  return true;
#else
  (void)m, (void)x1, (void)x2, (void)out1, (void)out2;
  return false;
#endif
}

}  // namespace fastalign
