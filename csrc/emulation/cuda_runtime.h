// CPU emulation of the small part of CUDA that fastprune's kernels use, so that the very
// same kernel sources run (slowly) on a machine without a GPU: FASTPRUNE_CUDA_EMULATE=1.
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after
// another. Fibers switch only at synchronisation points (__syncthreads, warp shuffles), in
// a pseudo-random order per round, so a kernel that reads shared memory without the barrier
// it needs gives different answers from run to run instead of passing by luck. Misuse that
// is undefined on a GPU is reported as a launch error: a shuffle whose mask leaves out the
// calling lane or names a lane that has exited, mismatched masks within a warp, a barrier
// that can never complete (deadlock). Shared memory: `__shared__` becomes a function-local
// static, which is exact while one block runs at a time.
//
// The build (fastprune/cuda_ext.py) rewrites `kernel<<<cfg>>>(args)` launches to
// `fastprune_emu::launch(kernel, cfg)(args)`; nothing else in the sources changes.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- language keywords --------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- runtime API subset -------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace fastprune_emu {

inline std::string& error_message() {
  static thread_local std::string msg;
  return msg;
}
inline cudaError_t& last_error() {
  static thread_local cudaError_t err = cudaSuccess;
  return err;
}

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // from stack_pool(), reused by every block
  uint3 tid;
  int warp = 0, lane = 0;
  bool done = false;
  const uint64_t* wait_gen = nullptr;  // blocked until *wait_gen != wait_val
  uint64_t wait_val = 0;
};

struct WarpState {
  unsigned live = 0;     // lanes that have not exited
  unsigned arrived = 0;  // lanes waiting at the current exchange
  unsigned mask = 0;     // the exchange's member mask
  uint64_t gen = 0;
  uint64_t vals[32] = {};
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  ucontext_t scheduler;
  Fiber* cur = nullptr;
  int live = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  bool failed = false;
  std::string error;
  std::function<void()> body;
};

inline Block*& current_block() {
  static thread_local Block* b = nullptr;
  return b;
}
inline uint3& block_idx() {
  static thread_local uint3 v{0, 0, 0};
  return v;
}
inline dim3& block_dim() {
  static thread_local dim3 v;
  return v;
}
inline dim3& grid_dim() {
  static thread_local dim3 v;
  return v;
}

inline Fiber& self() { return *current_block()->cur; }

// Give control back to the scheduler (the fiber resumes once its wait condition holds).
inline void yield_to_scheduler() {
  Block* b = current_block();
  swapcontext(&b->cur->ctx, &b->scheduler);
}

[[noreturn]] inline void fail(const std::string& what) {
  Block* b = current_block();
  b->failed = true;
  if (b->error.empty()) {
    const uint3 t = b->cur->tid;
    const uint3 bi = block_idx();
    b->error = what + " (block " + std::to_string(bi.x) + "," + std::to_string(bi.y) + "," +
               std::to_string(bi.z) + ", thread " + std::to_string(t.x) + ")";
  }
  for (;;) yield_to_scheduler();  // never resumed: the scheduler stops on failure
}

inline void wait_for_change(const uint64_t* gen) {
  Fiber& f = self();
  f.wait_gen = gen;
  f.wait_val = *gen;
  yield_to_scheduler();
}

// Open the block barrier once every thread that has not exited has arrived.
inline bool release_if_complete(Block* b) {
  if (b->bar_arrived == 0 || b->bar_arrived != b->live) return false;
  b->bar_arrived = 0;
  ++b->bar_gen;
  return true;
}

// __syncthreads: every thread of the block that has not exited arrives.
inline void sync_block() {
  Block* b = current_block();
  ++b->bar_arrived;
  if (!release_if_complete(b)) wait_for_change(&b->bar_gen);
}

// One warp-synchronous exchange: every lane of `mask` publishes `mine`, then reads lane
// `src_of(lane)`'s value; the second rendezvous keeps the slot alive until all have read.
template <class SrcOf>
inline uint64_t warp_exchange(unsigned mask, uint64_t mine, SrcOf src_of) {
  Block* b = current_block();
  Fiber& f = self();
  WarpState& w = b->warps[f.warp];
  const unsigned me = 1u << f.lane;
  if (!(mask & me)) fail("warp shuffle called by a lane outside its member mask");
  if (mask & ~w.live) fail("warp shuffle mask names a lane that has exited");
  auto rendezvous = [&] {
    if (w.arrived == 0) {
      w.mask = mask;
    } else if (w.mask != mask) {
      fail("lanes of one warp shuffle with different member masks");
    }
    w.arrived |= me;
    if (w.arrived == w.mask) {
      w.arrived = 0;
      ++w.gen;
    } else {
      wait_for_change(&w.gen);
    }
  };
  w.vals[f.lane] = mine;
  rendezvous();
  const int src = src_of(f.lane);
  const uint64_t got = (src >= 0 && src < 32 && (mask >> src) & 1u) ? w.vals[src] : mine;
  rendezvous();
  return got;
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle type");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline void fiber_entry() {
  Block* b = current_block();
  b->body();
  Fiber& f = self();
  f.done = true;
  --b->live;
  b->warps[f.warp].live &= ~(1u << f.lane);
  release_if_complete(b);  // an exit can complete a barrier the others are waiting at
  WarpState& w = b->warps[f.warp];
  if (w.arrived && (w.mask & ~w.live)) fail("a lane exited while its warp waits to shuffle");
  swapcontext(&f.ctx, &b->scheduler);  // finished: never resumed
}

inline uint64_t& rng_state() {
  static thread_local uint64_t s = [] {
    const char* e = std::getenv("FASTPRUNE_EMU_SEED");
    return e ? std::strtoull(e, nullptr, 10) * 2654435761u + 1 : 0x9E3779B97F4A7C15ull;
  }();
  return s;
}
inline uint32_t next_random() {
  uint64_t& s = rng_state();
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return static_cast<uint32_t>(s >> 11);
}

constexpr size_t kStack = 128 * 1024;

// Fiber stacks, allocated once per OS thread and reused (uninitialised: no memset per block).
inline char* stack_for(size_t t) {
  static thread_local std::vector<std::unique_ptr<char[]>> pool;
  while (pool.size() <= t) pool.emplace_back(new char[kStack]);
  return pool[t].get();
}

// Run one block to completion; false (with b.error) on a detected misuse or deadlock.
inline bool run_block(Block& b, size_t nthreads) {
  b.fibers.resize(nthreads);
  b.warps.assign((nthreads + 31) / 32, WarpState{});
  b.live = static_cast<int>(nthreads);
  const dim3 bd = block_dim();
  for (size_t t = 0; t < nthreads; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = uint3{static_cast<unsigned>(t % bd.x), static_cast<unsigned>((t / bd.x) % bd.y),
                  static_cast<unsigned>(t / (static_cast<size_t>(bd.x) * bd.y))};
    f.warp = static_cast<int>(t / 32);
    f.lane = static_cast<int>(t % 32);
    b.warps[f.warp].live |= 1u << f.lane;
    f.stack = stack_for(t);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<size_t> order(nthreads);
  for (size_t t = 0; t < nthreads; ++t) order[t] = t;
  while (b.live > 0 && !b.failed) {
    for (size_t t = nthreads; t > 1; --t) std::swap(order[t - 1], order[next_random() % t]);
    bool progressed = false;
    for (size_t k = 0; k < nthreads && !b.failed; ++k) {
      Fiber& f = b.fibers[order[k]];
      if (f.done || (f.wait_gen && *f.wait_gen == f.wait_val)) continue;
      f.wait_gen = nullptr;
      b.cur = &f;
      swapcontext(&b.scheduler, &f.ctx);
      progressed = true;
    }
    if (!progressed && !b.failed) {
      b.failed = true;
      b.error = "deadlock: threads wait at a barrier or shuffle that can never complete";
    }
  }
  return !b.failed;
}

template <class... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;

  template <class... Args>
  void operator()(Args&&... args) const {
    if (last_error() != cudaSuccess) return;
    if (block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024 ||
        grid.x == 0 || grid.y == 0 || grid.z == 0) {
      last_error() = cudaErrorInvalidConfiguration;
      error_message() = "invalid launch configuration";
      return;
    }
    std::tuple<Params...> bound(std::forward<Args>(args)...);
    const size_t nthreads = static_cast<size_t>(block.x) * block.y * block.z;
    grid_dim() = grid;
    block_dim() = block;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          block_idx() = uint3{x, y, z};
          Block b;
          b.body = [&] { std::apply(kernel, bound); };
          current_block() = &b;
          const bool ok = run_block(b, nthreads);
          current_block() = nullptr;
          if (!ok) {
            last_error() = cudaErrorLaunchFailure;
            error_message() = b.error;
            return;
          }
        }
  }
};

template <class... Params>
Launcher<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t = 0,
                           cudaStream_t = nullptr) {
  return Launcher<Params...>{kernel, grid, block};
}

}  // namespace fastprune_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fastprune_emu::last_error();
  fastprune_emu::last_error() = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated launch)";
    default: {
      static thread_local std::string s;
      s = "emulated kernel failed: " + fastprune_emu::error_message();
      return s.c_str();
    }
  }
}

// ---- built-in variables -------------------------------------------------------------------
#define threadIdx (::fastprune_emu::self().tid)
#define blockIdx (::fastprune_emu::block_idx())
#define blockDim (::fastprune_emu::block_dim())
#define gridDim (::fastprune_emu::grid_dim())

// ---- device functions ---------------------------------------------------------------------
inline void __syncthreads() { fastprune_emu::sync_block(); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  using namespace fastprune_emu;
  return from_bits<T>(warp_exchange(mask, to_bits(v), [&](int lane) {
    return (lane & ~(width - 1)) + (src & (width - 1));
  }));
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace fastprune_emu;
  return from_bits<T>(warp_exchange(mask, to_bits(v), [&](int lane) {
    const int src = lane ^ lane_mask;
    return src < ((lane & ~(width - 1)) + width) ? src : lane;
  }));
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace fastprune_emu;
  return from_bits<T>(warp_exchange(mask, to_bits(v), [&](int lane) {
    const int src = lane + static_cast<int>(delta);
    return (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane;
  }));
}

// bit casts, and a product rounded on its own (the emulated build has -ffp-contract=off)
inline unsigned __float_as_uint(float f) {
  return fastprune_emu::from_bits<unsigned>(fastprune_emu::to_bits(f));
}
inline float __uint_as_float(unsigned u) {
  return fastprune_emu::from_bits<float>(fastprune_emu::to_bits(u));
}
inline float __fmul_rn(float a, float b) { return a * b; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
