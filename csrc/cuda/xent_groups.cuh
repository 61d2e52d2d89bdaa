// The thread groups that own a position (a warp, a block) and the online-softmax statistics they reduce: every
// reduction runs a fixed tree and broadcasts one value, so results are bitwise reproducible and the same in
// every thread of the group.
#pragma once

#include "cuda/xent_device.cuh"

namespace fused_xent {
namespace cuda {

// Statistics of (part of) one position: an online softmax pair plus two plain sums.
//   max, sum: sum = sum_c exp(x[c] - max); -inf / 0 while empty.
//   dot:      sum_c a[c] (x[c] - finite_max()), with a[c] = w[c] (class indices with smoothing) or w[c] t'[c]
//             (probabilities): relative to the max, its terms are all <= 0 and the loss, log_sum * tsum - dot,
//             adds two non-negative parts (xent_math.h). Moved by tsum * (old - new) whenever the max rises.
//   tsum:     sum_c a[c].
// NaN logits never become the max (fmax passes them over) but poison `sum`, so lse is NaN, as in PyTorch.
template <typename acc_t>
struct RowStats {
  acc_t max, sum, dot, tsum;

  __device__ __forceinline__ static RowStats empty() { return {neg_infinity<acc_t>(), acc_t(0), acc_t(0), acc_t(0)}; }

  // exp(x - max) must not become exp(-inf - -inf) = NaN while every value seen is -inf.
  __device__ __forceinline__ acc_t finite_max() const { return max == neg_infinity<acc_t>() ? acc_t(0) : max; }

  // Adds a chunk of logits with a single rescale at most, so the cost stays at ~1 exp per element. Returns the
  // reference the chunk's terms of dot are to be taken against (finite_max()).
  template <int kWidth>
  __device__ __forceinline__ acc_t add_logits(const acc_t (&x)[kWidth]) {
    acc_t chunk_max = x[0];
#pragma unroll
    for (int i = 1; i < kWidth; ++i) chunk_max = max_acc(chunk_max, x[i]);
    if (chunk_max > max) {
      const acc_t previous = finite_max();
      sum *= exp_acc(max - chunk_max);  // exp(-inf) = 0 on the first chunk
      max = chunk_max;
      dot += tsum * (previous - max);
    }
    const acc_t m = finite_max();
#pragma unroll
    for (int i = 0; i < kWidth; ++i) sum += exp_acc(x[i] - m);
    return m;
  }

  // One loss term a * (x - m), m the reference add_logits returned for x's chunk.
  __device__ __forceinline__ void add_term(acc_t a, acc_t x, acc_t m) {
    dot += a * (x - m);
    tsum += a;
  }

  // Combines two disjoint parts. Written symmetrically; callers still broadcast one result so that every thread of
  // a group uses bitwise the same values.
  __device__ __forceinline__ void merge(const RowStats& o) {
    const acc_t new_max = o.max > max ? o.max : max;
    const acc_t m = new_max == neg_infinity<acc_t>() ? acc_t(0) : new_max;
    sum = sum * exp_acc(max - m) + o.sum * exp_acc(o.max - m);
    dot = (dot + tsum * (finite_max() - m)) + (o.dot + o.tsum * (o.finite_max() - m));
    max = new_max;
    tsum += o.tsum;
  }

  // log(sum): lse = max + log_sum, and lse - x[y] = target_gap(finite_max(), log_sum, x[y]) without lse's rounding.
  __device__ __forceinline__ acc_t log_sum() const { return log_acc(sum); }
};

// The statistics of another lane of the warp: lane lane_or_mask, or with xor_mode this lane's rank ^ lane_or_mask.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> shfl_stats(const RowStats<acc_t>& s, int lane_or_mask, bool xor_mode) {
  RowStats<acc_t> o;
  if (xor_mode) {
    o.max = __shfl_xor_sync(0xffffffffu, s.max, lane_or_mask);
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_or_mask);
    o.dot = __shfl_xor_sync(0xffffffffu, s.dot, lane_or_mask);
    o.tsum = __shfl_xor_sync(0xffffffffu, s.tsum, lane_or_mask);
  } else {
    o.max = __shfl_sync(0xffffffffu, s.max, lane_or_mask);
    o.sum = __shfl_sync(0xffffffffu, s.sum, lane_or_mask);
    o.dot = __shfl_sync(0xffffffffu, s.dot, lane_or_mask);
    o.tsum = __shfl_sync(0xffffffffu, s.tsum, lane_or_mask);
  }
  return o;
}

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> warp_allreduce(RowStats<acc_t> s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s.merge(shfl_stats(s, offset, true));
  return shfl_stats(s, 0, false);  // lane 0's value everywhere, whatever FMA contraction did
}

// A warp owns a position: for C up to a few thousand, many positions per block.
struct WarpGroup {
  static constexpr int kMaxThreads = 256;
  __device__ __forceinline__ static int rank() { return threadIdx.x & 31; }
  __device__ __forceinline__ static int size() { return 32; }
  __device__ __forceinline__ static int64_t index() { return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; }
  __device__ __forceinline__ static int64_t count() { return (int64_t(gridDim.x) * blockDim.x) >> 5; }
  __device__ __forceinline__ static void sync() { __syncwarp(); }
  template <typename acc_t>
  __device__ __forceinline__ static RowStats<acc_t> allreduce(RowStats<acc_t> s, RowStats<acc_t>*) {
    return warp_allreduce(s);
  }
};

// A whole block owns a position (or a segment of one): large C.
struct BlockGroup {
  static constexpr int kMaxThreads = 512;
  __device__ __forceinline__ static int rank() { return threadIdx.x; }
  __device__ __forceinline__ static int size() { return blockDim.x; }
  __device__ __forceinline__ static int64_t index() { return blockIdx.x; }
  __device__ __forceinline__ static int64_t count() { return gridDim.x; }
  __device__ __forceinline__ static void sync() { __syncthreads(); }
  // smem: 32 entries. Ends with a barrier, so it also orders every read of the row before any later write.
  template <typename acc_t>
  __device__ __forceinline__ static RowStats<acc_t> allreduce(RowStats<acc_t> s, RowStats<acc_t>* smem) {
    s = warp_allreduce(s);
    if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = s;
    __syncthreads();
    RowStats<acc_t> r = smem[0];
    const int warps = blockDim.x >> 5;
    for (int w = 1; w < warps; ++w) r.merge(smem[w]);  // same order in every thread: same bits
    __syncthreads();
    return r;
  }
};

// Sums two values over the block in a fixed order; the result is valid in thread 0. blockDim.x: multiple of 32.
template <typename acc_t>
__device__ __forceinline__ void block_sum_pair(acc_t& a, acc_t& b) {
  FUSED_XENT_BLOCK_SHARED(acc_t, smem, [2][32]);  // the cluster kernel's too
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  if ((threadIdx.x & 31) == 0) {
    smem[0][threadIdx.x >> 5] = a;
    smem[1][threadIdx.x >> 5] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = blockDim.x >> 5;
    a = smem[0][0];
    b = smem[1][0];
    for (int w = 1; w < warps; ++w) {
      a += smem[0][w];
      b += smem[1][w];
    }
  }
}

}  // namespace cuda
}  // namespace fused_xent
