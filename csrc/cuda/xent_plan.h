// Launch planning of the CUDA ops (xent_kernel.cu): which kernel family serves a problem, and the grid, block size
// and class splits it runs with, from the problem's shape and layout and what the GPU holds at once (GpuCapacity).
// The plans read their tuning knobs (plan_setting) at every call, so that a benchmark can time two in one process.
#pragma once

#include <cstdint>

#include "common/xent_problem.h"
#include "cuda/xent_launch.h"

namespace fused_xent {
namespace cuda {

struct RowsPlan {
  bool warp_per_row;
  LaunchShape shape;
};

// Row layout: warp per position for short rows; block per position for long ones, split across several blocks when
// there are too few positions to fill the GPU twice over (class-index targets only; probability targets would need
// the target row reduced in every split of the gradient).
RowsPlan plan_rows(const Problem& problem, const GpuCapacity& gpu);

// The cluster kernel's plan (xent_rows_cluster.cu) for the forward of class-index rows, grid 0 where neither of
// its two ways serves. With FUSED_XENT_BULK_ROW_SLICES=1, the copy engine fills the slices of every row a block
// would own, in the plain forward as in the fused one (opt-in until a GPU has timed it against the block-per-row
// kernel); otherwise, and for rows it cannot copy, the blocks load their slices themselves in the fused forward of
// the rows whose second read would miss L2.
template <typename scalar_t>
LaunchShape plan_cluster_forward(const Problem& problem, const XentParams<scalar_t>& params, const GpuCapacity& gpu);

// The L2-resident plan of the block-per-row fused forward (class indices), a tuning knob for the benchmarks that
// FUSED_XENT_L2_RESIDENT_ROWS_PERCENT (1-100; 0 or unset: off) turns on. The grid holds at most that percent of L2
// in rows (each block walks its share of them) and the gradient sweep marks its reads and stores evict-first
// (CacheHint), so that a row's second read should find it in L2: 2L of traffic instead of the 3L of rows that
// outgrow L2, at the price of fewer rows in flight. Off by default: on an H200 (2026-11-30) 100% took 8192 x 128256
// bf16 in_forward from 1.64-1.70 to 1.54-1.56 ms, but 4096 x 256000 (fewer rows in L2 than SMs) from 1.58 to 1.87,
// and the same 128256 rows half ignored from 1.11-1.17 to 1.21-1.23; the hints alone, without the cap, moved the
// three by -7% to +3%, about the default's own run-to-run spread.
void plan_l2_resident_rows(const Problem& problem, LaunchShape& shape);

// A thread per position in blocks of `threads`; past kMaxWaves waves of resident blocks, the kernels stride the grid.
LaunchShape plan_per_position(int64_t positions, int threads, const GpuCapacity& gpu);

// Whether the thread-per-position kernels (plan_spatial) serve the problem rather than the row kernels (plan_rows).
bool thread_per_position(const Problem& problem);

// Thread-per-position kernels. An NCHW input with fewer positions than half the GPU's threads (class-index targets)
// takes a thread per (position, class range) instead, twice the GPU's threads in all where C is long enough.
LaunchShape plan_spatial(const Problem& problem, const GpuCapacity& gpu);

}  // namespace cuda
}  // namespace fused_xent
