// Orderings shared by the CPU kernels and the CUDA kernels (nvcc and the host emulation): a NaN
// ranks above every number, as in torch.max, torch.argmax and torch.sort, so a NaN input gives
// the reference's answer wherever it sits instead of being skipped by a comparison.
#pragma once

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FA_HOST_DEVICE inline
#endif

namespace fastalign {

// a ranks strictly above b: a > b, or a is a NaN and b is not. A running maximum over it keeps
// the first of equal values and the first NaN.
template <typename T>
FA_HOST_DEVICE bool takes_over(T a, T b) {
  return a > b || (a != a && b == b);
}

// The maximum, a NaN when either is one (a + b then is); fmaxf and std::max would drop it.
template <typename T>
FA_HOST_DEVICE T nan_max(T a, T b) {
  return a != a || b != b ? a + b : (a > b ? a : b);
}

template <typename T>
FA_HOST_DEVICE T nan_min(T a, T b) {
  return a != a || b != b ? a + b : (a < b ? a : b);
}

// Inserts (key, value, index) into a running top-m list sorted by key, descending (keys, values
// and indices: m entries each), after every entry it does not take over; the last entry drops
// out. The caller has checked takes_over(key, keys[m - 1]). Entries arrive in increasing index
// order, so among equal keys (and among NaNs) the lower index stays ahead, as in a stable sort.
template <typename T, typename I, typename N>
FA_HOST_DEVICE void top_list_insert(T* keys, T* values, I* indices, N m, T key, T value,
                                    I index) {
  N pos = m - 1;
  for (; pos > 0 && takes_over(key, keys[pos - 1]); --pos) {
    keys[pos] = keys[pos - 1];
    values[pos] = values[pos - 1];
    indices[pos] = indices[pos - 1];
  }
  keys[pos] = key;
  values[pos] = value;
  indices[pos] = index;
}

}  // namespace fastalign
