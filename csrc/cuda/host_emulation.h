// Host emulation of the CUDA feature set in device_api.h, so that the CUDA kernels run on the
// CPU in tests. A launch runs the blocks of the grid one after another; the threads of a block
// are fibers (ucontext) on the calling thread, switched cooperatively: a thread runs until it
// waits at a barrier or leaves the kernel, then the next one that can go on runs. fa_syncthreads()
// is a barrier over the block, the FA_SHARED arrays of a block are carved from one arena
// (filled with 0xff bytes, i.e. NaN floats, before every block, so a read before a write
// shows), and warp shuffles and ballots exchange values through a per-warp buffer between two
// warp barriers. One OS thread: a barrier costs a fiber switch per thread, not a wake-up of
// hundreds of OS threads (which made the emulated tests spend most of their time in the
// kernel's scheduler), and atomics need no lock.
// Limits (all are also undefined or wrong on a GPU): shuffles and ballots need every lane of
// the warp (the kernels use the full mask); blocks must not depend on each other; a thread that
// returns early leaves the block's barriers (as an exited thread does on a GPU) and must not
// take part in a later shuffle. A block whose threads all wait on barriers that can never
// open (a barrier inside a branch only some threads take) fails the launch with an error.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

namespace fa_emu {

struct Dim3 {
  int x = 1, y = 1, z = 1;
  Dim3(int x_ = 1, int y_ = 1, int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// A reusable barrier; a thread that leaves (arrive_and_drop) no longer counts. Waiting is the
// scheduler's: a thread that must wait records the generation it waits to see pass.
class Barrier {
 public:
  void reset(int expected) {
    expected_ = expected;
    arrived_ = 0;
  }
  // True when this arrival opened the barrier; otherwise the caller waits for generation().
  bool arrive() {
    if (++arrived_ >= expected_) {
      release();
      return true;
    }
    return false;
  }
  void arrive_and_drop() {
    --expected_;
    if (expected_ > 0 && arrived_ >= expected_) release();
  }
  const uint64_t& generation() const { return generation_; }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
  }
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

// One emulated thread: its indices, its fiber, and the barrier generation it waits to pass.
struct Context {
  int thread_x = 0, thread_y = 0, block_x = 0, block_y = 0, lane = 0;
  Dim3 block_dim, grid_dim;
  Block* block = nullptr;
  Warp* warp = nullptr;
  size_t shared_offset = 0;
  ucontext_t fiber{};
  ucontext_t* scheduler = nullptr;
  const uint64_t* waiting_on = nullptr;  // a barrier's generation, or nullptr: runnable
  uint64_t waiting_since = 0;
  bool done = false;
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

// Arrives at `barrier`; unless that opened it, hands the CPU to the scheduler until it opens.
inline void arrive_and_wait(Barrier& barrier) {
  Context& c = ctx();
  const uint64_t generation = barrier.generation();
  if (barrier.arrive()) return;
  c.waiting_on = &barrier.generation();
  c.waiting_since = generation;
  swapcontext(&c.fiber, c.scheduler);
}

inline void syncthreads() { arrive_and_wait(ctx().block->barrier); }

inline float shfl_xor(float v, int mask) {
  Context& c = ctx();
  c.warp->values[c.lane] = v;
  arrive_and_wait(c.warp->barrier);
  const float other = c.warp->values[(c.lane ^ mask) % kWarp];
  arrive_and_wait(c.warp->barrier);
  return other;
}

inline uint32_t ballot(bool p) {
  Context& c = ctx();
  c.warp->votes[c.lane] = p ? 1u : 0u;
  arrive_and_wait(c.warp->barrier);
  uint32_t bits = 0;
  for (int lane = 0; lane < kWarp; ++lane) bits |= c.warp->votes[lane] << lane;
  arrive_and_wait(c.warp->barrier);
  return bits;
}

template <typename V>
V atomic_add(V* p, V v) {  // one OS thread, switches only at barriers: atomic as it is
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

// The fiber entry of thread `tid` of the current launch (makecontext passes ints only).
struct Launch {
  const std::function<void()>* kernel;
  std::vector<Context>* threads;
  std::exception_ptr error;
};

inline Launch*& current_launch() {
  thread_local Launch* launch = nullptr;
  return launch;
}

inline void fiber_main(int tid) {
  Launch& launch = *current_launch();
  Context& c = (*launch.threads)[tid];
  try {
    (*launch.kernel)();
  } catch (...) {
    if (!launch.error) launch.error = std::current_exception();
  }
  c.block->barrier.arrive_and_drop();  // the thread has left the kernel
  c.warp->barrier.arrive_and_drop();
  c.done = true;
  // returning resumes uc_link: the scheduler
}

// Runs kernel() for every block of `grid` with block.x * block.y threads.
inline void launch(Dim3 grid, Dim3 block, const std::function<void()>& kernel) {
  if (grid.z != 1 || block.z != 1) throw std::invalid_argument("fa_emu: 3-D launches unsupported");
  const int n = block.x * block.y;
  if (n <= 0 || n > 1024 || grid.x <= 0 || grid.y <= 0) {
    throw std::invalid_argument("fa_emu: invalid launch configuration");
  }
  if (current_launch() != nullptr) throw std::logic_error("fa_emu: launch inside a launch");
  constexpr size_t kStackBytes = 256 * 1024;  // per thread; untouched pages cost nothing
  std::unique_ptr<char[]> stacks(new char[kStackBytes * n]);
  Block state;
  state.warps = std::vector<Warp>((n + kWarp - 1) / kWarp);
  std::vector<Context> threads(n);
  Launch launch{&kernel, &threads, nullptr};
  ucontext_t scheduler;
  current_launch() = &launch;
  struct Reset {  // the launch state is cleared on every way out
    ~Reset() {
      current() = nullptr;
      current_launch() = nullptr;
    }
  } reset;
  for (int by = 0; by < grid.y && !launch.error; ++by) {
    for (int bx = 0; bx < grid.x && !launch.error; ++bx) {
      std::memset(state.arena.data(), 0xff, state.arena.size());
      state.barrier.reset(n);
      for (size_t w = 0; w < state.warps.size(); ++w) {
        state.warps[w].barrier.reset(std::min(kWarp, n - static_cast<int>(w) * kWarp));
      }
      for (int tid = 0; tid < n; ++tid) {
        Context& c = threads[tid];
        c = Context{};
        c.thread_x = tid % block.x;
        c.thread_y = tid / block.x;
        c.block_x = bx;
        c.block_y = by;
        c.lane = tid % kWarp;
        c.block_dim = block;
        c.grid_dim = grid;
        c.block = &state;
        c.warp = &state.warps[tid / kWarp];
        c.scheduler = &scheduler;
        getcontext(&c.fiber);
        c.fiber.uc_stack.ss_sp = stacks.get() + kStackBytes * tid;
        c.fiber.uc_stack.ss_size = kStackBytes;
        c.fiber.uc_link = &scheduler;
        makecontext(&c.fiber, reinterpret_cast<void (*)()>(fiber_main), 1, tid);
      }
      // Round robin over the threads that can go on, until every thread has left the kernel.
      for (int left = n; left > 0;) {
        bool progressed = false;
        for (Context& c : threads) {
          if (c.done || (c.waiting_on != nullptr && *c.waiting_on == c.waiting_since)) continue;
          c.waiting_on = nullptr;
          current() = &c;
          swapcontext(&scheduler, &c.fiber);
          current() = nullptr;
          progressed = true;
          left -= c.done;
        }
        if (!progressed) {
          throw std::logic_error(
              "fa_emu: every thread of a block waits on a barrier that cannot open");
        }
      }
    }
  }
  if (launch.error) std::rethrow_exception(launch.error);
}

}  // namespace fa_emu
