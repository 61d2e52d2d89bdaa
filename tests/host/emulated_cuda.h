// Host emulation of the CUDA the fused_xent kernels use, so the CPU-only CI runs csrc/cuda/ as it is written
// (tests/emulated_kernels.py builds them with the host compiler, -DFUSED_XENT_HOST_EMULATION, and
// tests/host/emulated/ ahead of the include path: its cuda_runtime.h and c10/cuda/ headers lead here).
// A launch runs its blocks one after another, each CUDA thread a fiber: __syncthreads and warp shuffles are real
// rendezvous between them, so the kernels' partitioning of work, their reductions and their barriers execute as on
// a GPU; FUSED_XENT_EMULATED_SCHEDULE_SEED runs the fibers in a random order instead of thread order, so that a
// missing barrier shows whichever thread runs first. Out of reach here: races within a stretch between two switches,
// the fast-math intrinsics' error, register limits and the sm_90 cluster kernel (tests/host/emulated_ops.cpp
// declines it, as a pre-sm_90 GPU would).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static object per kernel serves as each block's shared memory in turn.
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxThreadsPerMultiProcessor,
  cudaDevAttrL2CacheSize,
  cudaDevAttrComputeCapabilityMajor
};

// A small sm_80-like device: few multiprocessors, so that small test problems already take the plans meant for
// few positions on a big GPU (rows and NCHW positions split across blocks and threads). FUSED_XENT_EMULATED_SMS,
// FUSED_XENT_EMULATED_THREADS_PER_SM and FUSED_XENT_EMULATED_L2_BYTES make it another device.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  const char* sms = std::getenv("FUSED_XENT_EMULATED_SMS");
  const char* threads_per_sm = std::getenv("FUSED_XENT_EMULATED_THREADS_PER_SM");
  const char* l2_bytes = std::getenv("FUSED_XENT_EMULATED_L2_BYTES");
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = sms ? std::atoi(sms) : 2; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = threads_per_sm ? std::atoi(threads_per_sm) : 2048; break;
    case cudaDevAttrL2CacheSize: *value = l2_bytes ? std::atoi(l2_bytes) : 40 << 20; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 8; break;
  }
  return cudaSuccess;
}

namespace fused_xent_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 << 10;

// The CUDA threads of a block are fibers on the launching thread, switched cooperatively: only at barriers, warp
// shuffles and exit. Switching is cheap and the interleaving deterministic; a kernel's barriers are still real
// rendezvous, and one that waits for a thread that never comes is reported as a deadlock.
struct Fiber {
  ucontext_t context{};
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  bool done = false;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  ucontext_t launcher{};
  int current = 0;
  uint64_t progress = 0;  // arrivals and exits so far: waiting fibers that see it stand still are deadlocked
  std::function<void()> kernel_call;
  // 0: fibers take turns in thread order. Otherwise the state of a xorshift generator that picks the next fiber at
  // every switch (FUSED_XENT_EMULATED_SCHEDULE_SEED), so that a missing barrier shows whichever thread comes first.
  uint64_t random_state = 0;
  uint64_t progress_at_pick = 0;  // progress when the last pick saw it move
  int stalled_picks = 0;          // picks since

  int random_below(int count) {
    random_state ^= random_state << 13;
    random_state ^= random_state >> 7;
    random_state ^= random_state << 17;
    return static_cast<int>(random_state % static_cast<uint64_t>(count));
  }
};

inline Scheduler* scheduler = nullptr;
inline uint3 thread_index, block_index;
inline dim3 block_dim, grid_dim;

inline void switch_to(int next) {
  const int previous = scheduler->current;
  scheduler->current = next;
  thread_index = {static_cast<unsigned>(next), 0, 0};
  swapcontext(&scheduler->fibers[previous].context, &scheduler->fibers[next].context);
}

// The next fiber that has not exited, after the current one (the current one if it is the only one). Under a
// schedule seed, a random lane of the current one's warp for as long as that warp gets on (arrives at barriers),
// then a random fiber anywhere: one warp runs ahead of the rest of its block, as warps do on a GPU, and can reach
// its next write to shared memory while other warps have still to read the last one.
inline int next_live_fiber() {
  const int count = static_cast<int>(scheduler->fibers.size());
  if (scheduler->random_state != 0) {
    if (scheduler->progress != scheduler->progress_at_pick) {
      scheduler->progress_at_pick = scheduler->progress;
      scheduler->stalled_picks = 0;
    }
    const bool stay_in_warp = ++scheduler->stalled_picks <= 2 * kWarpSize;
    if (!stay_in_warp) scheduler->stalled_picks = 0;
    const int warp_first = scheduler->current - scheduler->current % kWarpSize;
    for (int tries = 0; tries < 4 * count; ++tries) {
      const int candidate = stay_in_warp ? warp_first + scheduler->random_below(std::min(kWarpSize, count))
                                         : scheduler->random_below(count);
      if (!scheduler->fibers[candidate].done) return candidate;
    }
  }
  for (int step = 1; step <= count; ++step) {
    const int candidate = (scheduler->current + step) % count;
    if (!scheduler->fibers[candidate].done) return candidate;
  }
  return -1;
}

template <typename Condition>
void wait_while(Condition condition) {
  uint64_t seen = scheduler->progress;
  int64_t idle = 0;
  while (condition()) {
    const int next = next_live_fiber();
    if (next != scheduler->current) switch_to(next);
    if (scheduler->progress != seen) {
      seen = scheduler->progress;
      idle = 0;
    } else if (++idle > 1000 * static_cast<int64_t>(scheduler->fibers.size())) {
      std::fprintf(stderr, "emulated CUDA: deadlock at a barrier (block %u, thread %u)\n", block_index.x,
                   thread_index.x);
      std::abort();
    }
  }
}

// A barrier of `expected` threads; a thread that exits leaves it (as on the GPU, exited threads are not waited for).
struct Barrier {
  explicit Barrier(int threads) : expected(threads) {}
  void arrive_and_wait() {
    const uint64_t my_phase = phase;
    ++scheduler->progress;
    if (++arrived == expected) {
      complete();
      if (scheduler->random_state != 0) {  // the last to arrive need not be the first to go on
        const int next = next_live_fiber();
        if (next != scheduler->current) switch_to(next);
      }
      return;
    }
    wait_while([&] { return phase == my_phase; });
  }
  void drop() {
    ++scheduler->progress;
    if (--expected > 0 && arrived == expected) complete();
  }
  void complete() {
    arrived = 0;
    ++phase;
  }
  int expected, arrived = 0;
  uint64_t phase = 0;
};

// What the threads of the running block share: its barrier, its warps' barriers and the warp shuffles' mailboxes.
struct Block {
  explicit Block(int threads) : all(threads), warps(threads / kWarpSize, Barrier(kWarpSize)), exchange(threads) {}
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<uint64_t> exchange;
};
inline Block* block = nullptr;

// Lane `source(lane)`'s value of v, for every lane of the warp at once (all lanes take part, as with a full mask).
template <typename T, typename Source>
T shuffle(T v, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned t = thread_index.x, first = t - t % kWarpSize;
  if (block->warps[t / kWarpSize].expected != kWarpSize) {  // a GPU would read what the exited lanes left behind
    std::fprintf(stderr, "emulated CUDA: a full-mask shuffle after lanes of its warp exited (block %u, thread %u)\n",
                 block_index.x, t);
    std::abort();
  }
  std::memcpy(&block->exchange[t], &v, sizeof(T));
  block->warps[t / kWarpSize].arrive_and_wait();
  T out;
  std::memcpy(&out, &block->exchange[first + source(t % kWarpSize)], sizeof(T));
  block->warps[t / kWarpSize].arrive_and_wait();  // nobody writes the mailboxes again before all have read
  return out;
}

// Every fiber starts here: the kernel, then its exit.
inline void run_fiber() {
  scheduler->kernel_call();
  const int me = scheduler->current;
  scheduler->fibers[me].done = true;
  block->warps[me / kWarpSize].drop();
  block->all.drop();
  const int next = next_live_fiber();
  if (next < 0) {
    setcontext(&scheduler->launcher);
  }
  scheduler->current = next;
  thread_index = {static_cast<unsigned>(next), 0, 0};
  setcontext(&scheduler->fibers[next].context);
}

}  // namespace fused_xent_emulation

#define threadIdx fused_xent_emulation::thread_index
#define blockIdx fused_xent_emulation::block_index
#define blockDim fused_xent_emulation::block_dim
#define gridDim fused_xent_emulation::grid_dim

inline void __syncthreads() { fused_xent_emulation::block->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  fused_xent_emulation::block->warps[threadIdx.x / fused_xent_emulation::kWarpSize].arrive_and_wait();
}
template <typename T>
T __shfl_sync(unsigned, T v, int source, int = 32) {
  return fused_xent_emulation::shuffle(v, [&](unsigned) { return unsigned(source); });
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return fused_xent_emulation::shuffle(v, [&](unsigned lane) { return lane ^ unsigned(mask); });
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  return fused_xent_emulation::shuffle(v, [&](unsigned lane) { return lane + delta < 32 ? lane + delta : lane; });
}
inline float __expf(float x) { return std::exp(x); }

// kernel<<<grid, threads>>>(args...), refused where a GPU would refuse it; its blocks run one after another. With
// FUSED_XENT_EMULATED_LAUNCH_LOG set, each launch appends "<grid> <threads>" to that file, so that tests can see a
// plan that changes only the launch shape.
template <typename... Params, typename... Args>
void emulated_launch(void (*kernel)(Params...), int64_t grid, int threads, Args&&... args) {
  using namespace fused_xent_emulation;
  if (grid < 1 || grid > 0x7fffffff || threads < kWarpSize || threads > 1024 || threads % kWarpSize != 0) {
    throw std::invalid_argument("invalid launch: grid " + std::to_string(grid) + ", " + std::to_string(threads) +
                                " threads per block");
  }
  if (const char* log_path = std::getenv("FUSED_XENT_EMULATED_LAUNCH_LOG")) {
    if (std::FILE* log = std::fopen(log_path, "a")) {
      std::fprintf(log, "%lld %d\n", static_cast<long long>(grid), threads);
      std::fclose(log);
    }
  }
  Scheduler launch;
  if (const char* seed = std::getenv("FUSED_XENT_EMULATED_SCHEDULE_SEED")) {
    launch.random_state = std::strtoull(seed, nullptr, 10) * 0x9E3779B97F4A7C15ull | 1;  // never 0
  }
  launch.fibers.resize(threads);
  launch.kernel_call = [&] { kernel(args...); };
  scheduler = &launch;
  grid_dim = {static_cast<unsigned>(grid), 1, 1};
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  for (int64_t b = 0; b < grid; ++b) {
    Block running(threads);
    block = &running;
    block_index = {static_cast<unsigned>(b), 0, 0};
    for (Fiber& fiber : launch.fibers) {
      fiber.done = false;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, run_fiber, 0);
    }
    launch.current = 0;
    thread_index = {0, 0, 0};
    swapcontext(&launch.launcher, &launch.fibers[0].context);  // back here once every thread has exited
  }
  scheduler = nullptr;
  block = nullptr;
}
