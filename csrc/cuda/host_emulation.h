// Host emulation of the CUDA feature set in device_api.h, so that the CUDA kernels run on the
// CPU in tests. A launch runs the blocks of the grid one after another; the threads of a block
// are std::threads (created once per launch and reused for every block), fa_syncthreads() is a
// barrier over the block, the FA_SHARED arrays of a block are carved from one arena (filled with
// 0xff bytes, i.e. NaN floats, before every block, so a read before a write shows), warp
// shuffles and ballots exchange values through a per-warp buffer between two warp barriers,
// and atomics take one global mutex.
// Limits (all are also undefined or wrong on a GPU): shuffles and ballots need every lane of
// the warp (the kernels use the full mask); blocks must not depend on each other; a thread that
// returns early leaves the block's barriers (as an exited thread does on a GPU) and must not
// take part in a later shuffle. No memory-model subtleties: the barriers order everything.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fa_emu {

struct Dim3 {
  int x = 1, y = 1, z = 1;
  Dim3(int x_ = 1, int y_ = 1, int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// A reusable barrier; a thread that leaves (arrive_and_drop) no longer counts.
class Barrier {
 public:
  void reset(int expected) {
    std::lock_guard<std::mutex> lock(mutex_);
    expected_ = expected;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ >= expected_) {
      release();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (expected_ > 0 && arrived_ >= expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0;
  uint64_t generation_ = 0;
};

constexpr int kWarp = 32;
constexpr size_t kSharedBytes = 48 * 1024;  // the static shared-memory limit of a CUDA block

struct Warp {
  Barrier barrier;
  float values[kWarp];
  uint32_t votes[kWarp];
};

struct Block {
  std::vector<unsigned char> arena = std::vector<unsigned char>(kSharedBytes);
  Barrier barrier;
  std::vector<Warp> warps;
};

struct Context {
  int thread_x = 0, thread_y = 0, block_x = 0, block_y = 0, lane = 0;
  Dim3 block_dim, grid_dim;
  Block* block = nullptr;
  Warp* warp = nullptr;
  size_t shared_offset = 0;
};

inline Context*& current() {
  thread_local Context* context = nullptr;
  return context;
}

inline Context& ctx() {
  Context* c = current();
  if (c == nullptr) throw std::logic_error("fa_emu: device function called outside a launch");
  return *c;
}

template <typename T>
T* shared_array(size_t count) {
  Context& c = ctx();
  const size_t offset = (c.shared_offset + 31) / 32 * 32;
  c.shared_offset = offset + count * sizeof(T);
  if (c.shared_offset > kSharedBytes) throw std::length_error("fa_emu: shared memory over 48 KiB");
  return reinterpret_cast<T*>(c.block->arena.data() + offset);
}

inline void syncthreads() { ctx().block->barrier.arrive_and_wait(); }

inline float shfl_xor(float v, int mask) {
  Context& c = ctx();
  c.warp->values[c.lane] = v;
  c.warp->barrier.arrive_and_wait();
  const float other = c.warp->values[(c.lane ^ mask) % kWarp];
  c.warp->barrier.arrive_and_wait();
  return other;
}

inline uint32_t ballot(bool p) {
  Context& c = ctx();
  c.warp->votes[c.lane] = p ? 1u : 0u;
  c.warp->barrier.arrive_and_wait();
  uint32_t bits = 0;
  for (int lane = 0; lane < kWarp; ++lane) bits |= c.warp->votes[lane] << lane;
  c.warp->barrier.arrive_and_wait();
  return bits;
}

inline std::mutex& atomic_mutex() {
  static std::mutex m;
  return m;
}

template <typename V>
V atomic_add(V* p, V v) {
  std::lock_guard<std::mutex> lock(atomic_mutex());
  const V old = *p;
  *p = old + v;
  return old;
}

// The bits of a float, and the number of set bits (__float_as_uint, __popc).
inline uint32_t float_as_uint(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

inline int popc(uint32_t bits) { return __builtin_popcount(bits); }

// Runs kernel() for every block of `grid` with block.x * block.y threads.
inline void launch(Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
  if (grid.z != 1 || block.z != 1) throw std::invalid_argument("fa_emu: 3-D launches unsupported");
  const int n = block.x * block.y;
  if (n <= 0 || n > 1024 || grid.x <= 0 || grid.y <= 0) {
    throw std::invalid_argument("fa_emu: invalid launch configuration");
  }
  Block state;
  state.warps = std::vector<Warp>((n + kWarp - 1) / kWarp);
  Barrier between_blocks;
  between_blocks.reset(n);
  std::mutex error_mutex;
  std::exception_ptr error;
  auto body = [&](int tid) {
    Context c;
    c.thread_x = tid % block.x;
    c.thread_y = tid / block.x;
    c.lane = tid % kWarp;
    c.block_dim = block;
    c.grid_dim = grid;
    c.block = &state;
    c.warp = &state.warps[tid / kWarp];
    current() = &c;
    for (int by = 0; by < grid.y; ++by) {
      for (int bx = 0; bx < grid.x; ++bx) {
        if (tid == 0) {  // the previous block is over for every thread: set up this one
          std::memset(state.arena.data(), 0xff, state.arena.size());
          state.barrier.reset(n);
          for (size_t w = 0; w < state.warps.size(); ++w) {
            state.warps[w].barrier.reset(std::min(kWarp, n - static_cast<int>(w) * kWarp));
          }
        }
        between_blocks.arrive_and_wait();
        c.block_x = bx;
        c.block_y = by;
        c.shared_offset = 0;
        try {
          kernel();
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error) error = std::current_exception();
        }
        state.barrier.arrive_and_drop();  // the thread has left the kernel
        c.warp->barrier.arrive_and_drop();
        between_blocks.arrive_and_wait();
      }
    }
    current() = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int tid = 0; tid < n; ++tid) threads.emplace_back(body, tid);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace fa_emu
