// CUDA kernels of the sparse spatial loss (DIAS L_inter / L_intra). normalize_rows
// writes the normalised rows [u_r, v_r] (and, for intra, [v_r - u_r, v_r + u_r]) into float32
// workspaces, one block per row pair; the N x N products run through strided_gemm_kernel, and
// add_transpose turns P into D (inter P - P^T, intra P + P^T) and later Gamma into Omega,
// 32 x 32 tile pairs per block. select_rows owns one row of D per block: statistics over the
// off-diagonal entries, the selection (top-k by bisection on the float bits, counted with warp
// ballots), the row's loss and Gamma = dL/dD in place. Precision: float32 everywhere (sums,
// products, statistics); the host sums the per-row losses in double.
#pragma once

#include "device_api.h"

namespace fastalign_cuda {

// Threads of the row kernels (any multiple of 32). One warp: a row holds N (a batch, 128 to a
// few thousand) or D entries, N blocks keep the GPU busy, and each barrier of the host emulation
// costs in proportion to the block's threads.
constexpr int kRowThreads = 32, kRowWarps = kRowThreads / kWarpSize;
constexpr int kPairTile = 32, kPairRows = 8;
constexpr int kSelectThreshold = 0, kSelectSoft = 1, kSelectTopk = 2;
// F.normalize's eps: a row of norm below it is divided by it instead (a zero row gives zeros).
constexpr float kNormEps = 1e-12f;

// A NaN norm stays NaN, as in F.normalize's clamp_min (fmaxf would give eps).
FA_DEVICE float clamped_norm(float norm) { return fastalign::nan_max(norm, kNormEps); }

// grid (n), block kRowThreads: row r of img and of txt normalised into normalized[r] = [u, v]
// ((n, 2d) floats) and, when sum_diff is not null, sum_diff[r] = [v - u, v + u]; their norms
// into norms[0 or 1][r]. A NaN or an infinity in a row makes its normalised row hold NaN, and
// through D the loss, as in the reference.
template <typename T>
FA_GLOBAL void normalize_rows_kernel(const T* __restrict__ img, const T* __restrict__ txt, int n,
                                     int d, float* __restrict__ normalized,
                                     float* __restrict__ sum_diff, float* __restrict__ norms) {
  FA_SHARED(float, scratch, kWarpSize);
  const int r = fa_block_x(), tid = fa_thread_x();
  const long in_row = static_cast<long>(r) * d, out_row = 2 * in_row;
  float squares_u = 0.0f, squares_v = 0.0f;
  for (int c = tid; c < d; c += kRowThreads) {
    const float x = static_cast<float>(img[in_row + c]), y = static_cast<float>(txt[in_row + c]);
    squares_u += x * x;
    squares_v += y * y;
  }
  const float norm_u = sqrtf(fa_block_reduce(squares_u, scratch, false));
  const float norm_v = sqrtf(fa_block_reduce(squares_v, scratch, false));
  // Divided, not multiplied by the inverse: one rounding, so D = 1 gives u = +-1 exactly.
  const float divisor_u = clamped_norm(norm_u), divisor_v = clamped_norm(norm_v);
  for (int c = tid; c < d; c += kRowThreads) {
    const float u = static_cast<float>(img[in_row + c]) / divisor_u;
    const float v = static_cast<float>(txt[in_row + c]) / divisor_v;
    normalized[out_row + c] = u;
    normalized[out_row + d + c] = v;
    if (sum_diff != nullptr) {
      sum_diff[out_row + c] = v - u;
      sum_diff[out_row + d + c] = v + u;
    }
  }
  if (tid == 0) {
    norms[r] = norm_u;
    norms[n + r] = norm_v;
  }
}

// g = g + sign * g^T in place for an n x n matrix (sign +-1, so the result is exactly
// sign-symmetric). grid (ceil(n / 32), ceil(n / 32)): the block (x >= y) loads the tiles
// (y, x) and (x, y) and writes both back; blocks below the diagonal leave at once.
// block (kPairTile, kPairRows).
FA_GLOBAL void add_transpose_kernel(float* __restrict__ g, int n, float sign) {
  FA_SHARED(float, upper, kPairTile * (kPairTile + 1));
  FA_SHARED(float, lower, kPairTile * (kPairTile + 1));
  const int ti = fa_block_y(), tj = fa_block_x();
  if (tj < ti) return;
  const int tx = fa_thread_x();
  const int upper_col = tj * kPairTile + tx, lower_col = ti * kPairTile + tx;
  for (int r = fa_thread_y(); r < kPairTile; r += kPairRows) {
    const int upper_row = ti * kPairTile + r, lower_row = tj * kPairTile + r;
    upper[r * (kPairTile + 1) + tx] =
        upper_row < n && upper_col < n ? g[static_cast<long>(upper_row) * n + upper_col] : 0.0f;
    lower[r * (kPairTile + 1) + tx] =
        lower_row < n && lower_col < n ? g[static_cast<long>(lower_row) * n + lower_col] : 0.0f;
  }
  fa_syncthreads();
  for (int r = fa_thread_y(); r < kPairTile; r += kPairRows) {
    const int upper_row = ti * kPairTile + r, lower_row = tj * kPairTile + r;
    if (upper_row < n && upper_col < n) {
      g[static_cast<long>(upper_row) * n + upper_col] =
          upper[r * (kPairTile + 1) + tx] + sign * lower[tx * (kPairTile + 1) + r];
    }
    if (ti != tj && lower_row < n && lower_col < n) {
      g[static_cast<long>(lower_row) * n + lower_col] =
          lower[r * (kPairTile + 1) + tx] + sign * upper[tx * (kPairTile + 1) + r];
    }
  }
}

// A non-negative int that orders the entries as the selection does: larger E first when
// largest (E >= 0, so its float bits order like it), smaller first otherwise.
FA_DEVICE int selection_key(float e, bool largest) {
  const int bits = static_cast<int>(fa_float_as_uint(e));
  return largest ? bits : 0x7FFFFFFF - bits;
}

// The number of off-diagonal entries of row `a` whose key is above `bound`, for this warp
// (every lane gets it): one ballot per 32 entries.
FA_DEVICE int warp_count_keys_above(const float* row, int a, int n, bool largest, int bound) {
  int count = 0;
  for (int c0 = 0; c0 < n; c0 += kRowThreads) {
    const int b = c0 + fa_thread_x();
    const bool above = b < n && b != a && selection_key(fabsf(row[b]), largest) > bound;
    count += fa_popc(fa_ballot(above));
  }
  return count;
}

// One block per row a of d (n x n, D on entry): E = |D| off the diagonal, its mean mu and
// biased std sigma (a row of equal entries: that value and 0), the weights w of the selection,
// row_loss[a] = sum_b w E^2 and, when need_grad, grad_alpha[a] (soft; 0 otherwise) and the row
// overwritten by Gamma = dL/dD (the formulas of csrc/cpu/sparse_spatial.cpp). Top-k: the k-th
// key by bisection on its 31 bits, entries equal to it taken from the lowest column on.
// grid (n), block kRowThreads.
FA_GLOBAL void select_rows_kernel(float* __restrict__ d, const float* __restrict__ alpha, int n,
                                  int select, int k, float inv_temperature, bool largest,
                                  bool need_grad, float* __restrict__ row_loss,
                                  float* __restrict__ grad_alpha) {
  FA_SHARED(float, scratch, kWarpSize);
  FA_SHARED(int, counts, 32);  // one counter per bisection step, the last for the ties
  FA_SHARED(int, warp_ties, kRowWarps);
  const int a = fa_block_x(), tid = fa_thread_x();
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  float* row = d + static_cast<long>(a) * n;
  const float m = static_cast<float>(n - 1), inv_n = 1.0f / static_cast<float>(n);
  const float sign = largest ? 1.0f : -1.0f;
  if (tid < 32) counts[tid] = 0;

  float sum = 0.0f, low = INFINITY, high = -INFINITY;
  for (int b = tid; b < n; b += kRowThreads) {
    if (b == a) continue;
    const float e = fabsf(row[b]);
    sum += e;
    low = fastalign::nan_min(low, e);
    high = fastalign::nan_max(high, e);
  }
  sum = fa_block_reduce(sum, scratch, false);
  high = fa_block_reduce(high, scratch, true);
  low = -fa_block_reduce(-low, scratch, true);
  // Equal entries: mean = that value and std = 0 exactly (their rounded mean can differ). A NaN
  // entry makes low, high, mu and sigma NaN, so no entry is selected, as in the reference.
  float mu = low, sigma = 0.0f;
  if (low != high) {
    mu = sum / m;
    float squares = 0.0f;
    for (int b = tid; b < n; b += kRowThreads) {
      const float centered = fabsf(row[b]) - mu;
      if (b != a) squares += centered * centered;
    }
    sigma = sqrtf(fa_block_reduce(squares, scratch, false) / m);
  }
  const float alpha_a = alpha[a];
  const float threshold = mu + sign * alpha_a * sigma;

  int kth = 0, ties_wanted = 0;
  if (select == kSelectTopk) {
    // The largest key with at least k keys >= it, bit by bit (counts[bit]: keys >= candidate).
    for (int bit = 30; bit >= 0; --bit) {
      const int candidate = kth | (1 << bit);
      const int warp_count = warp_count_keys_above(row, a, n, largest, candidate - 1);
      if (lane == 0) fa_atomic_add(&counts[bit], warp_count);
      fa_syncthreads();
      if (counts[bit] >= k) kth = candidate;
    }
    const int warp_above = warp_count_keys_above(row, a, n, largest, kth);
    if (lane == 0) fa_atomic_add(&counts[31], warp_above);
    fa_syncthreads();
    ties_wanted = k - counts[31];
  }

  float loss = 0.0f, curvature = 0.0f;  // curvature: sum_b E^2 w (1 - w) / T (soft)
  int ties_seen = 0;  // entries equal to the k-th key in the chunks before
  for (int c0 = 0; c0 < n; c0 += kRowThreads) {
    const int b = c0 + tid;
    const bool valid = b < n && b != a;
    const float dv = b < n ? row[b] : 0.0f, e = fabsf(dv);
    float w = 0.0f;
    if (select == kSelectTopk) {
      const int key = selection_key(e, largest);
      const bool tie = valid && key == kth;
      const uint32_t tie_bits = fa_ballot(tie);
      if (lane == 0) warp_ties[warp] = fa_popc(tie_bits);
      fa_syncthreads();
      int rank = ties_seen + fa_popc(tie_bits & ((1u << lane) - 1u));
      int chunk_ties = 0;
      for (int other = 0; other < kRowWarps; ++other) {
        if (other < warp) rank += warp_ties[other];
        chunk_ties += warp_ties[other];
      }
      fa_syncthreads();  // warp_ties is rewritten for the next chunk
      ties_seen += chunk_ties;
      w = valid && (key > kth || (tie && rank < ties_wanted)) ? 1.0f : 0.0f;
    } else if (select == kSelectThreshold) {
      w = valid && sign * (e - threshold) > 0.0f ? 1.0f : 0.0f;
    } else if (valid) {
      w = 1.0f / (1.0f + fa_exp(-sign * (e - threshold) * inv_temperature));
      curvature += e * e * w * (1.0f - w);
    }
    loss += w * e * e;
    // G = 2 w E / N and sign(D) E = D; the diagonal gets w = 0.
    if (need_grad && select != kSelectSoft && b < n) row[b] = 2.0f * w * dv * inv_n;
  }
  loss = fa_block_reduce(loss, scratch, false);
  if (select == kSelectSoft) curvature = fa_block_reduce(curvature, scratch, false);
  curvature *= inv_temperature;
  if (tid == 0) {
    row_loss[a] = loss;
    // dL/dalpha = dL/dthreshold * sign * sigma, dL/dthreshold = -sign * curvature / N
    if (need_grad) grad_alpha[a] = select == kSelectSoft ? -curvature * sigma * inv_n : 0.0f;
  }
  if (!need_grad || select != kSelectSoft) return;
  // G_ab = (2 w E + sign E^2 w (1 - w) / T) / N + r (1/M + sign alpha (E - mu) / (M sigma)),
  // r = dL/dthreshold; none through sigma where it is 0 (torch.std's backward).
  const float r = -sign * curvature * inv_n;
  const float through_sigma = sigma > 0.0f ? r * sign * alpha_a / (m * sigma) : 0.0f;
  for (int b = tid; b < n; b += kRowThreads) {
    if (b == a) {
      row[b] *= 0.0f;  // w = 0 there; a NaN stays NaN, as the reference's 0 * dL/dE
      continue;
    }
    const float dv = row[b], e = fabsf(dv);
    const float w = 1.0f / (1.0f + fa_exp(-sign * (e - threshold) * inv_temperature));
    const float g = (2.0f * w * e + sign * e * e * w * (1.0f - w) * inv_temperature) * inv_n +
                    r / m + through_sigma * (e - mu);
    row[b] = g * (dv > 0.0f ? 1.0f : (dv < 0.0f ? -1.0f : dv));  // sign(D); sign(NaN) NaN
  }
}

// dL/dx of one row (blockIdx.y 0: img, 1: txt) from the gradient of its normalised row:
// grad_normalized = Omega [U | V] (n, 2d); img takes -half img_half of it, txt +the other half.
// dx = (g - u (u . g)) / max(||x||, eps), or g / eps for a row of norm below eps (F.normalize).
// grid (n, 2), block kRowThreads.
template <typename T>
FA_GLOBAL void normalize_backward_kernel(const float* __restrict__ normalized,
                                         const float* __restrict__ norms,
                                         const float* __restrict__ grad_normalized, int n, int d,
                                         int img_half, T* __restrict__ grad_img,
                                         T* __restrict__ grad_txt) {
  FA_SHARED(float, scratch, kWarpSize);
  const int r = fa_block_x(), which = fa_block_y(), tid = fa_thread_x();
  const long row = static_cast<long>(r) * 2 * d;
  const float* u = normalized + row + which * d;
  const float* g = grad_normalized + row + (which == 0 ? img_half : 1 - img_half) * d;
  T* out = (which == 0 ? grad_img : grad_txt) + static_cast<long>(r) * d;
  const float norm = norms[which * n + r];
  float dot = 0.0f;
  for (int c = tid; c < d; c += kRowThreads) dot += u[c] * g[c];
  dot = fa_block_reduce(dot, scratch, false);
  if (norm < kNormEps) dot = 0.0f;  // the clamped norm carries no gradient
  const float divisor = (which == 0 ? -1.0f : 1.0f) * clamped_norm(norm);
  for (int c = tid; c < d; c += kRowThreads) {
    out[c] = static_cast<T>((g[c] - u[c] * dot) / divisor);
  }
}

}  // namespace fastalign_cuda
