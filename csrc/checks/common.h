// Argument checks shared by the operators' check headers (csrc/checks/<op>.h). Every error names
// the op and the argument, and says what was expected and what came, like the Python layer
// (fastalign/ops/_checks.py), with the same exception types: ValueError for a bad value or
// shape, TypeError for a bad dtype.
//
// Device synchronisation: shape, dtype, device and option checks read only metadata. Checks of
// the values inside a tensor (lengths, saved indices) are free on CPU tensors; on CUDA tensors
// check_range costs one aminmax and a copy of two numbers to the host, i.e. one device
// synchronisation per checked tensor. Checks of float data (check_non_negative, check_finite)
// run on CPU tensors only: on CUDA the Python layer does them (fastalign/ops/_checks.py).
//
// Non-finite inputs: the CPU kernels raise on a NaN or an infinity in any input they read,
// naming the tensor and its first bad element (check_finite: one vectorised pass, next to the
// kernels' own passes it costs little). The reference propagates a NaN wherever it flows, and a
// kernel that skipped it (a max that ignores NaN) would give an answer that depends on where the
// NaN sits: raising is the one behaviour that matches neither silently. The CUDA kernels do not
// look for non-finite values (that would cost a device synchronisation per call).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace fastalign::checks {

// Which kernels will read the tensors: the CPU ones take float32 and float64, the CUDA ones
// (also when the host emulation runs them on CPU tensors) float16, bfloat16 and float32.
enum class Kernels { kCpu, kCuda };

struct Named {
  const char* name;
  const at::Tensor& tensor;
};

// "[i, j, k]" for the flat (row-major) position `flat` in a tensor of these sizes.
inline std::string position(at::IntArrayRef sizes, int64_t flat) {
  std::vector<int64_t> index(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    index[d] = sizes[d] ? flat % sizes[d] : 0;
    flat = sizes[d] ? flat / sizes[d] : 0;
  }
  std::ostringstream out;
  out << "[";
  for (size_t d = 0; d < index.size(); ++d) out << (d ? ", " : "") << index[d];
  out << "]";
  return out.str();
}

// t has `dims` dimensions, named by layout (e.g. "(N, D)").
inline void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims,
                       const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must be ", dims, "-D ", layout,
                    ", got shape ", t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", layout, " = ",
                    expected, ", got ", t.sizes());
}

// Every tensor on the first one's device.
inline void check_same_device(const char* op, std::initializer_list<Named> tensors) {
  const Named& first = *tensors.begin();
  for (const Named& t : tensors) {
    TORCH_CHECK_VALUE(t.tensor.device() == first.tensor.device(), op, ": ", first.name, " and ",
                      t.name, " must be on one device, got ", first.tensor.device(), " and ",
                      t.tensor.device());
  }
}

// Floating-point tensors of one dtype, one the kernels take, on one device.
inline void check_floating(const char* op, Kernels kernels, std::initializer_list<Named> tensors) {
  const Named& first = *tensors.begin();
  const auto dtype = first.tensor.scalar_type();
  for (const Named& t : tensors) {
    TORCH_CHECK_TYPE(t.tensor.scalar_type() == dtype, op, ": ", first.name, " and ", t.name,
                     " must share a dtype, got ", dtype, " and ", t.tensor.scalar_type());
  }
  if (kernels == Kernels::kCpu) {
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                     ": the CPU kernels take float32 or float64, got ", dtype);
  } else {
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                     ": the CUDA kernels take float16, bfloat16 or float32 (they compute in "
                     "float32, so float64 is refused), got ",
                     dtype);
  }
  check_same_device(op, tensors);
}

// A size the kernels index with int32.
inline void check_int32_size(const char* op, const char* what, int64_t size) {
  TORCH_CHECK_VALUE(size <= std::numeric_limits<int32_t>::max(), op, ": ", what, " = ", size,
                    " overflows the kernels' int32 indexing (at most 2^31 - 1)");
}

// `value` is one of the codes of Option (csrc/option_codes.h).
template <typename Option>
void check_option(const char* op, const char* name, int64_t value) {
  const int64_t count = static_cast<int64_t>(std::size(Option::kNames));
  if (value >= 0 && value < count) return;
  std::ostringstream expected;
  for (int64_t code = 0; code < count; ++code)
    expected << (code ? ", " : "") << code << " (" << Option::kNames[code] << ")";
  TORCH_CHECK_VALUE(false, op, ": ", name, " = ", value, ", expected one of ", expected.str());
}

// A finite number above low (or equal to it when low_ok), as check_number in Python.
inline void check_number(const char* op, const char* name, double value, double low,
                         bool low_ok) {
  TORCH_CHECK_VALUE(std::isfinite(value) && (value > low || (low_ok && value == low)), op, ": ",
                    name, " = ", value, ", expected a finite number ", low_ok ? ">= " : "> ", low);
}

// Every value v of the integer tensor x satisfies low <= v <= high (`what` names v in the
// error).
inline void check_range(const char* op, const char* name, const at::Tensor& x, int64_t low,
                        int64_t high, const char* what) {
  if (x.numel() == 0) return;
  at::Tensor values = x;
  if (!x.is_cpu()) {
    const auto [lo, hi] = at::aminmax(x);
    const at::Tensor bounds = at::stack({lo, hi}).cpu();  // the one device synchronisation
    if (bounds[0].item<int64_t>() >= low && bounds[1].item<int64_t>() <= high) return;
    values = x.cpu();  // error path: find the first bad value
  }
  values = values.contiguous();  // read in its own integer type: no widened copy
  AT_DISPATCH_INTEGRAL_TYPES(values.scalar_type(), "check_range", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    for (int64_t i = 0; i < values.numel(); ++i) {
      const int64_t value = static_cast<int64_t>(v[i]);
      TORCH_CHECK_VALUE(value >= low && value <= high, op, ": ", name,
                        position(values.sizes(), i), " = ", value, ", expected ", low, " <= ",
                        what, " <= ", high);
    }
  });
}

// An integer (count,) tensor of lengths 1..padded, as contiguous int64.
inline at::Tensor checked_lengths(const char* op, const char* name, const at::Tensor& lengths,
                                  int64_t count, int64_t padded) {
  TORCH_CHECK_TYPE(at::isIntegralType(lengths.scalar_type(), /*includeBool=*/false), op, ": ",
                   name, " must hold integers, got dtype ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == count, op, ": ", name,
                    " must have shape (", count, ",), got ", lengths.sizes());
  const at::Tensor out = lengths.to(at::kLong).contiguous();
  check_range(op, name, out, 1, padded, "length");
  return out;
}

// A finite value below 0: NaN and -inf are check_finite's to name (where it runs: not on CUDA).
template <typename scalar_t>
bool finite_negative(scalar_t v) {
  return v < scalar_t(0) && v > -std::numeric_limits<scalar_t>::infinity();
}

template <typename scalar_t>
void check_non_negative_items(const char* op, const char* name, const at::Tensor& x,
                              const char* what) {
  const scalar_t* v = x.data_ptr<scalar_t>();
  const int64_t n = x.numel();
  int64_t negatives = 0;
#pragma omp simd reduction(+ : negatives)
  for (int64_t e = 0; e < n; ++e) negatives += finite_negative(v[e]) ? 1 : 0;
  if (negatives == 0) return;
  int64_t e = 0;
  while (!finite_negative(v[e])) ++e;
  TORCH_CHECK_VALUE(false, op, ": ", name, position(x.sizes(), e), " = ",
                    static_cast<double>(v[e]), ", expected a non-negative ", what);
}

// Every value of the floating tensor x is >= 0 (NaN and -inf pass: check_finite names them), on CPU
// tensors: one vectorised pass. CUDA tensors are not read (a device synchronisation per call).
inline void check_non_negative(const char* op, const char* name, const at::Tensor& x,
                               const char* what) {
  if (!x.is_cpu() || x.numel() == 0) return;
  const at::Tensor values = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, values.scalar_type(), "check_non_negative",
      [&] { check_non_negative_items<scalar_t>(op, name, values, what); });
}

// Whether x[0..n) is all finite: one vectorised pass (v - v is NaN exactly when v is a NaN or an
// infinity).
template <typename scalar_t>
bool all_finite(const scalar_t* x, int64_t n) {
  scalar_t check = 0;
#pragma omp simd reduction(+ : check)
  for (int64_t e = 0; e < n; ++e) check += x[e] - x[e];
  return check == scalar_t(0);
}

template <typename scalar_t>
void check_finite_items(const char* op, const char* name, const at::Tensor& x,
                        const int64_t* lengths) {
  const int64_t items = x.size(0), item_size = x.numel() / items;
  const int64_t row_size = x.dim() > 1 ? item_size / x.size(1) : item_size;
  const scalar_t* p = x.data_ptr<scalar_t>();
  std::vector<char> finite(items);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      finite[n] = all_finite(p + n * item_size, lengths ? lengths[n] * row_size : item_size);
  });
  for (int64_t n = 0; n < items; ++n) {
    if (finite[n]) continue;
    int64_t e = n * item_size;
    while (std::isfinite(p[e])) ++e;
    TORCH_CHECK_VALUE(false, op, ": ", name, " holds a non-finite value (", p[e], ") at ",
                      position(x.sizes(), e), lengths ? " (a valid token)" : "",
                      "; the CPU kernels need finite inputs");
  }
}

// Raises naming the first non-finite element of the contiguous CPU float tensor x: item n is
// x[n], and with lengths (int64, one per item) only its first lengths[n] rows are read (the
// valid tokens). The items run in parallel.
inline void check_finite(const char* op, const char* name, const at::Tensor& x,
                         const int64_t* lengths = nullptr) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "check_finite",
                             [&] { check_finite_items<scalar_t>(op, name, x, lengths); });
}

// For a kernel whose own pass saw a non-finite value (cheaply, without keeping where): raises
// check_finite's error for the first of ``tensors`` that holds one.
inline void raise_non_finite(const char* op, std::initializer_list<Named> tensors) {
  for (const Named& t : tensors) check_finite(op, t.name, t.tensor);
  TORCH_INTERNAL_ASSERT(false, op, ": a pass saw a non-finite value that check_finite missed");
}

}  // namespace fastalign::checks
