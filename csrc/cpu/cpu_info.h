// What the CPU kernels ask of the machine they run on, in one place: the data cache sizes
// their block sizes come from (read at run time, never a constant tuned to one CPU), the x86-64
// level their hot loops run at (each is compiled for AVX-512, AVX2 + FMA and the baseline, and
// picks the best the CPU has), and the block arithmetic the kernels share.
#pragma once

#include <c10/util/Exception.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTALIGN_X86_ISAS 1
#endif

namespace fastalign {

// Used when neither the C library nor sysfs says (the smallest L2 of today's x86 cores).
constexpr int64_t kFallbackL2Bytes = 512 << 10;

// One core's level-`level` data (or unified) cache in bytes from sysfs, or 0.
inline int64_t sysfs_cache_bytes(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), type_file(dir + "/type"), size_file(dir + "/size");
    int found_level = 0;
    std::string type, size;
    if (!(level_file >> found_level) || !(type_file >> type) || !(size_file >> size)) return 0;
    if (found_level != level || type == "Instruction") continue;
    const int64_t value = std::strtoll(size.c_str(), nullptr, 10);
    const char unit = size.back();
    return unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : value;
  }
  return 0;
}

// What the C library reports for one core's cache (sysconf), else sysfs, else 0.
inline int64_t reported_cache_bytes(int sysconf_name, int level) {
  const long from_libc = sysconf(sysconf_name);
  return from_libc > 0 ? static_cast<int64_t>(from_libc) : sysfs_cache_bytes(level);
}

// FASTALIGN_<NAME>_BYTES when set (tests run the kernels under other caches' block sizes;
// anything but a positive integer is refused), else the reported size, else the fallback.
inline int64_t cache_bytes(const char* env_name, int64_t reported, int64_t fallback) {
  if (const char* value = std::getenv(env_name)) {
    char* end = nullptr;
    const long long bytes = std::strtoll(value, &end, 10);
    TORCH_CHECK_VALUE(end != value && *end == '\0' && bytes > 0, env_name,
                      " must be a positive number of bytes, got '", value, "'");
    return bytes;
  }
  return reported > 0 ? reported : fallback;
}

// One core's L2 cache in bytes: the block sizes' budget.
inline int64_t l2_bytes() {
  static const int64_t reported = reported_cache_bytes(_SC_LEVEL2_CACHE_SIZE, 2);
  return cache_bytes("FASTALIGN_L2_BYTES", reported, kFallbackL2Bytes);
}

// The x86-64 levels a hot loop is compiled for: baseline (SSE2), v3 (AVX2, FMA), v4 (AVX-512).
enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best level this CPU runs, or a lower one named by FASTALIGN_CPU_ISA ("avx2" or
// "baseline": tests run every path on one machine; "avx2" on a CPU without it leaves the
// CPU's level; any other name is refused).
inline Isa cpu_isa() {
#ifdef FASTALIGN_X86_ISAS
  static const Isa supported = __builtin_cpu_supports("x86-64-v4")   ? Isa::kAvx512
                               : __builtin_cpu_supports("x86-64-v3") ? Isa::kAvx2
                                                                     : Isa::kBaseline;
#else
  static const Isa supported = Isa::kBaseline;
#endif
  const char* requested = std::getenv("FASTALIGN_CPU_ISA");
  if (requested == nullptr) return supported;
  const std::string name(requested);
  TORCH_CHECK_VALUE(name == "baseline" || name == "avx2", "FASTALIGN_CPU_ISA must be 'avx2' or ",
                    "'baseline' (a level below the CPU's own), got '", name, "'");
  return std::min(name == "baseline" ? Isa::kBaseline : Isa::kAvx2, supported);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The largest power of two <= bytes / item_bytes, clamped to [lo, hi] (powers of two).
inline int64_t items_fitting(int64_t bytes, int64_t item_bytes, int64_t lo, int64_t hi) {
  int64_t count = lo;
  while (count * 2 <= hi && count * 2 * item_bytes <= bytes) count *= 2;
  return count;
}

}  // namespace fastalign
