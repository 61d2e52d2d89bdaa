// The plain-data interface between the CPU op wrappers (ops.cpp) and the kernels, which are compiled once per
// instruction set (kernels_<isa>.cpp). Pointers are typed by the caller's dtype (the logits' dtype, or the
// accumulation dtype for statistics), counts are elements, and nothing here depends on the instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/xent_problem.h"

namespace fused_xent::cpu {

// What one block of positions produced. Blocks have a fixed size that depends only on the problem, so summing
// their results in block order gives the same bits for any number of threads.
struct BlockResult {
  double loss_sum = 0;          // sum of the block's per-position losses
  double weight_sum = 0;        // sum of weight[target] over its non-ignored positions (class-index targets)
  int64_t first_bad_position = -1;  // first position whose class index is out of range, or -1
};

// One call of a kernel. Which kernel runs follows from the pointers:
//   forward:          grad == nullptr, lse_in == nullptr (writes lse and loss)
//   forward + grad:   grad != nullptr, lse_in == nullptr (grad for grad_loss = grad_loss_scalar)
//   backward:         grad != nullptr, lse_in != nullptr
struct KernelArgs {
  at::ScalarType dtype;  // of logits, probability targets and grad
  Layout layout;
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;  // of logits, and of probability targets and grad, which share them

  const void* logits;
  const int64_t* target_index;  // (N, S) contiguous class indices, or nullptr for probability targets
  const void* target_prob;      // probabilities with the strides of logits, or nullptr
  const void* weight;           // (C,) in the accumulation dtype, or nullptr
  double weight_sum;            // W, read by label smoothing of class indices (C otherwise: smoothing_weight_sum)
  int64_t reduction;
  int64_t ignore_index;
  double label_smoothing;

  void* loss;  // (N, S) contiguous per-position losses (reduction none), accumulation dtype; or nullptr
  void* lse;   // (N, S, 2) contiguous, accumulation dtype: each position's reference and log_sum; or nullptr
  void* grad;  // strides of logits; may be the logits themselves (in place)

  const void* lse_in;        // backward: lse as a forward wrote it
  const void* grad_loss;     // backward with reduction none: (N, S) contiguous, accumulation dtype; else nullptr
  double grad_loss_scalar;   // the upstream gradient when grad_loss is nullptr
  double total_weight;       // the mean's denominator (read only for reduction mean)

  int64_t positions_per_block;
  int64_t num_blocks;
  BlockResult* blocks;  // num_blocks results, written by the kernel
};

// Short rows (class stride 1) run the lane kernels, like the spatial layout, when a vector has more than one lane:
// a row this short would fill a fraction of a vector and pay a row's fixed costs (horizontal reductions, a scalar exp
// and log) for a few exps, while the tile copies, which transpose W x W blocks in registers, put one position per
// lane. The backward has no reduction or log to spread, so plain rows catch up with the transposes sooner. Measured
// on the AVX-512 dev VM (fp32, one thread, 2^20 logits, ms, lanes vs rows): forward 0.47 vs 1.5 at 32 classes, 0.6
// vs 0.84 at 64, even at 100-128; backward 0.58 vs 0.9 at 16, 0.6-0.8 vs 0.54 at 32. AVX2 alike (its forward lanes
// lead up to 100 classes). With one lane (the scalar build, float64) rows are never slower.
constexpr int64_t kMaxLaneRowClassesForward = 64;
constexpr int64_t kMaxLaneRowClassesBackward = 16;

// Whether positions run vector_width at a time, one per lane (xent_spatial.h), rather than one row at a time.
inline bool uses_lane_kernels(Layout layout, int64_t C, bool backward, int vector_width) {
  if (layout == Layout::kSpatial) return true;
  return vector_width > 1 && C <= (backward ? kMaxLaneRowClassesBackward : kMaxLaneRowClassesForward);
}

// Whether some direction or instruction set may run the lane kernels (whose blocks hold whole tiles).
inline bool may_use_lane_kernels(Layout layout, int64_t C) {
  static_assert(kMaxLaneRowClassesForward >= kMaxLaneRowClassesBackward);
  return layout == Layout::kSpatial || C <= kMaxLaneRowClassesForward;
}

// Positions per tile of the lane kernels (xent_spatial.h): a multiple of every vector width.
constexpr int64_t kTilePositions = 64;
// The widest vector of positions (AVX-512, float32 lanes).
constexpr int64_t kMaxVectorWidth = 16;
static_assert(kTilePositions % kMaxVectorWidth == 0);

// NCHW positions with many classes (long lanes, xent_spatial_long.h) walk them in chunks of kLaneChunkClasses, a
// vector of positions at a time, instead of holding all C classes of a tile of positions. With S of at least a tile,
// tiles read 64 positions (4 cache lines) per class row where a vector reads one, and they stay ahead while they fit
// in L2. On the 2-core dev VM (fp32, 2 threads, noisy): at S >= 64 tiles were up to 1.6x faster for C <= 4000 and
// even at C = 8000; chunks were 1.5-2.5x faster for S < 64 and 2-20x faster for C of 32000 and 128256.
constexpr int64_t kLaneChunkClasses = 256;
constexpr int64_t kMaxTileClasses = 8192;

inline bool uses_long_lanes(Layout layout, int64_t C, int64_t S) {
  return layout == Layout::kSpatial && C > kLaneChunkClasses && (S < kTilePositions || C > kMaxTileClasses);
}

// One definition per instruction set; dispatch.cpp picks the one to call.
namespace scalar {
void run_kernel(const KernelArgs& args);
}
namespace avx2 {
void run_kernel(const KernelArgs& args);
}
namespace avx512 {
void run_kernel(const KernelArgs& args);
}

// Runs the kernel of the instruction set chosen at load time (see dispatch.cpp).
void run_kernel(const KernelArgs& args);

}  // namespace fused_xent::cpu
