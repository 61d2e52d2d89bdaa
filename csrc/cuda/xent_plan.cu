// The launch plans declared in xent_plan.h, and the thresholds that choose between kernel families and bound how
// finely a position's classes are split.
#include "cuda/xent_plan.h"

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace fused_xent {
namespace cuda {
namespace {

// Up to this many classes one thread owns a position, whatever the layout (a warp would idle most of its lanes and
// pay a shuffle reduction per position); NCHW inputs always take that path (coalesced across positions).
constexpr int64_t kThreadPerPositionMaxClasses = 32;
// Up to this many classes a warp owns a position of a row layout (eight per block); above, a block does.
constexpr int64_t kWarpPerRowMaxClasses = 2048;
// A split never covers fewer classes than this: below, the per-split overhead is not worth the extra parallelism.
constexpr int64_t kMinSplitLen = 4096;
// The same for a thread's range of an NCHW position: its 16-byte statistics written and read back stay a few percent
// of the logits it reads. Ranges are whole 16-byte class chunks of the spatial loops (8 classes of 16-bit logits).
constexpr int64_t kMinSpatialSplitLen = 128;
constexpr int64_t kSpatialSplitGranularity = 8;
// At most this many ranges per position: the combine merges a position's ranges one after another (~30 ns each), so
// a 256K vocabulary over two positions would spend longer merging 2000 ranges than reading the logits.
constexpr int64_t kMaxSpatialSplits = 512;
// Grid-stride kernels get at most this many waves of resident blocks: enough to balance load even when occupancy
// is lower than assumed, few enough to keep the per-block partials short.
constexpr int64_t kMaxWaves = 8;

// Blocks for a grid-stride kernel with `blocks_needed` units of work.
int64_t grid_for(int64_t blocks_needed, int threads, const GpuCapacity& gpu) {
  return std::max<int64_t>(1, std::min(blocks_needed, gpu.resident_blocks(threads) * kMaxWaves));
}

int64_t l2_cache_bytes(const Problem& problem) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, problem.logits.device().index()));
  return bytes;
}

// The block-per-row fused forward reads a row a second time for its gradient. That read hits L2 while the rows in
// flight fit in about half of it; beyond, the cluster kernel (one read, the row kept on chip) takes the rows its
// clusters may hold (plan_rows_cluster).
bool row_rereads_miss_l2(const Problem& problem, const GpuCapacity& gpu) {
  const int64_t rows_in_flight = std::min(problem.positions(), gpu.resident_blocks(BlockGroup::kMaxThreads));
  return rows_in_flight * problem.C * problem.logits.element_size() > l2_cache_bytes(problem) / 2;
}

// Rows whose gradient a warp stores 32 at a time (xent_spatial.cu write_warp_rows_grad): class stride 1, each row
// right after the one before (offset r * C), at most 4 bytes an element. FUSED_XENT_STAGED_ROW_STORES=0 turns it
// off, so that a benchmark can time both.
bool rows_stored_by_warps(const Problem& problem) {
  const at::Tensor& x = problem.logits;
  const bool packed = problem.layout == Layout::kRows && x.stride(1) == 1 &&
                      (problem.S == 1 || x.stride(2) == problem.C) &&
                      (problem.N == 1 || x.stride(0) == problem.S * problem.C);
  return packed && x.element_size() <= 4 && plan_setting("FUSED_XENT_STAGED_ROW_STORES", 1, 1) == 1;
}

}  // namespace

RowsPlan plan_rows(const Problem& problem, const GpuCapacity& gpu) {
  const int64_t positions = problem.positions();
  RowsPlan plan{};
  if (problem.C <= kWarpPerRowMaxClasses) {
    plan.warp_per_row = true;
    plan.shape.threads = WarpGroup::kMaxThreads;
    plan.shape.grid = grid_for(ceil_div(positions, WarpGroup::kMaxThreads / 32), WarpGroup::kMaxThreads, gpu);
    plan.shape.split_len = problem.C;
    return plan;
  }
  plan.warp_per_row = false;
  plan.shape.threads = problem.C <= 8192 ? BlockGroup::kMaxThreads / 2 : BlockGroup::kMaxThreads;
  const int64_t resident = gpu.resident_blocks(plan.shape.threads);
  const int64_t wanted = !problem.prob_target && positions < 2 * resident ? ceil_div(2 * resident, positions) : 1;
  const ClassSplits split = split_classes(problem.C, wanted, kMinSplitLen, 64);
  plan.shape.splits = split.splits;
  plan.shape.split_len = split.split_len;
  plan.shape.grid = grid_for(positions * plan.shape.splits, plan.shape.threads, gpu);
  return plan;
}

template <typename scalar_t>
LaunchShape plan_cluster_forward(const Problem& problem, const XentParams<scalar_t>& params, const GpuCapacity& gpu) {
  LaunchShape none;
  none.grid = 0;
  if (problem.C <= kWarpPerRowMaxClasses) return none;
  const int device = problem.logits.device().index();
  if (plan_setting("FUSED_XENT_BULK_ROW_SLICES", 0, 1) == 1) {
    const LaunchShape bulk = plan_rows_cluster<scalar_t>(params, device, /*bulk=*/true);
    if (bulk.grid > 0) return bulk;
  }
  const bool fused = params.grad != nullptr;
  const bool rereads_miss_l2 = fused && row_rereads_miss_l2(problem, gpu);
  return rereads_miss_l2 ? plan_rows_cluster<scalar_t>(params, device, /*bulk=*/false) : none;
}

void plan_l2_resident_rows(const Problem& problem, LaunchShape& shape) {
  const int64_t percent = plan_setting("FUSED_XENT_L2_RESIDENT_ROWS_PERCENT", 0, 100);
  if (percent == 0) return;
  const int64_t rows_that_fit = l2_cache_bytes(problem) * percent / 100 / (problem.C * problem.logits.element_size());
  shape.grid = std::max<int64_t>(1, std::min(shape.grid, rows_that_fit));
  shape.streaming_second_sweep = true;
}

LaunchShape plan_per_position(int64_t positions, int threads, const GpuCapacity& gpu) {
  LaunchShape shape;
  shape.threads = threads;
  shape.grid = grid_for(ceil_div(positions, threads), threads, gpu);
  return shape;
}

bool thread_per_position(const Problem& problem) {
  return problem.layout == Layout::kSpatial || problem.C <= kThreadPerPositionMaxClasses;
}

LaunchShape plan_spatial(const Problem& problem, const GpuCapacity& gpu) {
  const int64_t positions = problem.positions();
  const int64_t resident_threads = gpu.resident_threads();
  const bool split =
      problem.layout == Layout::kSpatial && !problem.prob_target && positions > 0 && 2 * positions < resident_threads;
  const int64_t wanted = split ? std::min(ceil_div(2 * resident_threads, positions), kMaxSpatialSplits) : 1;
  const ClassSplits classes = split_classes(problem.C, wanted, kMinSpatialSplitLen, kSpatialSplitGranularity);
  LaunchShape shape = plan_per_position(positions * classes.splits, kPerPositionThreads, gpu);
  shape.splits = classes.splits;
  shape.split_len = classes.split_len;
  shape.staged_rows = rows_stored_by_warps(problem);
  return shape;
}

#define INSTANTIATE(T) \
  template LaunchShape plan_cluster_forward<T>(const Problem&, const XentParams<T>&, const GpuCapacity&);
FUSED_XENT_FOR_EACH_SCALAR(INSTANTIATE)
#undef INSTANTIATE

}  // namespace cuda
}  // namespace fused_xent
