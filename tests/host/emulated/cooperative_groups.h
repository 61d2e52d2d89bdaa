// What the cluster kernel (csrc/cuda/xent_rows_cluster.cu) takes of cooperative_groups, in the host emulation
// (tests/host/emulated_cuda.h): a cluster's blocks run at once, their threads fibers of one scheduler.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../emulated_cuda.h"

namespace cooperative_groups {

struct cluster_group {
  unsigned num_blocks() const {
    using fused_xent_emulation::scheduler;
    return static_cast<unsigned>(scheduler->fibers.size() / scheduler->block_threads);
  }
  unsigned block_rank() const { return static_cast<unsigned>(fused_xent_emulation::block_rank()); }
  void sync() const { fused_xent_emulation::cluster->all.arrive_and_wait(); }
  // Block `rank`'s copy of the FUSED_XENT_BLOCK_SHARED object at `address` (distributed shared memory).
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank) const {
    const auto at = reinterpret_cast<uintptr_t>(address);
    for (const auto& copies : fused_xent_emulation::shared_copies()) {
      const uintptr_t offset = at - copies.first;  // wraps around below the copies
      if (rank < num_blocks() && offset < copies.bytes * fused_xent_emulation::kMaxClusterBlocks) {
        return reinterpret_cast<T*>(copies.first + rank * copies.bytes + offset % copies.bytes);
      }
    }
    std::fprintf(stderr, "emulated CUDA: map_shared_rank(%p, %u) outside the cluster's shared memory\n",
                 static_cast<void*>(address), rank);
    std::abort();
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
