// Bulk copies from global to shared memory by the copy engine (TMA, sm_90+), each announced on a transaction
// barrier (mbarrier) of its destination block: the copy engine moves the bytes while the threads work on something
// else, with none of their registers held, and the barrier's phase completes when the last byte has landed. Built
// with FUSED_XENT_HOST_EMULATION, tests/host/emulated_cuda.h carries them out on the host instead.
#pragma once

#include <cstdint>

#include "cuda/xent_device.cuh"

namespace fused_xent {
namespace cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
#endif

// One thread initialises the barrier of one copy at a time (its arrival is the copy's announcement); the block
// synchronizes before anyone waits on it.
__device__ __forceinline__ void init_copy_barrier(uint64_t* barrier) {
#ifdef FUSED_XENT_HOST_EMULATION
  ::fused_xent_emulation::init_copy_barrier(barrier);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(barrier)) : "memory");
  // The copy engine (the async proxy) completes the barrier's transactions: it must see the initialised barrier.
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// Starts copying `bytes` (a multiple of 16) from src to dst (this block's shared memory), both 16-byte aligned;
// the barrier's current phase completes once they have landed. One copy per phase.
__device__ __forceinline__ void start_bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* barrier) {
#ifdef FUSED_XENT_HOST_EMULATION
  ::fused_xent_emulation::start_bulk_copy(dst, src, bytes, barrier);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t at = shared_address(barrier);
  // The threads' reads of dst (ordered before this by a block barrier) come before the copy engine's writes.
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(at), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   shared_address(dst)),
               "l"(src), "r"(bytes), "r"(at)
               : "memory");
#endif
}

// When a wait gives up and traps: a copy of at most a few hundred KiB lands in microseconds of the kernel's running
// time, so one still open after seconds never lands (a broken plan or barrier), and a launch that fails with an error
// beats a GPU that spins until the process is killed. Both bounds must pass: the wall clock alone also runs while
// the context does not (a debugger's breakpoint, time slices of other processes, preemption), and the count of
// failed tries alone has no known duration unless each try's suspension is bounded. Left to the hardware, that
// bound is unspecified; with a hint of 10 us (sm_90 SASS: a NANOSLEEP.SYNCS of 10000 ns after the first check,
// which the phase's completion ends early) 2^20 failed tries take about 10-20 s, as the wall clock's bound does.
constexpr uint64_t kBulkCopyTimeoutNs = 10000000000ull;
constexpr uint32_t kBulkCopyMinFailedTries = 1u << 20;
constexpr uint32_t kBulkCopyTrySuspendNs = 10000;

// Waits until the barrier's phase of the given parity (0 for its first copy, then 1, 0, ...) has completed: what
// that copy brought is then visible to the calling thread.
__device__ __forceinline__ void wait_bulk_copy(uint64_t* barrier, uint32_t parity) {
#ifdef FUSED_XENT_HOST_EMULATION
  ::fused_xent_emulation::wait_bulk_copy(barrier, parity);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t at = shared_address(barrier);
  uint32_t done = 0, failed_tries = 0;
  uint64_t first_try = 0;
  while (true) {
    // try_wait itself suspends the thread, for at most the hint, before it reports a phase still open.
    asm volatile(
        "{\n .reg .pred complete;\n mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2, %3;\n"
        " selp.u32 %0, 1, 0, complete;\n}"
        : "=r"(done)
        : "r"(at), "r"(parity), "r"(kBulkCopyTrySuspendNs)
        : "memory");
    if (done) return;
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (failed_tries == 0) first_try = now;
    if (failed_tries < kBulkCopyMinFailedTries) {
      ++failed_tries;
    } else if (now - first_try > kBulkCopyTimeoutNs) {
      __trap();
    }
  }
#endif
}

}  // namespace cuda
}  // namespace fused_xent
