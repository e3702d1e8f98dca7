// The integer codes of the operators' option arguments (the schemas in csrc/schemas.h), for the
// CPU kernels, the CUDA kernels and their host code. An option's code is the index of its name
// in the matching tuple of fastalign/ops/_options.py, which Python and the Triton kernels use;
// tests/test_option_codes.py parses this file and fails when the two differ. Torch-free, so
// that the nvcc compile check can include it.
#pragma once

#include <cstdint>

namespace fastalign {

// Each struct: the codes (k + the option's name) and their names, in code order.
struct Direction {
  enum : int64_t { kT2I = 0, kI2T = 1, kBoth = 2 };
  static constexpr const char* kNames[] = {"t2i", "i2t", "both"};
};

struct Align {
  enum : int64_t { kMax = 0, kLse = 1 };
  static constexpr const char* kNames[] = {"max", "lse"};
};

struct Aggregate {
  enum : int64_t { kMean = 0, kSum = 1, kMax = 2, kLse = 3 };
  static constexpr const char* kNames[] = {"mean", "sum", "max", "lse"};
};

struct CorrelationMode {
  enum : int64_t { kBarlow = 0, kSoftmax = 1 };
  static constexpr const char* kNames[] = {"barlow", "softmax"};
};

// Through C = A^T B / N, or through the N x N Gram matrices (barlow only).
struct CorrelationPath {
  enum : int64_t { kAuto = 0, kCorrelation = 1, kGram = 2 };
  static constexpr const char* kNames[] = {"auto", "correlation", "gram"};
};

struct SpatialKind {
  enum : int64_t { kInter = 0, kIntra = 1 };
  static constexpr const char* kNames[] = {"inter", "intra"};
};

struct SpatialSelect {
  enum : int64_t { kThreshold = 0, kSoft = 1, kTopk = 2 };
  static constexpr const char* kNames[] = {"threshold", "soft", "topk"};
};

struct AssignMode {
  enum : int64_t { kSoftmax = 0, kHard = 1, kSinkhorn = 2 };
  static constexpr const char* kNames[] = {"softmax", "hard", "sinkhorn"};
};

}  // namespace fastalign
