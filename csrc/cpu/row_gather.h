// Sums of weighted rows, a sparse matrix (stored by rows) times dense rows: output row a is
// the sum of weight[j] * source row source[j] over its entries j. The backward of every
// selection is one: region-word's arg-max gradients, the sparse spatial loss's hard selection.
//
// The sum runs a block of columns at a time. The caller first copies the block's columns of
// every source row side by side into a packed buffer: read in place, rows `dim` apart (a power
// of two, usually) fall into a handful of cache sets and evict each other; packed, the slice
// stays in L2 while every output row gathers from it. The block width is the widest that keeps
// the packed slice in half the L2 the CPU reports (cpu_info.h); the inner loop is compiled for
// AVX-512, AVX2 and the x86-64 baseline, and runs at the CPU's level (cpu_isa).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_info.h"

namespace fastalign {

template <typename scalar_t>
struct RowSums {
  std::vector<int64_t> start;   // row a's entries: [start[a], start[a + 1])
  std::vector<int32_t> source;  // half the bytes of int64: callers check their source counts
  std::vector<scalar_t> weight;
};

// 16 lanes of a float type (GCC's vector_size ignores a dependent type, hence one per type):
// one AVX-512 register, two AVX2 ones or four SSE ones, as the clone the CPU runs.
template <typename scalar_t>
struct Lanes16;
template <>
struct Lanes16<float> {
  using type = float __attribute__((vector_size(64)));
};
template <>
struct Lanes16<double> {
  using type = double __attribute__((vector_size(128)));
};

// Output rows [row_begin, row_end), columns [d0, d0 + kWidth) of each of kParts outputs:
// outs[p] + a * ld + d0 = the sum of weight[j] * part p of packed row source[j] (packed rows hold
// kParts slices of kWidth columns each). Vector accumulators stay in registers while a row's
// entries stream by; narrow blocks rotate entries over several sets of them (four vectors in
// all), so that consecutive entries do not wait on each other's multiply-add. kWidth 1: the
// last dim % 16 columns.
template <int64_t kWidth, int64_t kParts, typename scalar_t>
__attribute__((always_inline)) inline void sum_rows_block_body(
    const int64_t* start, const int32_t* source, const scalar_t* weight, int64_t row_begin,
    int64_t row_end, const scalar_t* packed, scalar_t* const* outs, int64_t ld, int64_t d0) {
  constexpr int64_t kStride = kWidth * kParts;
  if constexpr (kWidth == 1) {
    for (int64_t a = row_begin; a < row_end; ++a) {
      scalar_t acc[kParts] = {};
      for (int64_t j = start[a]; j < start[a + 1]; ++j)
        for (int64_t p = 0; p < kParts; ++p)
          acc[p] += weight[j] * packed[static_cast<int64_t>(source[j]) * kStride + p];
      for (int64_t p = 0; p < kParts; ++p) outs[p][a * ld + d0] = acc[p];
    }
  } else {
    static_assert(kWidth % 16 == 0);
    using Lanes = typename Lanes16<scalar_t>::type;
    constexpr int64_t kVectors = kStride / 16, kChains = kVectors >= 4 ? 1 : 4 / kVectors;
    // Entry j adds to chain c: constant indices only, so that the chains stay in registers.
    auto add = [&](Lanes* chain, int64_t j) {
      const scalar_t* src = packed + static_cast<int64_t>(source[j]) * kStride;
      const Lanes w = Lanes{} + weight[j];
      for (int64_t v = 0; v < kVectors; ++v) {
        Lanes x;
        std::memcpy(&x, src + 16 * v, sizeof x);
        chain[v] += w * x;
      }
    };
    for (int64_t a = row_begin; a < row_end; ++a) {
      Lanes acc[kChains][kVectors] = {};
      int64_t j = start[a];
      for (; j + kChains <= start[a + 1]; j += kChains)
        for (int64_t c = 0; c < kChains; ++c) add(acc[c], j + c);
      for (; j < start[a + 1]; ++j) add(acc[0], j);
      for (int64_t v = 0; v < kVectors; ++v) {
        for (int64_t c = 1; c < kChains; ++c) acc[0][v] += acc[c][v];
        const int64_t p = v / (kWidth / 16), column = d0 + 16 * (v % (kWidth / 16));
        std::memcpy(outs[p] + a * ld + column, &acc[0][v], sizeof(Lanes));
      }
    }
  }
}

// sum_rows_block_body compiled for each level (inlined, it takes its caller's instructions).
#ifdef FASTALIGN_X86_ISAS
template <int64_t kWidth, int64_t kParts, typename scalar_t>
__attribute__((target("arch=x86-64-v4"))) void sum_rows_block_avx512(
    const int64_t* start, const int32_t* source, const scalar_t* weight, int64_t row_begin,
    int64_t row_end, const scalar_t* packed, scalar_t* const* outs, int64_t ld, int64_t d0) {
  sum_rows_block_body<kWidth, kParts>(start, source, weight, row_begin, row_end, packed, outs, ld,
                                      d0);
}

template <int64_t kWidth, int64_t kParts, typename scalar_t>
__attribute__((target("arch=x86-64-v3"))) void sum_rows_block_avx2(
    const int64_t* start, const int32_t* source, const scalar_t* weight, int64_t row_begin,
    int64_t row_end, const scalar_t* packed, scalar_t* const* outs, int64_t ld, int64_t d0) {
  sum_rows_block_body<kWidth, kParts>(start, source, weight, row_begin, row_end, packed, outs, ld,
                                      d0);
}
#endif

// The block sum at the CPU's level (cpu_isa()).
template <int64_t kWidth, int64_t kParts, typename scalar_t>
void sum_rows_block(Isa isa, const int64_t* start, const int32_t* source, const scalar_t* weight,
                    int64_t row_begin, int64_t row_end, const scalar_t* packed,
                    scalar_t* const* outs, int64_t ld, int64_t d0) {
#ifdef FASTALIGN_X86_ISAS
  if (isa == Isa::kAvx512)
    return sum_rows_block_avx512<kWidth, kParts>(start, source, weight, row_begin, row_end, packed,
                                                 outs, ld, d0);
  if (isa == Isa::kAvx2)
    return sum_rows_block_avx2<kWidth, kParts>(start, source, weight, row_begin, row_end, packed,
                                               outs, ld, d0);
#endif
  (void)isa;
  sum_rows_block_body<kWidth, kParts>(start, source, weight, row_begin, row_end, packed, outs, ld,
                                      d0);
}

// Columns per block: the narrowest, and the widest, chosen only when the packed slice of every
// source row (source_rows x parts x width) fits half of L2.
constexpr int64_t kMinGatherColumns = 16;
constexpr int64_t kMaxGatherColumns = 64;

// The block width for source_rows rows of `parts` slices of element_bytes elements.
inline int64_t gather_width(int64_t source_rows, int64_t parts, int64_t element_bytes) {
  const int64_t column_bytes = std::max<int64_t>(1, source_rows) * parts * element_bytes;
  return items_fitting(l2_bytes() / 2, column_bytes, kMinGatherColumns,
                       kMaxGatherColumns / parts);
}

// Calls block(d0, width) for consecutive column blocks covering [0, dim): `width` (from
// gather_width) while it fits, then narrower blocks, the last dim % 16 columns one by one. The
// width comes as a std::integral_constant, a compile-time constant for sum_rows_block.
template <typename Block>
void for_each_column_block(int64_t dim, int64_t width, Block&& block) {
  int64_t d0 = 0;
  auto run = [&](auto w) {
    for (; d0 + decltype(w)::value <= dim; d0 += decltype(w)::value) block(d0, w);
  };
  if (width >= 64) run(std::integral_constant<int64_t, 64>{});
  if (width >= 32) run(std::integral_constant<int64_t, 32>{});
  run(std::integral_constant<int64_t, 16>{});
  run(std::integral_constant<int64_t, 1>{});
}

}  // namespace fastalign
