// CUDA kernels of the fused region-word similarity, one direction per launch:
// "queries" align over "keys" (t2i: words over regions, i2t: regions over words).
// Forward: a block of 4 warps owns a 2 x 2 tile of (query item, key item) pairs, warp w the pair
// (w / 2, w % 2); per 32-token query chunk x 32-token key chunk the warps form their 32 x 32
// score tiles together (shared 64 x 16 / 16 x 64 operand stages, tile_gemm.cuh's tensor-core
// tile product), and each lane folds its query row into the running ALIGN, each warp its rows
// into the running AGGREGATE. Backward: a block owns 64 tokens of one x item and a D range,
// streams every y item in 64-token chunks, builds dL/ds (one-hot from the arg-max indices, or
// the softmax recomputed from the scores) in shared memory and multiplies it into the gradient.
// Loops stop at the real lengths; the (Ni, Nt, R, L) tensor never exists. direction "both" is
// two launches, so its score tiles are formed twice. Precision: tokens become float32 when
// staged, the products are 3xTF32 (float32 accuracy) under nvcc and plain float32 in the
// emulation, and ALIGN, AGGREGATE and the gradients accumulate in float32.
#pragma once

#include "../option_codes.h"
#include "device_api.h"
#include "tile_gemm.cuh"

namespace fastalign_cuda {

constexpr int kPairTokens = 32;  // query / key tokens per warp and chunk in the forward
constexpr float kLeakySlope = 0.1f;

using fastalign::Aggregate;
using fastalign::Align;
// NaN propagates as in torch.max (csrc/ranking.h).
using fastalign::nan_max;
using fastalign::takes_over;

struct RegionWordOptions {
  int align, aggregate;  // as the schema of fastalign::region_word_forward
  float align_tau, aggregate_tau;
  bool leaky;
};

// Where one direction's forward writes, indexed by (query item, key item).
struct PairOutputs {
  float* scores;  // float32; += when accumulate (the second direction of "both")
  long score_stride_query, score_stride_key;
  bool accumulate;
  float* values;  // aligned value of every query token, or null
  int* indices;   // arg-max key token (align max), or null
  long aux_stride_query, aux_stride_key;
};

FA_DEVICE float activate(float s, bool leaky) { return leaky && !(s > 0.0f) ? s * kLeakySlope : s; }

// The count of valid leading tokens, clamped to 0..padded (an item past the last has none).
FA_DEVICE int valid_length(const int64_t* lengths, int item, int items, int padded) {
  if (item >= items) return 0;
  const int64_t n = lengths[item];
  return static_cast<int>(n < 0 ? 0 : (n > padded ? padded : n));
}

// Stages 64 token rows x features [d0, d0 + 16) of x (items, padded, dim): rows
// [0, tokens_per_item) are tokens token0.. of item0 (valid below length0), with tokens_per_item 32
// rows [32, 64) are those of item0 + 1 (below length1); zero past the lengths and dim.
// transposed gives the 16 x 64 B operand of tile_product (feature rows), else the 64 x 16 A.
template <typename T>
FA_DEVICE void stage_tokens(float* stage, const T* x, int item0, int tokens_per_item, int length0,
                            int length1, int token0, int d0, int padded, int dim, bool transposed) {
  for (int e = fa_thread_linear(); e < kTileM * kTileK; e += kGemmThreads) {
    const int row = e / kTileK, kk = e % kTileK;  // consecutive threads: consecutive features
    const int item = row / tokens_per_item, token = token0 + row % tokens_per_item, d = d0 + kk;
    const bool valid = token < (item == 0 ? length0 : length1) && d < dim;
    const float v =
        valid ? static_cast<float>(x[(static_cast<long>(item0 + item) * padded + token) * dim + d])
              : 0.0f;
    if (transposed) {
      stage[kk * kPadB + row] = v;
    } else {
      stage[row * kPadA + kk] = v;
    }
  }
}

// grid (ceil(key items / 2), ceil(query items / 2)), block kGemmThreads.
template <typename T>
FA_GLOBAL void region_word_forward_kernel(const T* __restrict__ queries, const T* __restrict__ keys,
                                          const int64_t* __restrict__ query_lengths,
                                          const int64_t* __restrict__ key_lengths,
                                          int query_items, int key_items, int query_padded,
                                          int key_padded, int dim, RegionWordOptions options,
                                          PairOutputs out) {
  FA_SHARED(float, a_s, kTileM * kPadA);
  FA_SHARED(float, b_s, kTileK * kPadB);
  FA_SHARED(float, c_s, kTileM * kPadB);
  const int tid = fa_thread_linear();
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int row0 = (warp / 2) * kPairTokens, col0 = (warp % 2) * kPairTokens;
  const int query0 = fa_block_y() * 2, key0 = fa_block_x() * 2;
  const int query_item = query0 + warp / 2, key_item = key0 + warp % 2;
  const int query_len0 = valid_length(query_lengths, query0, query_items, query_padded);
  const int query_len1 = valid_length(query_lengths, query0 + 1, query_items, query_padded);
  const int key_len0 = valid_length(key_lengths, key0, key_items, key_padded);
  const int key_len1 = valid_length(key_lengths, key0 + 1, key_items, key_padded);
  const int my_query_len = warp / 2 == 0 ? query_len0 : query_len1;
  const int my_key_len = warp % 2 == 0 ? key_len0 : key_len1;
  const int block_query_len = query_len0 > query_len1 ? query_len0 : query_len1;
  const int block_key_len = key_len0 > key_len1 ? key_len0 : key_len1;
  const bool max_aggregate = options.aggregate >= Aggregate::kMax;
  const float inv_align_tau = 1.0f / options.align_tau;
  const float inv_aggregate_tau = 1.0f / options.aggregate_tau;
  float aggregate = max_aggregate ? -INFINITY : 0.0f, aggregate_sum = 0.0f;
  WarpAccumulator acc;
  for (int q0 = 0; q0 < block_query_len; q0 += kPairTokens) {
    const bool query_chunk = q0 < my_query_len && my_key_len > 0;  // warp-uniform: a real pair
    float best = -INFINITY, exp_sum = 0.0f;     // ALIGN state of this lane's query row
    int best_key = 0;
    for (int k0 = 0; k0 < block_key_len; k0 += kPairTokens) {
      const bool tile_used = query_chunk && k0 < my_key_len;
      accumulator_zero(acc, lane);
      for (int d0 = 0; d0 < dim; d0 += kTileK) {
        stage_tokens(a_s, queries, query0, kPairTokens, query_len0, query_len1, q0, d0,
                     query_padded, dim, false);
        stage_tokens(b_s, keys, key0, kPairTokens, key_len0, key_len1, k0, d0, key_padded, dim,
                     true);
        fa_syncthreads();
        if (tile_used) tile_product(acc, a_s, b_s, row0, col0, lane);
        fa_syncthreads();
      }
      accumulator_store(acc, c_s, row0, col0, lane);
      fa_syncthreads();
      if (!tile_used) continue;
      const float* row = c_s + (row0 + lane) * kPadB + col0;
      const int n_keys = my_key_len - k0 < kPairTokens ? my_key_len - k0 : kPairTokens;
      float chunk_best = -INFINITY;
      int chunk_key = 0;
      for (int j = 0; j < n_keys; ++j) {
        const float s = activate(row[j], options.leaky);
        const bool better = takes_over(s, chunk_best);  // strict: ties keep the first key
        chunk_key = better ? j : chunk_key;
        chunk_best = better ? s : chunk_best;
      }
      if (options.align == Align::kMax) {
        const bool better = takes_over(chunk_best, best);
        best_key = better ? k0 + chunk_key : best_key;
        best = better ? chunk_best : best;
      } else {  // online log-sum-exp: rescale the running sum to the new maximum once per chunk
        const float new_best = fmaxf(best, chunk_best);
        float chunk_sum = 0.0f;
        for (int j = 0; j < n_keys; ++j) {
          chunk_sum += fa_exp((activate(row[j], options.leaky) - new_best) * inv_align_tau);
        }
        exp_sum = exp_sum * fa_exp((best - new_best) * inv_align_tau) + chunk_sum;
        best = new_best;
      }
    }
    if (!query_chunk) continue;
    const int token = q0 + lane;
    const bool valid = token < my_query_len;
    const float aligned =
        options.align == Align::kMax ? best : best + options.align_tau * fa_log(exp_sum);
    const long aux = query_item * out.aux_stride_query + key_item * out.aux_stride_key + token;
    if (valid && out.values != nullptr) out.values[aux] = aligned;
    if (valid && out.indices != nullptr) out.indices[aux] = best_key;
    if (!max_aggregate) {
      aggregate += fa_warp_sum(valid ? aligned : 0.0f);
    } else {
      const float chunk_max = fa_warp_max(valid ? aligned : -INFINITY);  // row 0 is valid
      const float new_max = nan_max(aggregate, chunk_max);
      if (options.aggregate != Aggregate::kMax) {  // lse
        const float e = valid ? fa_exp((aligned - new_max) * inv_aggregate_tau) : 0.0f;
        aggregate_sum = aggregate_sum * fa_exp((aggregate - new_max) * inv_aggregate_tau) +
                        fa_warp_sum(e);
      }
      aggregate = new_max;
    }
  }
  if (lane != 0 || my_query_len == 0 || my_key_len == 0) return;
  float score = aggregate;
  if (options.aggregate == Aggregate::kMean) score = aggregate / my_query_len;
  if (options.aggregate > Aggregate::kMax) {  // lse
    score = aggregate + options.aggregate_tau * fa_log(aggregate_sum);
  }
  float* target =
      out.scores + query_item * out.score_stride_query + key_item * out.score_stride_key;
  *target = out.accumulate ? *target + score : score;
}

// dL/da of the query tokens of one direction seen from the item x whose gradient is formed:
// coef[x * coef_stride_x + y * coef_stride_y + token * coef_stride_token] (any strides: the
// mean / sum coefficients are broadcast views), with the forward's arg-max key token (align
// max) or aligned value (align lse) at [x * aux_stride_x + y * aux_stride_y + token]. coef is
// null when the direction is unused.
struct TokenCoefficients {
  const float* coef;
  const int* indices;
  const float* values;
  long coef_stride_x, coef_stride_y, coef_stride_token;
  long aux_stride_x, aux_stride_y;
};

// Stages the coefficients of tokens [token0, token0 + 64) of (x, y) (zero / -1 past length).
FA_DEVICE void stage_coefficients(const TokenCoefficients& c, int x, int y, int token0, int length,
                                  bool align_max, float* coef_s, float* value_s, int* index_s) {
  const int t = fa_thread_linear();
  if (c.coef == nullptr || t >= kTileM) return;
  const int token = token0 + t;
  const bool valid = token < length;
  const long aux = x * c.aux_stride_x + y * c.aux_stride_y + token;
  const long coef_offset = x * c.coef_stride_x + y * c.coef_stride_y + token * c.coef_stride_token;
  coef_s[t] = valid ? c.coef[coef_offset] : 0.0f;
  if (align_max) {
    index_s[t] = valid ? c.indices[aux] : -1;
  } else {
    value_s[t] = valid ? c.values[aux] : 0.0f;
  }
}

// grad_x (x items, x_padded, dim) float32, zero-filled, += sum over y items and tokens v of
// G[u, v] y[v, :] with G = dL/ds(x token u, y token v) from the direction where x's tokens are
// the queries (as_query) and the one where they are the keys (as_key). grid (x items,
// ceil(x_padded / 64) * d_splits), block kGemmThreads; block (x, c) owns tokens
// [64 (c / d_splits), +64) and features [(c % d_splits) d_per_split, +d_per_split) (a multiple
// of 64). With one 64-feature chunk the gradient tile stays in registers; with more (align lse:
// the scores are then recomputed once per block, not once per chunk) each chunk is added to
// grad_x per y chunk (no other block writes those rows).
template <typename T>
FA_GLOBAL void region_word_backward_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                           const int64_t* __restrict__ x_lengths,
                                           const int64_t* __restrict__ y_lengths, int y_items,
                                           int x_padded, int y_padded, int dim,
                                           TokenCoefficients as_query, TokenCoefficients as_key,
                                           int d_splits, int d_per_split, RegionWordOptions options,
                                           float* __restrict__ grad_x) {
  FA_SHARED(float, a_s, kTileM * kPadA);
  FA_SHARED(float, b_s, kTileK * kPadB);
  FA_SHARED(float, g_s, kTileM * kPadB);  // scores, then dL/ds, of the current 64 x 64 tile
  FA_SHARED(float, c_s, kTileM * kPadB);  // a finished 64 x 64 gradient tile
  FA_SHARED(float, query_coef_s, kTileM);
  FA_SHARED(float, query_value_s, kTileM);
  FA_SHARED(int, query_index_s, kTileM);
  FA_SHARED(float, key_coef_s, kTileN);
  FA_SHARED(float, key_value_s, kTileN);
  FA_SHARED(int, key_index_s, kTileN);
  const int tid = fa_thread_linear();
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
  const int x_item = fa_block_x();
  const int u0 = (fa_block_y() / d_splits) * kTileM;
  const int d_begin = (fa_block_y() % d_splits) * d_per_split;
  const int d_end = d_begin + d_per_split < dim ? d_begin + d_per_split : dim;
  const int x_len = valid_length(x_lengths, x_item, fa_grid_x(), x_padded);
  if (u0 >= x_len || d_begin >= dim) return;  // whole block: padded rows keep their zeros
  const bool align_max = options.align == Align::kMax;
  const bool tile_in_registers = d_end - d_begin <= kTileN;
  const float inv_tau = 1.0f / options.align_tau;
  float* grad_rows = grad_x + (static_cast<long>(x_item) * x_padded + u0) * dim;
  WarpAccumulator acc, scores;
  accumulator_zero(acc, lane);
  for (int y_item = 0; y_item < y_items; ++y_item) {
    const int y_len = valid_length(y_lengths, y_item, y_items, y_padded);
    const T* y_rows = y + static_cast<long>(y_item) * y_padded * dim;
    stage_coefficients(as_query, x_item, y_item, u0, x_len, align_max, query_coef_s,
                       query_value_s, query_index_s);
    for (int v0 = 0; v0 < y_len; v0 += kTileN) {
      stage_coefficients(as_key, x_item, y_item, v0, y_len, align_max, key_coef_s, key_value_s,
                         key_index_s);
      if (!align_max) {  // the 64 x 64 scores of x rows u0.. and y rows v0.., over all of D
        accumulator_zero(scores, lane);
        tile_product_over_k(scores, a_s, b_s, dim, row0, col0, lane, [&](int d0) {
          stage_tokens(a_s, x, x_item, kTileM, x_len, 0, u0, d0, x_padded, dim, false);
          stage_tokens(b_s, y, y_item, kTileN, y_len, 0, v0, d0, y_padded, dim, true);
        });
        accumulator_store(scores, g_s, row0, col0, lane);
      }
      fa_syncthreads();
      for (int e = tid; e < kTileM * kTileN; e += kGemmThreads) {
        const int u = e / kTileN, v = e % kTileN;
        float g = 0.0f;
        if (align_max) {
          if (as_query.coef != nullptr && query_index_s[u] == v0 + v) g += query_coef_s[u];
          if (as_key.coef != nullptr && key_index_s[v] == u0 + u) g += key_coef_s[v];
        } else {
          const float s = g_s[u * kPadB + v], act = activate(s, options.leaky);
          if (as_query.coef != nullptr) {
            g += query_coef_s[u] * fa_exp((act - query_value_s[u]) * inv_tau);
          }
          if (as_key.coef != nullptr) g += key_coef_s[v] * fa_exp((act - key_value_s[v]) * inv_tau);
          if (options.leaky && !(s > 0.0f)) g *= kLeakySlope;
        }
        g_s[u * kPadB + v] = (u0 + u < x_len && v0 + v < y_len) ? g : 0.0f;
      }
      // No barrier needed here: the first staging loop below ends in one before g_s is read.
      for (int d0 = d_begin; d0 < d_end; d0 += kTileN) {
        if (!tile_in_registers) accumulator_zero(acc, lane);
        for (int k0 = 0; k0 < kTileN && v0 + k0 < y_len; k0 += kTileK) {
          fa_syncthreads();  // g_s complete; a_s, b_s free
          for (int e = tid; e < kTileM * kTileK; e += kGemmThreads) {
            const int u = e / kTileK, kk = e % kTileK;
            a_s[u * kPadA + kk] = g_s[u * kPadB + k0 + kk];
          }
          for (int e = tid; e < kTileK * kTileN; e += kGemmThreads) {
            const int kk = e / kTileN, n = e % kTileN;  // consecutive threads: features
            const int v = v0 + k0 + kk, d = d0 + n;
            b_s[kk * kPadB + n] =
                v < y_len && d < d_end ? static_cast<float>(y_rows[static_cast<long>(v) * dim + d])
                                       : 0.0f;
          }
          fa_syncthreads();
          tile_product(acc, a_s, b_s, row0, col0, lane);
        }
        if (tile_in_registers) continue;
        accumulator_store(acc, c_s, row0, col0, lane);
        fa_syncthreads();
        for (int e = tid; e < kTileM * kTileN; e += kGemmThreads) {
          const int u = e / kTileN, n = e % kTileN;
          if (u0 + u < x_len && d0 + n < d_end) grad_rows[u * dim + d0 + n] += c_s[u * kPadB + n];
        }
      }
      fa_syncthreads();  // g_s and the coefficient stages are read no more
    }
  }
  if (!tile_in_registers) return;
  accumulator_store(acc, c_s, row0, col0, lane);
  fa_syncthreads();
  for (int e = tid; e < kTileM * kTileN; e += kGemmThreads) {
    const int u = e / kTileN, n = e % kTileN;
    if (u0 + u < x_len && d_begin + n < d_end) {
      grad_rows[u * dim + d_begin + n] = c_s[u * kPadB + n];
    }
  }
}

}  // namespace fastalign_cuda
