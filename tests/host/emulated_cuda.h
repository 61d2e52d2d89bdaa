// Host emulation of the CUDA the fused_xent kernels use, so the CPU-only CI runs csrc/cuda/ as it is written
// (tests/emulated_kernels.py builds them with the host compiler, -DFUSED_XENT_HOST_EMULATION, and
// tests/host/emulated/ ahead of the include path: its cuda_runtime.h, cooperative_groups.h and c10/cuda/ headers
// lead here).
// A launch runs its blocks one after another (a cluster launch its clusters, the blocks of each at once), each CUDA
// thread a fiber: __syncthreads, cluster barriers and warp shuffles are real rendezvous between them, so the kernels'
// partitioning of work, their reductions and their barriers execute as on a GPU; FUSED_XENT_EMULATED_SCHEDULE_SEED
// runs the fibers in a random order instead of thread order, so that a missing barrier shows whichever thread runs
// first. The copy engine's bulk copies land as early as a GPU could land them, or, under an odd seed, as late (see
// start_bulk_copy). Out of reach here: races within a stretch between two switches, the fast-math intrinsics' error
// and register limits.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Outside clusters, blocks run one at a time, so one static object per kernel serves as each block's shared memory
// in turn. A cluster's blocks need their own copies: FUSED_XENT_BLOCK_SHARED (csrc/cuda/xent_device.cuh).
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
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // a bad launch throws at once: nothing is pending
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxThreadsPerMultiProcessor,
  cudaDevAttrL2CacheSize,
  cudaDevAttrComputeCapabilityMajor
};

// A small sm_80-like device: few multiprocessors, so that small test problems already take the plans meant for
// few positions on a big GPU (rows and NCHW positions split across blocks and threads). FUSED_XENT_EMULATED_SMS,
// FUSED_XENT_EMULATED_THREADS_PER_SM and FUSED_XENT_EMULATED_L2_BYTES make it another device, and
// FUSED_XENT_EMULATED_CC_MAJOR=9 an sm_90 one, which the cluster kernel serves.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  const char* sms = std::getenv("FUSED_XENT_EMULATED_SMS");
  const char* threads_per_sm = std::getenv("FUSED_XENT_EMULATED_THREADS_PER_SM");
  const char* l2_bytes = std::getenv("FUSED_XENT_EMULATED_L2_BYTES");
  const char* major = std::getenv("FUSED_XENT_EMULATED_CC_MAJOR");
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = sms ? std::atoi(sms) : 2; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = threads_per_sm ? std::atoi(threads_per_sm) : 2048; break;
    case cudaDevAttrL2CacheSize: *value = l2_bytes ? std::atoi(l2_bytes) : 40 << 20; break;
    case cudaDevAttrComputeCapabilityMajor: *value = major ? std::atoi(major) : 8; break;
  }
  return cudaSuccess;
}

namespace fused_xent_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kStackGuardBytes = 64 << 10;  // at least a page on every Linux machine
// sm_90's limits: blocks per cluster (with cudaFuncAttributeNonPortableClusterSizeAllowed), shared memory per
// multiprocessor and dynamic shared memory per block (unless the kernel's attribute allows more, at most 48 KiB).
constexpr int kMaxClusterBlocks = 16;
constexpr int64_t kSharedBytesPerSm = 228 << 10;
constexpr int64_t kMaxDynamicSharedBytes = 227 << 10;
constexpr int64_t kDefaultDynamicSharedBytes = 48 << 10;

// cudaFuncAttributeMaxDynamicSharedMemorySize of each kernel that has set it.
inline std::map<const void*, int64_t>& dynamic_shared_limits() {
  static std::map<const void*, int64_t> limits;
  return limits;
}

// The CUDA threads of a block are fibers on the launching thread, switched cooperatively: only at barriers, warp
// shuffles and exit. Switching is cheap and the interleaving deterministic; a kernel's barriers are still real
// rendezvous, and one that waits for a thread that never comes is reported as a deadlock.
struct Fiber {
  // Stacks are mapped, not allocated: a launch holds one per thread of a block (or of a cluster's blocks), of
  // which only the pages touched cost anything, and glibc never fills them (the poisoned-output test runs under
  // MALLOC_PERTURB_). An inaccessible guard region below each turns a stack overflow into a fault instead of
  // another fiber's corruption.
  struct Stack {
    char* mapping = static_cast<char*>(map());
    Stack() = default;
    Stack(Stack&& other) noexcept : mapping(std::exchange(other.mapping, nullptr)) {}
    Stack& operator=(Stack&&) = delete;
    ~Stack() {
      if (mapping) munmap(mapping, kStackGuardBytes + kStackBytes);
    }
    char* base() const { return mapping + kStackGuardBytes; }
    static void* map() {
      void* region = mmap(nullptr, kStackGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (region == MAP_FAILED || mprotect(region, kStackGuardBytes, PROT_NONE) != 0) {
        throw std::runtime_error("emulated CUDA: cannot map a fiber stack");
      }
      return region;
    }
  };
  ucontext_t context{};
  Stack stack;
  bool done = false;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  ucontext_t launcher{};
  int current = 0;
  uint64_t progress = 0;  // arrivals and exits so far: waiting fibers that see it stand still are deadlocked
  std::function<void()> kernel_call;
  // Fibers are numbered across the running cluster's blocks (one block outside cluster launches), block by block.
  int block_threads = 1;
  int64_t first_block = 0;
  std::vector<std::unique_ptr<unsigned char[]>> dynamic_shared;  // each block's
  int64_t dynamic_bytes = 0;
  bool copies_land_at_wait = false;  // start_bulk_copy
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

}  // namespace fused_xent_emulation

// Variables rather than macros, so that cudaLaunchConfig_t's members of the same names stay members.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace fused_xent_emulation {

// The running fiber's rank in its cluster (0 outside cluster launches).
inline int block_rank() { return scheduler->current / scheduler->block_threads; }

inline void become(int fiber) {
  scheduler->current = fiber;
  threadIdx = {static_cast<unsigned>(fiber % scheduler->block_threads), 0, 0};
  blockIdx = {static_cast<unsigned>(scheduler->first_block + block_rank()), 0, 0};
}

inline void switch_to(int next) {
  const int previous = scheduler->current;
  become(next);
  swapcontext(&scheduler->fibers[previous].context, &scheduler->fibers[next].context);
}

// The next fiber that has not exited, after the current one (the current one if it is the only one). Under a
// schedule seed, a random lane of the current one's warp for as long as that warp gets on (arrives at barriers),
// then a random fiber anywhere in the cluster: one warp runs ahead of the rest of its block, as warps do on a GPU,
// and can reach its next write to shared memory while other warps have still to read the last one.
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
      std::fprintf(stderr, "emulated CUDA: deadlock at a barrier (block %u, thread %u)\n", blockIdx.x, threadIdx.x);
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

// A transaction barrier of the copy engine's bulk copies (csrc/cuda/xent_bulk_copy.cuh): one copy per phase.
struct CopyBarrier {
  uint64_t completed_phases = 0;
  std::function<void()> in_flight;  // the copy started in the current phase, until it lands

  void land() {
    in_flight();
    in_flight = nullptr;
    ++completed_phases;
  }
};

// What the threads of the running cluster (or block) share: each block's barrier, the cluster's, the warps' barriers
// and the warp shuffles' mailboxes, indexed by rank and fiber; and the copy barriers, by address.
struct Cluster {
  Cluster(int blocks, int threads)
      : block(blocks, Barrier(threads)), all(blocks * threads), warps(blocks * threads / kWarpSize, Barrier(kWarpSize)),
        exchange(blocks * threads) {}
  std::vector<Barrier> block;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<uint64_t> exchange;
  std::map<const void*, CopyBarrier> copy_barriers;
};
inline Cluster* cluster = nullptr;

// Lane `source(lane)`'s value of v, for every lane of the warp at once (all lanes take part, as with a full mask).
template <typename T, typename Source>
T shuffle(T v, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned t = scheduler->current, first = t - t % kWarpSize;
  if (cluster->warps[t / kWarpSize].expected != kWarpSize) {  // a GPU would read what the exited lanes left behind
    std::fprintf(stderr, "emulated CUDA: a full-mask shuffle after lanes of its warp exited (block %u, thread %u)\n",
                 blockIdx.x, threadIdx.x);
    std::abort();
  }
  std::memcpy(&cluster->exchange[t], &v, sizeof(T));
  cluster->warps[t / kWarpSize].arrive_and_wait();
  T out;
  std::memcpy(&out, &cluster->exchange[first + source(t % kWarpSize)], sizeof(T));
  cluster->warps[t / kWarpSize].arrive_and_wait();  // nobody writes the mailboxes again before all have read
  return out;
}

// Every fiber starts here: the kernel, then its exit.
inline void run_fiber() {
  scheduler->kernel_call();
  const int me = scheduler->current;
  scheduler->fibers[me].done = true;
  cluster->warps[me / kWarpSize].drop();
  cluster->block[block_rank()].drop();
  cluster->all.drop();
  const int next = next_live_fiber();
  if (next < 0) {
    setcontext(&scheduler->launcher);
  }
  become(next);
  setcontext(&scheduler->fibers[next].context);
}

// Where each FUSED_XENT_BLOCK_SHARED object's copies lie, for map_shared_rank (emulated/cooperative_groups.h).
struct SharedCopies {
  uintptr_t first;
  size_t bytes;
};
inline std::vector<SharedCopies>& shared_copies() {
  static std::vector<SharedCopies> all;
  return all;
}

// The running block's copy of a FUSED_XENT_BLOCK_SHARED object; `site`, a lambda of the declaration, gives each
// declaration (and each instantiation of the template around it) copies of its own.
template <typename T, typename Site>
T& block_shared(Site) {
  static T copies[kMaxClusterBlocks];
  static const bool known = (shared_copies().push_back({reinterpret_cast<uintptr_t>(copies), sizeof(T)}), true);
  (void)known;
  return copies[block_rank()];
}

// FUSED_XENT_CHECK_VECTOR_ALIGNMENT of csrc/cuda/xent_device.cuh: a 16-byte access must be 16-byte aligned.
inline void check_vector_alignment(const void* ptr) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
    std::fprintf(stderr, "emulated CUDA: a 16-byte access at %p, which is not 16-byte aligned (block %u, thread %u)\n",
                 ptr, blockIdx.x, threadIdx.x);
    std::abort();
  }
}

// The running block's dynamic shared memory (FUSED_XENT_DYNAMIC_SHARED), fresh for each cluster.
template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(scheduler->dynamic_shared[block_rank()].get());
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulated CUDA: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::abort();
}

// The bulk copies of csrc/cuda/xent_bulk_copy.cuh. A copy lands when it starts, the earliest a GPU could land it, so
// that refilling a buffer some thread still reads changes what that thread reads; under an odd
// FUSED_XENT_EMULATED_SCHEDULE_SEED it lands only when a thread waits for its phase, the latest, so that a read
// before the wait (or a wait on a phase already past) reads what the buffer held before.
inline void init_copy_barrier(uint64_t* barrier) { cluster->copy_barriers[barrier] = CopyBarrier{}; }

inline CopyBarrier& copy_barrier(uint64_t* barrier) {
  const auto found = cluster->copy_barriers.find(barrier);
  if (found == cluster->copy_barriers.end()) fail("a bulk copy or a wait on a barrier that was never initialised");
  return found->second;
}

inline void start_bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* barrier) {
  CopyBarrier& copy = copy_barrier(barrier);
  const auto to = reinterpret_cast<uintptr_t>(dst);
  const auto shared = reinterpret_cast<uintptr_t>(scheduler->dynamic_shared[block_rank()].get());
  if (to % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 || bytes % 16 != 0) {
    fail("a bulk copy whose addresses or size are not multiples of 16 bytes");
  }
  if (to < shared || to + bytes > shared + static_cast<uint64_t>(scheduler->dynamic_bytes)) {
    fail("a bulk copy to outside the block's dynamic shared memory");
  }
  if (copy.in_flight) fail("a second bulk copy in one phase of its barrier");
  ++scheduler->progress;
  copy.in_flight = [=] { std::memcpy(dst, src, bytes); };
  if (!scheduler->copies_land_at_wait) copy.land();
}

inline void wait_bulk_copy(uint64_t* barrier, uint32_t parity) {
  CopyBarrier& copy = copy_barrier(barrier);
  wait_while([&] {
    if ((copy.completed_phases & 1) != parity) return false;
    if (!copy.in_flight) return true;  // its copy has yet to start
    copy.land();
    ++scheduler->progress;
    return false;
  });
}

}  // namespace fused_xent_emulation

inline void __syncthreads() {
  fused_xent_emulation::cluster->block[fused_xent_emulation::block_rank()].arrive_and_wait();
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  using fused_xent_emulation::kWarpSize, fused_xent_emulation::scheduler;
  fused_xent_emulation::cluster->warps[scheduler->current / kWarpSize].arrive_and_wait();
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

namespace fused_xent_emulation {

// Runs the grid `cluster_blocks` blocks at a time: the fibers of a cluster's blocks take turns as those of a block,
// and each block gets `dynamic_bytes` of dynamic shared memory (NaN bytes, so that a read of what was never written
// shows). cluster_blocks 0 is a plain launch, whose blocks run one at a time.
template <typename... Params, typename... Args>
void run_grid(void (*kernel)(Params...), int64_t grid, int threads, int cluster_blocks, int64_t dynamic_bytes,
              Args&&... args) {
  const int blocks = std::max(cluster_blocks, 1);
  const auto limit = dynamic_shared_limits().find(reinterpret_cast<const void*>(kernel));
  const int64_t dynamic_limit = limit != dynamic_shared_limits().end() ? limit->second : kDefaultDynamicSharedBytes;
  if (grid < 1 || grid > 0x7fffffff || threads < kWarpSize || threads > 1024 || threads % kWarpSize != 0 ||
      blocks > kMaxClusterBlocks || grid % blocks != 0 || dynamic_bytes < 0 || dynamic_bytes > dynamic_limit) {
    throw std::invalid_argument("invalid launch: grid " + std::to_string(grid) + ", " + std::to_string(threads) +
                                " threads per block, clusters of " + std::to_string(blocks) + ", " +
                                std::to_string(dynamic_bytes) + " bytes of dynamic shared memory");
  }
  if (const char* log_path = std::getenv("FUSED_XENT_EMULATED_LAUNCH_LOG")) {
    if (std::FILE* log = std::fopen(log_path, "a")) {
      std::fprintf(log, "%lld %d", static_cast<long long>(grid), threads);
      if (cluster_blocks > 0) std::fprintf(log, " %d %lld", cluster_blocks, static_cast<long long>(dynamic_bytes));
      std::fputc('\n', log);
      std::fclose(log);
    }
  }
  Scheduler launch;
  if (const char* seed = std::getenv("FUSED_XENT_EMULATED_SCHEDULE_SEED")) {
    const uint64_t seed_value = std::strtoull(seed, nullptr, 10);
    launch.random_state = seed_value * 0x9E3779B97F4A7C15ull | 1;  // never 0
    launch.copies_land_at_wait = seed_value % 2 == 1;
  }
  launch.dynamic_bytes = dynamic_bytes;
  launch.fibers.resize(static_cast<size_t>(threads) * blocks);
  launch.block_threads = threads;
  launch.kernel_call = [&] { kernel(args...); };
  scheduler = &launch;
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (int64_t b = 0; b < grid; b += blocks) {
    Cluster running(blocks, threads);
    cluster = &running;
    launch.first_block = b;
    launch.dynamic_shared.clear();
    for (int k = 0; k < blocks; ++k) {
      launch.dynamic_shared.emplace_back(new unsigned char[dynamic_bytes]);
      std::memset(launch.dynamic_shared.back().get(), 0xff, dynamic_bytes);
    }
    for (Fiber& fiber : launch.fibers) {
      fiber.done = false;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.base();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, run_fiber, 0);
    }
    become(0);
    swapcontext(&launch.launcher, &launch.fibers[0].context);  // back here once every thread has exited
    for (const auto& [barrier, copy] : running.copy_barriers) {
      if (copy.in_flight) {
        std::fprintf(stderr, "emulated CUDA: a bulk copy still in flight when its cluster exited (block %lld)\n",
                     static_cast<long long>(b));
        std::abort();
      }
    }
  }
  scheduler = nullptr;
  cluster = nullptr;
}

}  // namespace fused_xent_emulation

// kernel<<<grid, threads>>>(args...), refused where a GPU would refuse it; its blocks run one after another. With
// FUSED_XENT_EMULATED_LAUNCH_LOG set, each launch appends "<grid> <threads>" to that file (a cluster launch
// "<grid> <threads> <blocks per cluster> <dynamic shared memory bytes>"), so that tests can see a plan that changes
// only the launch shape.
template <typename... Params, typename... Args>
void emulated_launch(void (*kernel)(Params...), int64_t grid, int threads, Args&&... args) {
  fused_xent_emulation::run_grid(kernel, grid, threads, 0, 0, std::forward<Args>(args)...);
}

// The runtime calls of the cluster launch (csrc/cuda/xent_rows_cluster.cu), the kernel compiled for sm_90.
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  struct {
    dim3 clusterDim;
  } val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
struct cudaFuncAttributes {
  int ptxVersion;
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize, cudaFuncAttributeNonPortableClusterSizeAllowed };

template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
  attributes->ptxVersion = 90;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > fused_xent_emulation::kMaxDynamicSharedBytes) return cudaErrorInvalidValue;
    fused_xent_emulation::dynamic_shared_limits()[reinterpret_cast<const void*>(kernel)] = value;
  }
  return cudaSuccess;
}

namespace fused_xent_emulation {
inline int cluster_blocks(const cudaLaunchConfig_t& config) {
  for (unsigned k = 0; k < config.numAttrs; ++k) {
    if (config.attrs[k].id == cudaLaunchAttributeClusterDimension) return config.attrs[k].val.clusterDim.x;
  }
  return 1;
}
}  // namespace fused_xent_emulation

// As many clusters as the emulated multiprocessors hold blocks of the configuration, by their threads and by their
// shared memory.
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, Kernel, const cudaLaunchConfig_t* config) {
  int sms = 0, threads_per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, 0);
  const int64_t by_memory = fused_xent_emulation::kSharedBytesPerSm / std::max<int64_t>(1, config->dynamicSmemBytes);
  const int64_t blocks_per_sm = std::min<int64_t>(threads_per_sm / config->blockDim.x, by_memory);
  *clusters = static_cast<int>(sms * blocks_per_sm / fused_xent_emulation::cluster_blocks(*config));
  return cudaSuccess;
}

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  fused_xent_emulation::run_grid(kernel, config->gridDim.x, config->blockDim.x,
                                 fused_xent_emulation::cluster_blocks(*config),
                                 static_cast<int64_t>(config->dynamicSmemBytes), std::forward<Args>(args)...);
  return cudaSuccess;
}
