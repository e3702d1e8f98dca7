// CUDA kernels of the prototype operators. Row-wise passes give one warp to a row
// (kPrototypeRowWarps rows per block): normalisation, the row log-sum-exp of softmax and of
// Sinkhorn's row step, the first arg-max, the softmax backward's dS = P (G - <G, P>) / tau, the EMA
// step; Sinkhorn's column step and the assignment mass reduce columns with (32, 8) blocks. The N x
// K x D products go through strided_gemm_kernel. The top-m mixture streams over the keys in 64 x 64
// query x key tiles (tile_gemm.cuh's tensor-core tile product), key ranges in parallel, merging
// each tile into a running top-m per query and range kept in global memory; a second kernel merges
// the ranges' lists and mixes the values. Its backward gives a warp to a query and adds the key and
// value gradients with float atomics. Every sum accumulates in float32.
#pragma once

#include "../ranking.h"
#include "device_api.h"
#include "tile_gemm.cuh"

namespace fastalign_cuda {

// NaN ranks above every number and a clamped NaN norm stays NaN, as in torch (csrc/ranking.h):
// a NaN input gives the reference's NaN rows, arg-max and top-m choice wherever it sits.
using fastalign::nan_max;
using fastalign::takes_over;

constexpr int kPrototypeRowWarps = 4, kPrototypeRowThreads = kPrototypeRowWarps * kWarpSize;
constexpr int kPrototypeColumns = 32, kPrototypeRowPhases = 8;
constexpr float kPrototypeNormEps = 1e-12f;  // F.normalize's: rows divide by max(|row|, eps)
// The top-m scan splits the keys into at most kTopkMaxSplits ranges, until about
// kTopkTargetBlocks blocks run (two per SM of an A100 / H100): a few hundred queries against
// ten thousand keys would otherwise occupy a handful of SMs.
constexpr int kTopkMaxSplits = 32, kTopkTargetBlocks = 256;

// The warp's row and this thread's lane in the warp-per-row kernels (block kPrototypeRowThreads).
FA_DEVICE int prototype_warp_row() {
  return fa_block_x() * kPrototypeRowWarps + fa_thread_x() / kWarpSize;
}
FA_DEVICE int prototype_lane() { return fa_thread_x() % kWarpSize; }

// Adds v to a running (best, total) with total = sum exp(values - best).
FA_DEVICE void prototype_logsumexp_push(float& best, float& total, float v) {
  if (v > best) {
    total = total * fa_exp(best - v) + 1.0f;
    best = v;
  } else {
    total += fa_exp(v - best);
  }
}

// The log-sum-exp of the values pushed by the 32 lanes of a warp, in every lane.
FA_DEVICE float prototype_warp_logsumexp(float best, float total) {
  const float warp_best = fa_warp_max(best);
  return warp_best + fa_log(fa_warp_sum(total * fa_exp(best - warp_best)));
}

// `own` of lane `source` in every lane (the other lanes' `own` is ignored; adding zeros is
// exact).
FA_DEVICE float prototype_warp_broadcast(float own, int source) {
  return fa_warp_sum(prototype_lane() == source ? own : 0.0f);
}

// out[r] = scale x_r / max(|x_r|, eps) when normalize, scale x_r otherwise (out may be null);
// norms[r] = |x_r| when norms is not null. grid ceil(rows / kPrototypeRowWarps), block
// kPrototypeRowThreads.
template <typename T>
FA_GLOBAL void prototype_scaled_rows_kernel(const T* __restrict__ x, int rows, int cols,
                                            int normalize, float scale, float* __restrict__ out,
                                            float* __restrict__ norms) {
  const int row = prototype_warp_row(), lane = prototype_lane();
  if (row >= rows) return;
  const T* xr = x + static_cast<long>(row) * cols;
  float squares = 0.0f;
  if (normalize || norms != nullptr) {
    for (int c = lane; c < cols; c += kWarpSize) {
      const float v = static_cast<float>(xr[c]);
      squares += v * v;
    }
  }
  const float norm = sqrtf(fa_warp_sum(squares));
  if (norms != nullptr && lane == 0) norms[row] = norm;
  if (out == nullptr) return;
  const float factor = normalize ? scale / nan_max(norm, kPrototypeNormEps) : scale;
  float* o = out + static_cast<long>(row) * cols;
  for (int c = lane; c < cols; c += kWarpSize) o[c] = static_cast<float>(xr[c]) * factor;
}

// Softmax and Sinkhorn's row step on logq (n x k, float32): v = logq[r, c], minus
// row_shift[r] + col_shift[c] when col_shift is given. With out: out = exp(v - logsumexp_c v)
// (out may be logq itself: each lane rewrites only what it read). Without: v is stored back and
// row_shift[r] = logsumexp_c v, for the next column step. grid ceil(n / kPrototypeRowWarps), block
// kPrototypeRowThreads.
template <typename T>
FA_GLOBAL void prototype_row_normalize_kernel(float* logq, int n, int k,
                                              const float* __restrict__ col_shift,
                                              float* __restrict__ row_shift, T* out) {
  const int row = prototype_warp_row(), lane = prototype_lane();
  if (row >= n) return;
  float* lr = logq + static_cast<long>(row) * k;
  const float shift = col_shift != nullptr ? row_shift[row] : 0.0f;
  float best = -INFINITY, total = 0.0f;
  for (int c = lane; c < k; c += kWarpSize) {
    float v = lr[c];
    if (col_shift != nullptr) {
      v -= shift + col_shift[c];
      if (out == nullptr) lr[c] = v;
    }
    prototype_logsumexp_push(best, total, v);
  }
  const float lse = prototype_warp_logsumexp(best, total);
  if (out == nullptr) {
    if (lane == 0) row_shift[row] = lse;
    return;
  }
  T* o = out + static_cast<long>(row) * k;
  for (int c = lane; c < k; c += kWarpSize) {
    const float v = col_shift != nullptr ? lr[c] - shift - col_shift[c] : lr[c];
    o[c] = static_cast<T>(fa_exp(v - lse));
  }
}

// The lowest set bit of a non-zero ballot.
FA_DEVICE int prototype_lowest_lane(uint32_t ballot) {
  int lane = 0;
  while (!(ballot & 1u)) {
    ballot >>= 1;
    ++lane;
  }
  return lane;
}

// out[r] = one-hot of the first arg-max of logits[r] (n x k): the warp's maximum (a NaN if the
// row holds one), then the first 32-column chunk holding it, whose lowest matching lane is the
// index (torch.argmax's rule: the first maximum, or the first NaN). out may be logits itself: a
// lane reads and writes only its own columns. grid ceil(n / kPrototypeRowWarps), block
// kPrototypeRowThreads.
template <typename T>
FA_GLOBAL void prototype_row_argmax_kernel(const float* logits, int n, int k, T* out) {
  const int row = prototype_warp_row(), lane = prototype_lane();
  if (row >= n) return;
  const float* lr = logits + static_cast<long>(row) * k;
  float best = -INFINITY;
  for (int c = lane; c < k; c += kWarpSize) best = nan_max(best, lr[c]);
  best = fa_warp_max(best);
  const bool nan_best = best != best;
  int arg = 0;
  for (int c0 = 0; c0 < k; c0 += kWarpSize) {
    const int c = c0 + lane;
    const uint32_t hits = fa_ballot(c < k && (nan_best ? lr[c] != lr[c] : lr[c] == best));
    if (hits != 0u) {
      arg = c0 + prototype_lowest_lane(hits);
      break;
    }
  }
  T* o = out + static_cast<long>(row) * k;
  for (int c = lane; c < k; c += kWarpSize) o[c] = static_cast<T>(c == arg ? 1.0f : 0.0f);
}

// Sinkhorn's column step: col_shift[c] = logsumexp_r (logq[r, c] - row_shift[r]) - log(N / K).
// grid ceil(k / 32), block (32, 8): 8 row phases per column, combined in shared memory.
FA_GLOBAL void prototype_sinkhorn_columns_kernel(const float* __restrict__ logq, int n, int k,
                                                 const float* __restrict__ row_shift,
                                                 float log_column_mass,
                                                 float* __restrict__ col_shift) {
  FA_SHARED(float, phase_best, kPrototypeRowPhases * kPrototypeColumns);
  FA_SHARED(float, phase_total, kPrototypeRowPhases * kPrototypeColumns);
  const int tx = fa_thread_x(), ty = fa_thread_y();
  const int col = fa_block_x() * kPrototypeColumns + tx;
  float best = -INFINITY, total = 0.0f;
  if (col < k) {
    for (int r = ty; r < n; r += kPrototypeRowPhases) {
      prototype_logsumexp_push(best, total, logq[static_cast<long>(r) * k + col] - row_shift[r]);
    }
  }
  phase_best[ty * kPrototypeColumns + tx] = best;
  phase_total[ty * kPrototypeColumns + tx] = total;
  fa_syncthreads();
  if (ty != 0 || col >= k) return;
  float column_best = -INFINITY;
  for (int y = 0; y < kPrototypeRowPhases; ++y) {
    column_best = nan_max(column_best, phase_best[y * kPrototypeColumns + tx]);
  }
  float column_total = 0.0f;
  for (int y = 0; y < kPrototypeRowPhases; ++y) {
    const int i = y * kPrototypeColumns + tx;
    column_total += phase_total[i] * fa_exp(phase_best[i] - column_best);
  }
  col_shift[col] = column_best + fa_log(column_total) - log_column_mass;
}

// sums[c] = sum_r a[r, c] for a (n x k, float32): the assignment mass of every prototype.
// grid ceil(k / 32), block (32, 8).
FA_GLOBAL void prototype_column_sums_kernel(const float* __restrict__ a, int n, int k,
                                            float* __restrict__ sums) {
  FA_SHARED(float, phase_sum, kPrototypeRowPhases * kPrototypeColumns);
  const int tx = fa_thread_x(), ty = fa_thread_y();
  const int col = fa_block_x() * kPrototypeColumns + tx;
  float sum = 0.0f;
  if (col < k) {
    for (int r = ty; r < n; r += kPrototypeRowPhases) sum += a[static_cast<long>(r) * k + col];
  }
  phase_sum[ty * kPrototypeColumns + tx] = sum;
  fa_syncthreads();
  if (ty != 0 || col >= k) return;
  float column_sum = 0.0f;
  for (int y = 0; y < kPrototypeRowPhases; ++y) column_sum += phase_sum[y * kPrototypeColumns + tx];
  sums[col] = column_sum;
}

// The softmax backward's dL/dlogits = P (G - <G, P>_row) / tau, row by row into ds (n x k,
// float32). grid ceil(n / kPrototypeRowWarps), block kPrototypeRowThreads.
template <typename T>
FA_GLOBAL void prototype_softmax_grad_kernel(const T* __restrict__ grad,
                                             const T* __restrict__ assign, int n, int k,
                                             float inv_tau, float* __restrict__ ds) {
  const int row = prototype_warp_row(), lane = prototype_lane();
  if (row >= n) return;
  const long offset = static_cast<long>(row) * k;
  float dot = 0.0f;
  for (int c = lane; c < k; c += kWarpSize) {
    dot += static_cast<float>(grad[offset + c]) * static_cast<float>(assign[offset + c]);
  }
  dot = fa_warp_sum(dot);
  for (int c = lane; c < k; c += kWarpSize) {
    const float p = static_cast<float>(assign[offset + c]);
    ds[offset + c] = p * (static_cast<float>(grad[offset + c]) - dot) * inv_tau;
  }
}

// The gradient through unit = x / max(|x|, eps) row by row, from g = dL/dunit: (g - unit
// <g, unit>) / |x|, or g / eps where the norm was clamped; g itself without normalize.
// grid ceil(rows / kPrototypeRowWarps), block kPrototypeRowThreads.
template <typename T>
FA_GLOBAL void prototype_unit_rows_backward_kernel(const float* __restrict__ grad_unit,
                                                   const float* __restrict__ unit,
                                                   const float* __restrict__ norms, int rows,
                                                   int cols, int normalize, T* __restrict__ out) {
  const int row = prototype_warp_row(), lane = prototype_lane();
  if (row >= rows) return;
  const long offset = static_cast<long>(row) * cols;
  const float* g = grad_unit + offset;
  const float* y = unit + offset;
  T* o = out + offset;
  if (!normalize) {
    for (int c = lane; c < cols; c += kWarpSize) o[c] = static_cast<T>(g[c]);
    return;
  }
  const float norm = norms[row];
  const bool clamped = norm < kPrototypeNormEps;
  float along = 0.0f;
  for (int c = lane; c < cols; c += kWarpSize) along += g[c] * y[c];
  along = clamped ? 0.0f : fa_warp_sum(along);
  const float inv_norm = 1.0f / nan_max(norm, kPrototypeNormEps);
  for (int c = lane; c < cols; c += kWarpSize) {
    o[c] = static_cast<T>((g[c] - along * y[c]) * inv_norm);
  }
}

// EMA step of prototype r: momentum p_r + (1 - momentum) sums_r / mass_r (then L2-normalised
// when normalize) where mass_r > 0; p_r unchanged otherwise. sums (k x d, float32) holds
// sum_n a_nr x_n and is overwritten by the moved row. grid ceil(k / kPrototypeRowWarps), block
// kPrototypeRowThreads.
template <typename T>
FA_GLOBAL void prototype_ema_kernel(const T* __restrict__ prototypes, float* __restrict__ sums,
                                    const float* __restrict__ mass, int k, int d, float momentum,
                                    int normalize, T* __restrict__ out) {
  const int row = prototype_warp_row(), lane = prototype_lane();
  if (row >= k) return;
  const long offset = static_cast<long>(row) * d;
  const T* p = prototypes + offset;
  float* moved = sums + offset;
  T* o = out + offset;
  if (!(mass[row] > 0.0f)) {  // no mass: the prototype keeps its value
    for (int c = lane; c < d; c += kWarpSize) o[c] = p[c];
    return;
  }
  const float take = (1.0f - momentum) / mass[row];
  float squares = 0.0f;
  for (int c = lane; c < d; c += kWarpSize) {
    moved[c] = momentum * static_cast<float>(p[c]) + take * moved[c];
    squares += moved[c] * moved[c];
  }
  const float factor =
      normalize ? 1.0f / nan_max(sqrtf(fa_warp_sum(squares)), kPrototypeNormEps) : 1.0f;
  for (int c = lane; c < d; c += kWarpSize) o[c] = static_cast<T>(moved[c] * factor);
}

// Top-m scan of one key range for 64 queries per block (kGemmThreads threads); grid
// (ceil(n / 64), splits), blockIdx.y the range [split * keys_per_split, + keys_per_split). For
// every 64-key tile, the raw dot products through tile_gemm.cuh's tile product into shared
// memory, then thread t < 64 merges row t into its query's running top-m of the range (list
// (split, query) of top_cos, top_dot, top_index: (splits, n, m) in global memory, sorted by
// cosine, descending, a NaN above every number). A key enters only when its cosine takes over
// the worst entry, and goes after every entry it does not take over (top_list_insert, shared
// with the CPU): keys come in index order, so the lowest index wins ties, as in the reference's
// stable sort. Entries a short range cannot fill keep cosine -inf (and a valid index). cosine =
// dot / (max(|q|, eps) max(|key|, eps)) from the given norms.
template <typename T>
FA_GLOBAL void prototype_topk_scan_kernel(const T* __restrict__ queries, const T* __restrict__ keys,
                                          const float* __restrict__ query_norms,
                                          const float* __restrict__ key_norms, int n, int k, int d,
                                          int m, int keys_per_split, float* __restrict__ top_cos,
                                          float* __restrict__ top_dot,
                                          int* __restrict__ top_index) {
  FA_SHARED(float, q_s, kTileM * kPadA);
  FA_SHARED(float, key_s, kTileK * kPadB);
  FA_SHARED(float, dots_s, kTileM * kPadB);
  FA_SHARED(float, inv_key_norm, kTileN);
  const int tid = fa_thread_linear();
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
  const int query0 = fa_block_x() * kTileM;
  const int key_begin = fa_block_y() * keys_per_split;
  const int key_end = k - key_begin < keys_per_split ? k : key_begin + keys_per_split;
  const int query = query0 + tid;  // merged by this thread when tid < kTileM
  const bool merges = tid < kTileM && query < n;
  const long list = (static_cast<long>(fa_block_y()) * n + query) * m;
  float* cos_list = top_cos + list;
  float* dot_list = top_dot + list;
  int* index_list = top_index + list;
  float inv_query_norm = 0.0f, worst = -INFINITY;
  if (merges) {
    inv_query_norm = 1.0f / nan_max(query_norms[query], kPrototypeNormEps);
    for (int j = 0; j < m; ++j) {  // a key index even where a cosine overflows to -inf
      cos_list[j] = -INFINITY;
      dot_list[j] = -INFINITY;
      index_list[j] = key_begin;
    }
  }
  for (int key0 = key_begin; key0 < key_end; key0 += kTileN) {
    WarpAccumulator acc;
    accumulator_zero(acc, lane);
    tile_product_over_k(acc, q_s, key_s, d, row0, col0, lane, [&](int d0) {
      for (int e = tid; e < kTileM * kTileK; e += kGemmThreads) {
        const int qq = e / kTileK, dd = e % kTileK;
        const int gq = query0 + qq, gd = d0 + dd;
        q_s[qq * kPadA + dd] =
            (gq < n && gd < d) ? static_cast<float>(queries[static_cast<long>(gq) * d + gd]) : 0.0f;
      }
      for (int e = tid; e < kTileN * kTileK; e += kGemmThreads) {
        const int kk = e / kTileK, dd = e % kTileK;
        const int gk = key0 + kk, gd = d0 + dd;
        key_s[dd * kPadB + kk] = (gk < key_end && gd < d)
                                     ? static_cast<float>(keys[static_cast<long>(gk) * d + gd])
                                     : 0.0f;
      }
    });
    accumulator_store(acc, dots_s, row0, col0, lane);
    if (tid < kTileN) {
      inv_key_norm[tid] =
          key0 + tid < key_end ? 1.0f / nan_max(key_norms[key0 + tid], kPrototypeNormEps) : 0.0f;
    }
    fa_syncthreads();
    if (merges) {
      const int tile_keys = key_end - key0 < kTileN ? key_end - key0 : kTileN;
      for (int c = 0; c < tile_keys; ++c) {
        const float dot = dots_s[tid * kPadB + c];
        const float cosine = dot * inv_query_norm * inv_key_norm[c];
        if (!takes_over(cosine, worst)) continue;
        fastalign::top_list_insert(cos_list, dot_list, index_list, m, cosine, dot, key0 + c);
        worst = cos_list[m - 1];
      }
    }
    fa_syncthreads();  // dots_s and inv_key_norm are rewritten by the next tile
  }
}

// Top-m mixture from the scan's per-range lists, 64 queries per block (kGemmThreads threads),
// grid ceil(n / 64): thread t < 64 merges its query's `splits` sorted lists (the highest
// cosine first, a NaN above all; on a tie the earlier range, whose keys have the lower indices)
// into top_index, softmax(top_dot / tau) into weights (the inputs' dtype) and into
// final_weights (float32, n x m); then a warp per query writes out = sum_j w_j values[index_j].
template <typename T>
FA_GLOBAL void prototype_topk_mix_finish_kernel(
    const T* __restrict__ values, const float* __restrict__ top_cos,
    const float* __restrict__ top_dot, const int* __restrict__ top_index, int n, int dv, int m,
    int splits, float inv_tau, float* __restrict__ final_weights, int64_t* __restrict__ indices,
    T* __restrict__ weights, T* __restrict__ out) {
  FA_SHARED(int, cursors, kTileM * kTopkMaxSplits);
  const int tid = fa_thread_linear();
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int query0 = fa_block_x() * kTileM;
  const int query = query0 + tid;
  if (tid < kTileM && query < n) {
    int* cursor = cursors + tid * kTopkMaxSplits;
    for (int s = 0; s < splits; ++s) cursor[s] = 0;
    const long row = static_cast<long>(query) * m;
    float* w = final_weights + row;
    float best_dot = -INFINITY;
    for (int j = 0; j < m; ++j) {  // there are at least m finite entries: ranges hold K >= m
      int best_split = -1;
      float best_cos = -INFINITY;
      long best = 0;
      for (int s = 0; s < splits; ++s) {
        const long at = (static_cast<long>(s) * n + query) * m + cursor[s];
        if (cursor[s] < m && (best_split < 0 || takes_over(top_cos[at], best_cos))) {
          best_split = s;
          best_cos = top_cos[at];
          best = at;
        }
      }
      ++cursor[best_split];
      indices[row + j] = top_index[best];
      w[j] = top_dot[best];
      best_dot = nan_max(best_dot, w[j]);  // a NaN dot product: NaN weights, as softmax
    }
    float total = 0.0f;
    for (int j = 0; j < m; ++j) {
      w[j] = fa_exp((w[j] - best_dot) * inv_tau);
      total += w[j];
    }
    for (int j = 0; j < m; ++j) {
      w[j] /= total;
      weights[row + j] = static_cast<T>(w[j]);
    }
  }
  fa_syncthreads();
  for (int r = warp; r < kTileM && query0 + r < n; r += kGemmThreads / kWarpSize) {
    const long q_row = query0 + r;
    const float* w = final_weights + q_row * m;
    const int64_t* index = indices + q_row * m;
    for (int c = lane; c < dv; c += kWarpSize) {
      float sum = 0.0f;
      for (int j = 0; j < m; ++j) sum += w[j] * static_cast<float>(values[index[j] * dv + c]);
      out[q_row * dv + c] = static_cast<T>(sum);
    }
  }
}

// Top-m mixture backward, a warp per query, through the selected keys only: gv_j = <G_n, v_j>,
// c_j = w_j (gv_j - sum_i w_i gv_i) / tau; dq_n = sum_j c_j k_j (stored), dk_j += c_j q_n and
// dv_j += w_j G_n (float32 atomics into grad_keys / grad_values: a key that several queries
// selected sums their terms in the order the atomics land, which varies from run to run).
// gv_j, then c_j, wait in coef (n x m) in the slot of lane j % 32, which alone writes and reads
// it, and reach the other lanes through prototype_warp_broadcast. grid ceil(n /
// kPrototypeRowWarps), block kPrototypeRowThreads.
template <typename T>
FA_GLOBAL void prototype_topk_mix_backward_kernel(
    const T* __restrict__ grad, const T* __restrict__ queries, const T* __restrict__ keys,
    const T* __restrict__ values, const int64_t* __restrict__ top_index,
    const T* __restrict__ weights, int n, int d, int dv, int m, float inv_tau,
    float* __restrict__ coef, T* __restrict__ grad_queries, float* __restrict__ grad_keys,
    float* __restrict__ grad_values) {
  const int row = prototype_warp_row(), lane = prototype_lane();
  if (row >= n) return;
  const long offset = static_cast<long>(row) * m;
  const T* g = grad + static_cast<long>(row) * dv;
  const T* q = queries + static_cast<long>(row) * d;
  float mean = 0.0f;
  for (int j = 0; j < m; ++j) {
    const long key = top_index[offset + j];
    const float w = static_cast<float>(weights[offset + j]);
    float partial = 0.0f;
    for (int c = lane; c < dv; c += kWarpSize) {
      const float gc = static_cast<float>(g[c]);
      partial += gc * static_cast<float>(values[key * dv + c]);
      fa_atomic_add(grad_values + key * dv + c, w * gc);
    }
    const float gv = fa_warp_sum(partial);
    if (lane == j % kWarpSize) coef[offset + j] = gv;
    mean += w * gv;
  }
  for (int j = lane; j < m; j += kWarpSize) {
    const float w = static_cast<float>(weights[offset + j]);
    coef[offset + j] = w * (coef[offset + j] - mean) * inv_tau;
  }
  for (int c0 = 0; c0 < d; c0 += kWarpSize) {  // every lane takes part in the broadcasts
    const int c = c0 + lane;
    const float qc = c < d ? static_cast<float>(q[c]) : 0.0f;
    float sum = 0.0f;
    for (int j = 0; j < m; ++j) {
      const int owner = j % kWarpSize;
      const float cj = prototype_warp_broadcast(lane == owner ? coef[offset + j] : 0.0f, owner);
      if (c >= d) continue;
      const long key = top_index[offset + j];
      sum += cj * static_cast<float>(keys[key * d + c]);
      fa_atomic_add(grad_keys + key * d + c, cj * qc);
    }
    if (c < d) grad_queries[static_cast<long>(row) * d + c] = static_cast<T>(sum);
  }
}

}  // namespace fastalign_cuda
