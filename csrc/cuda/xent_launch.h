// Host-side entry points of the CUDA kernels (one .cu per family) and the launch shapes xent_plan.cu chooses.
// Launchers only launch: the caller allocates every buffer the parameter block points to.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <utility>

#include "common/ceil_div.h"
#include "cuda/xent_groups.cuh"

// The library and dispatch key the CUDA ops register under (TORCH_LIBRARY_IMPL). The host emulation
// (tests/host/emulated_cuda.h) serves CPU tensors as a library of its own, beside the extension.
#ifdef FUSED_XENT_HOST_EMULATION
#define FUSED_XENT_CUDA_LIBRARY fused_xent_emulated
#define FUSED_XENT_CUDA_KEY CPU
#else
#define FUSED_XENT_CUDA_LIBRARY fused_xent
#define FUSED_XENT_CUDA_KEY CUDA
#endif

namespace fused_xent {
namespace cuda {

// Every plain launch goes through here: on `stream`, checked at once. Built with FUSED_XENT_HOST_EMULATION
// (tests/host/emulated_cuda.h), the same kernels run on the host, a fiber per CUDA thread, so the CPU-only CI
// executes them.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int64_t grid, int threads, cudaStream_t stream, Args&&... args) {
#ifdef FUSED_XENT_HOST_EMULATION
  emulated_launch(kernel, grid, threads, std::forward<Args>(args)...);
#else
  kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Threads per block of every kernel whose threads each take items of their own rather than share a position's
// classes: the thread-per-position kernels (spatial, the split combine, the target-weight pass), and the grid-stride
// element loops of the gradient scaling (xent_scale.cu) and of the value check (xent_checks.cu). One constant for
// their launches and their __launch_bounds__, so that a launch never asks a kernel for more threads than it was
// compiled for. Row kernels take theirs from WarpGroup / BlockGroup (xent_groups.cuh).
constexpr int kPerPositionThreads = 256;

// What the plans size grids and splits by: the multiprocessors, and the threads each can hold at once (2048 on
// sm_80 and sm_90, 1536 on sm_86 and sm_89, 1024 on sm_75). A kernel's registers may allow fewer; the plans count
// on the device's limit, and the grid-stride kernels' waves absorb the difference.
struct GpuCapacity {
  int64_t multiprocessors;
  int64_t threads_per_multiprocessor;

  int64_t resident_threads() const { return multiprocessors * threads_per_multiprocessor; }
  int64_t resident_blocks(int threads) const {
    return multiprocessors * std::max<int64_t>(1, threads_per_multiprocessor / threads);
  }
};

inline GpuCapacity gpu_capacity(int device) {
  int multiprocessors = 0, threads = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return {multiprocessors, threads};
}

// A tuning knob of the launch plans: the whole number from 0 to `most` (decimal digits only) in environment
// variable `name`, `fallback` when it is unset or empty; anything else is a ValueError that names the variable, as
// the Triton launchers raise. Read at every plan, so that a benchmark can time two plans in one process.
inline int64_t plan_setting(const char* name, int64_t fallback, int64_t most) {
  const char* setting = std::getenv(name);
  if (setting == nullptr || *setting == '\0') return fallback;
  int64_t value = 0;
  for (const char* digit = setting; *digit != '\0' && value <= most; ++digit) {
    value = *digit >= '0' && *digit <= '9' ? value * 10 + (*digit - '0') : most + 1;
  }
  TORCH_CHECK_VALUE(value <= most, "fused_xent: ", name, "=", setting, " is not a whole number from 0 to ", most);
  return value;
}

struct LaunchShape {
  int64_t grid = 1;        // thread blocks (kernels loop over their work items with a grid stride)
  int threads = 256;       // threads per block, a multiple of 32
  int64_t splits = 1;      // parts of one position's classes: blocks (rows, cluster) or threads (spatial)
  int64_t split_len = 0;   // classes per split
  // Block-per-row fused forward: the gradient sweep's loads and stores hint L2 to evict them first (CacheHint).
  bool streaming_second_sweep = false;
  // Thread-per-position kernels over rows that follow one another: a warp stores its 32 rows' gradient together.
  bool staged_rows = false;
  // Cluster kernel: 0, each block loads its slice itself; else the copy engine fills this many slice buffers per
  // block, one position after another (rows_bulk_cluster_kernel).
  int bulk_buffers = 0;
};

// Cuts C classes into at most `wanted` consecutive ranges of at least min_len classes each (one range if C is
// shorter), of a length that is a multiple of `granularity`; only the last range may be shorter, none is empty.
struct ClassSplits {
  int64_t splits, split_len;
};

inline ClassSplits split_classes(int64_t num_classes, int64_t wanted, int64_t min_len, int64_t granularity) {
  int64_t splits = num_classes / min_len < wanted ? num_classes / min_len : wanted;
  if (splits < 1) splits = 1;
  const int64_t per_split = (num_classes + splits - 1) / splits;
  const int64_t split_len = (per_split + granularity - 1) / granularity * granularity;
  return {(num_classes + split_len - 1) / split_len, split_len};
}

// Forward over rows (class stride 1): statistics, loss, lse and, when p.grad is set, the gradient in the same
// kernel while the row is in cache. One position per warp (warp_per_row) or per block.
template <typename scalar_t>
void launch_rows_forward(const XentParams<scalar_t>& p, bool warp_per_row, const LaunchShape& shape,
                         cudaStream_t stream);

// Gradient of rows from p.lse_in: backward, and the last step of a split forward. Splits only with BlockGroup.
template <typename scalar_t>
void launch_rows_grad(const XentParams<scalar_t>& p, bool warp_per_row, const LaunchShape& shape, cudaStream_t stream);

// Split forward for many classes and few positions (class-index targets): per-split statistics (a block per split
// of a row, or a thread per split of an NCHW position), then a per-position combine in split order (deterministic)
// that writes lse, loss and the reduction partials. split_stats[k * positions + r] holds split k of position r.
template <typename scalar_t>
void launch_rows_split_stats(const XentParams<scalar_t>& p, const LaunchShape& shape,
                             RowStats<acc_type<scalar_t>>* split_stats, cudaStream_t stream);
template <typename scalar_t>
void launch_spatial_split_stats(const XentParams<scalar_t>& p, const LaunchShape& shape,
                                RowStats<acc_type<scalar_t>>* split_stats, cudaStream_t stream);
template <typename scalar_t>
void launch_split_combine(const XentParams<scalar_t>& p, const LaunchShape& shape, int64_t splits,
                          const RowStats<acc_type<scalar_t>>* split_stats, cudaStream_t stream);

// Fused forward of long rows on sm_90+ (class-index targets, p.grad_in_phase): a cluster of shape.splits blocks per
// position, each keeping shape.split_len classes on chip, which the block loads itself or, with `bulk`, the copy
// engine brings (rows that start 16-byte aligned and span a multiple of 16 bytes, at least as many as the clusters
// that fit; the bulk kernel also serves the plain forward, p.grad null). plan_rows_cluster returns grid 0 where it
// cannot serve.
template <typename scalar_t>
LaunchShape plan_rows_cluster(const XentParams<scalar_t>& p, int device, bool bulk);
template <typename scalar_t>
void launch_rows_cluster(const XentParams<scalar_t>& p, const LaunchShape& shape, cudaStream_t stream);

// One thread per position, looping over the classes with any strides: NCHW inputs, and rows with C <= 32.
// The gradient takes a thread per (position, split) when shape.splits > 1 (class-index targets only).
template <typename scalar_t>
void launch_spatial_forward(const XentParams<scalar_t>& p, const LaunchShape& shape, cudaStream_t stream);
template <typename scalar_t>
void launch_spatial_grad(const XentParams<scalar_t>& p, const LaunchShape& shape, cudaStream_t stream);

// Per-block sums of weight[target] over non-ignored class-index targets (the mean's denominator), for a forward
// that needs total_weight before its main kernel.
template <typename acc_t>
void launch_target_weight(const int64_t* target, int64_t positions, int64_t ignore_index, int64_t num_classes,
                          const acc_t* weight, acc_t* partials, const LaunchShape& shape, cudaStream_t stream);

// One block that sums the partials in a fixed order. weight_partials set: writes their sum to *total_weight;
// otherwise reads *total_weight. loss set: writes the reduced loss (sum, or sum / total_weight for mean; smoothed:
// label smoothing is on, which makes a mean over zero target weight NaN).
template <typename acc_t>
void launch_finalize(const acc_t* loss_partials, const acc_t* weight_partials, int64_t count, acc_t* total_weight,
                     acc_t* loss, int64_t reduction, bool smoothed, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_xent

// Explicit instantiation for the four logits dtypes.
#define FUSED_XENT_FOR_EACH_SCALAR(MACRO) MACRO(float) MACRO(double) MACRO(c10::Half) MACRO(c10::BFloat16)
