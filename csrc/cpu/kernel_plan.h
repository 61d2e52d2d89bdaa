// Which CPU kernel family serves a problem (rows, lanes of positions in tiles, long lanes in chunks) and the tile
// sizes they share: read by the op wrappers (ops.cpp), which size the blocks of positions, and by the kernels
// (xent_kernels.h), which pick their family from the same rules.
#pragma once

#include <cstdint>

#include "common/xent_problem.h"

namespace fused_xent::cpu {

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

}  // namespace fused_xent::cpu
