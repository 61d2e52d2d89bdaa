// Device building blocks shared by the CUDA cross-entropy kernels: the parameter block every kernel receives,
// accumulation types, online-softmax statistics and their deterministic reductions, target classification and
// 16-byte vector access. The per-position algebra itself lives in common/xent_math.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/xent_math.h"

// Shared memory of the code a thread-block cluster runs: plain __shared__ on a GPU. The host emulation
// (tests/host/emulated_cuda.h) runs a cluster's blocks at once, so each needs a copy of its own there, where a
// __shared__ object is one static for blocks that run one at a time.
#ifdef FUSED_XENT_HOST_EMULATION
#define FUSED_XENT_BLOCK_SHARED(type, name, extents) \
  auto& name = ::fused_xent_emulation::block_shared<type extents>([] {})
#define FUSED_XENT_DYNAMIC_SHARED(type, name) type* const name = ::fused_xent_emulation::dynamic_shared<type>()
#else
#define FUSED_XENT_BLOCK_SHARED(type, name, extents) __shared__ type name extents
#define FUSED_XENT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

// A GPU faults on a 16-byte access that is not 16-byte aligned; the host emulation checks each one, since the host
// itself would not notice.
#ifdef FUSED_XENT_HOST_EMULATION
#define FUSED_XENT_CHECK_VECTOR_ALIGNMENT(ptr) ::fused_xent_emulation::check_vector_alignment(ptr)
#else
#define FUSED_XENT_CHECK_VECTOR_ALIGNMENT(ptr)
#endif

namespace fused_xent {
namespace cuda {

// float32 statistics for every dtype except float64, which keeps float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The parameter block of every kernel. Pointers a kernel does not need are null. Logits, gradient and probability
// targets share strides (make_problem / empty_like_logits guarantee it); grad may alias logits (in-place variant).
template <typename scalar_t>
struct XentParams {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* logits;
  scalar_t* grad;                // gradient output, or null (forward only)
  const int64_t* target_index;   // (N, S) contiguous, or null for probability targets
  const scalar_t* target_prob;   // same strides as logits, or null for class-index targets
  const acc_t* weight;           // (C,) contiguous, or null: every class weighs 1
  const acc_t* weight_sum;       // device scalar sum(weight), or null: C (only read with label smoothing)
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;  // logits strides in elements
  int64_t ignore_index;
  int64_t reduction;
  acc_t label_smoothing;
  bool vectorize;                // 16-byte loads: logits and prob target share their address modulo 16 bytes
  bool grad_in_phase;            // 16-byte stores: grad shares it too (a fresh gradient starts at phase 0)

  // Forward outputs.
  acc_t* lse;                    // (N, S, 2): each position's finite_max and log(sum) (saved_lse), or null
  acc_t* loss_rows;              // (N, S) per-position loss (reduction none), or null
  acc_t* loss_partials;          // one per thread block (reduction mean/sum), or null
  acc_t* weight_partials;        // one per thread block: sum of weight[target] (class-index targets), or null

  // Gradient scale: grad_loss (null = 1) over total_weight for reduction mean.
  const acc_t* total_weight;
  const acc_type<scalar_t>* grad_loss;  // in the accumulation dtype, as the CPU kernel reads it
  int64_t grad_loss_stride_n, grad_loss_stride_s;  // 0 for a 0-d grad_loss
  const acc_t* lse_in;           // lse as a forward wrote it, for the gradient-only kernels
};

// ---------------------------------------------------------------------------------------------------------------
// Math wrappers. Float exp uses the hardware approximation (ex2, ~2 ulp relative: it scales every probability
// alike). The log is taken once per position, of sum in [1, C], and its error is absolute: __logf's ~4e-7 near 1
// would be a large part of a confident position's loss lse - x[y] ~ 1e-5, so float goes through the double log,
// as PyTorch's accurate logf would (the build's --use_fast_math would turn logf itself into __logf).
__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }
__device__ __forceinline__ float log_acc(float x) { return static_cast<float>(::log(static_cast<double>(x))); }
__device__ __forceinline__ double log_acc(double x) { return ::log(x); }
// One FMNMX. It passes a NaN operand over: a NaN never becomes the max, and poisons the sum instead (RowStats).
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}
template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}
// isnan and isfinite of the device, and of the host in the emulation (tests/host/emulated_cuda.h).
template <typename acc_t>
__device__ __forceinline__ bool is_nan(acc_t v) {
#ifdef __CUDA_ARCH__
  return isnan(v);
#else
  return std::isnan(v);
#endif
}
template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Targets. Contract with the Python front end: it validates class indices before calling the op (raising a clear
// error) unless told not to, so the kernels never sync with the host to check them. A kernel that still meets an
// index outside [0, C) that is not ignore_index must neither read nor write out of bounds nor trap: it writes NaN
// for that position's loss (and its whole gradient row) and a NaN into total_weight, so a mean is NaN as well.
enum TargetKind : int { kTargetValid = 0, kTargetIgnored = 1, kTargetInvalid = 2 };

__device__ __forceinline__ int classify_target(int64_t y, int64_t ignore_index, int64_t num_classes) {
  if (y == ignore_index) return kTargetIgnored;  // ignore_index wins even when it is a valid class, like PyTorch
  return (y >= 0 && y < num_classes) ? kTargetValid : kTargetInvalid;
}

template <typename acc_t>
__device__ __forceinline__ acc_t class_weight(const acc_t* weight, int64_t c) {
  return weight ? weight[c] : acc_t(1);
}

// ---------------------------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------------------------
// Thread groups that own one position. All reductions use a fixed tree and then broadcast one value, so results
// are bitwise reproducible and identical across the group.
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

// ---------------------------------------------------------------------------------------------------------------
// 16-byte vector access. Pack<1, T> is a plain element.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

template <int kWidth, typename T>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

// The elements of a pack in the accumulation type. A bfloat16 is the upper half of its float32: from a 32-bit word
// holding two, the lower element is a shift and the upper one a mask, one instruction each, where converting them
// one at a time takes three for the upper one (it is first moved down, then shifted back up).
template <int kWidth, typename T>
__device__ __forceinline__ void to_acc(const Pack<kWidth, T>& in, acc_type<T> (&out)[kWidth]) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && kWidth % 2 == 0) {
    uint32_t words[kWidth / 2];
    memcpy(words, &in, sizeof(words));
#pragma unroll
    for (int k = 0; k < kWidth / 2; ++k) {
      const uint32_t halves[2] = {words[k] << 16, words[k] & 0xffff0000u};
      memcpy(&out[2 * k], halves, sizeof(halves));
    }
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = static_cast<acc_type<T>>(in.v[i]);
  }
}

// What a 16-byte access asks of the caches. kStreaming (ld/st.global.cs: evict first) marks a last use, so that L2
// keeps the lines still to be read again in its place: the second sweep of the fused forward's L2-resident plan
// (xent_plan.cu, FUSED_XENT_L2_RESIDENT_ROWS_PERCENT) reads each logit for the last time and writes a gradient that
// nothing rereads soon. Narrower accesses (a row's scalar head and tail) ignore it.
enum class CacheHint { kNormal, kStreaming };

template <int kWidth, typename T, CacheHint kHint = CacheHint::kNormal>
__device__ __forceinline__ Pack<kWidth, T> load_pack(const T* ptr) {
  Pack<kWidth, T> out;
  if constexpr (sizeof(Pack<kWidth, T>) == 16) {
    uint4 raw;  // one LDG.128
#ifdef __CUDA_ARCH__
    if constexpr (kHint == CacheHint::kStreaming) {
      raw = __ldcs(reinterpret_cast<const uint4*>(ptr));  // ld.global.cs, a load the compiler orders as any other
    } else {
      raw = *reinterpret_cast<const uint4*>(ptr);
    }
#else  // the host emulation (tests/host/emulated_cuda.h): no caches to hint
    FUSED_XENT_CHECK_VECTOR_ALIGNMENT(ptr);
    raw = *reinterpret_cast<const uint4*>(ptr);
#endif
    memcpy(&out, &raw, 16);
  } else {
    out = *reinterpret_cast<const Pack<kWidth, T>*>(ptr);
  }
  return out;
}

template <int kWidth, typename T, CacheHint kHint = CacheHint::kNormal>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<kWidth, T>& in) {
  if constexpr (sizeof(Pack<kWidth, T>) == 16) {
    // Spelled out: in the block-per-row kernels nvcc 13 splits a plain uint4 store into four 32-bit STGs (seen in
    // their sm_90 SASS), a quarter of each 16-byte sector per request. "memory" keeps the store after the reads of
    // the same addresses that precede it (the in-place op writes over the logits it has just read).
    uint4 raw;
    memcpy(&raw, &in, 16);
#ifdef __CUDA_ARCH__
    if constexpr (kHint == CacheHint::kStreaming) {
      asm volatile("st.global.cs.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(raw.x), "r"(raw.y), "r"(raw.z),
                   "r"(raw.w)
                   : "memory");
    } else {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(raw.x), "r"(raw.y), "r"(raw.z),
                   "r"(raw.w)
                   : "memory");
    }
#else  // the host emulation (tests/host/emulated_cuda.h)
    FUSED_XENT_CHECK_VECTOR_ALIGNMENT(ptr);
    memcpy(ptr, &raw, 16);
#endif
  } else {
    *reinterpret_cast<Pack<kWidth, T>*>(ptr) = in;
  }
}

// A 16-byte store to an on-chip buffer: one STS.128 (assigning the Pack itself compiles to four 32-bit stores).
template <int kWidth, typename T>
__device__ __forceinline__ void stash_pack(T* ptr, const Pack<kWidth, T>& in) {
  if constexpr (sizeof(Pack<kWidth, T>) == 16) {
    uint4 raw;
    memcpy(&raw, &in, 16);
    FUSED_XENT_CHECK_VECTOR_ALIGNMENT(ptr);
    *reinterpret_cast<uint4*>(ptr) = raw;
  } else {
    *reinterpret_cast<Pack<kWidth, T>*>(ptr) = in;
  }
}

// Items i = rank, rank + size, ... < items of width W starting at class `first`: load(width, c) fetches classes
// c .. c+W-1 and use(width, c, data) consumes them. A thread issues the loads of kLoadBatch items before the first
// use: a plain loop would keep one load in flight per thread (the bound check of an unrolled loop, and the stores
// that may alias the next load in place, pin every load behind the previous use), too few to cover HBM latency.
// A thread only ever reads and writes its own items, so a use may overwrite what its own load read. Host-callable
// like visit_classes, so that tests/host/visit_classes.cu can check the class coverage on a machine without a GPU.
// kBatch 1 for loads from shared memory, whose latency needs no batch (with 4, a staged row kernel of
// xent_spatial.cu spilled at its 64 registers).
constexpr int kLoadBatch = 4;

template <int W, int kBatch = kLoadBatch, typename Load, typename Use>
XENT_HOST_DEVICE void visit_items(int64_t first, int64_t items, int rank, int size, Load& load, Use& use) {
  const auto width = std::integral_constant<int, W>{};
  const int64_t stride = size;
  int64_t i = rank;
  for (; i + (kBatch - 1) * stride < items; i += kBatch * stride) {
    decltype(load(width, first)) data[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) data[b] = load(width, first + (i + b * stride) * W);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) use(width, first + (i + b * stride) * W, data[b]);
  }
  for (; i < items; i += stride) {
    const int64_t c = first + i * W;
    use(width, c, load(width, c));
  }
}

// Visits classes [begin, end) of a position whose classes are contiguous, spread over the threads of Group, with
// load/use as in visit_items. With `vectorize`, a scalar head runs up to the first 16-byte boundary of
// `anchor + begin`, then full 16-byte vectors, then a scalar tail; this works for any row stride (odd C,
// channels_last), because every pointer load and use touch has the same address modulo 16. A thread's classes
// depend only on (anchor's phase, begin, end, Group), so two visits of the same range give it the same classes.
template <typename Group, int kBatch = kLoadBatch, typename scalar_t, typename Load, typename Use>
XENT_HOST_DEVICE void visit_classes(const scalar_t* anchor, int64_t begin, int64_t end, bool vectorize, Load&& load,
                                    Use&& use) {
  constexpr int V = kVecWidth<scalar_t>;
  const int rank = Group::rank();
  const int size = Group::size();
  if (!vectorize) {
    visit_items<1, kBatch>(begin, end - begin, rank, size, load, use);
    return;
  }
  const auto misalign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(anchor + begin) & 15) / sizeof(scalar_t));
  int64_t head_end = begin + ((V - misalign) & (V - 1));
  if (head_end > end) head_end = end;
  const int64_t vectors = (end - head_end) / V;
  const int64_t tail = head_end + vectors * V;
  const auto one = std::integral_constant<int, 1>{};
  // Head and tail hold fewer than V classes each: at most one per thread.
  if (begin + rank < head_end) use(one, begin + rank, load(one, begin + rank));
  visit_items<V, kBatch>(head_end, vectors, rank, size, load, use);
  if (tail + rank < end) use(one, tail + rank, load(one, tail + rank));
}

// What a visit loads for classes c .. c+W-1: the logits, and the target probabilities when kWithTarget.
template <int W, typename T>
struct ClassData {
  Pack<W, T> x, t;
};

template <bool kWithTarget, int W, typename T, CacheHint kHint = CacheHint::kNormal>
__device__ __forceinline__ ClassData<W, T> load_class_data(const T* x, const T* t, int64_t c) {
  ClassData<W, T> d;
  d.x = load_pack<W, T, kHint>(x + c);
  if constexpr (kWithTarget) d.t = load_pack<W, T, kHint>(t + c);
  return d;
}

// ---------------------------------------------------------------------------------------------------------------
// Per-position helpers shared by the row, split-row and spatial kernels.

// Position r = n * S + s: its indices and the offset of its class 0 in the logits (and gradient, prob target).
struct Position {
  int64_t n, s, offset;
};

template <typename scalar_t>
__device__ __forceinline__ Position locate(const XentParams<scalar_t>& p, int64_t r) {
  const int64_t n = r / p.S;
  const int64_t s = r - n * p.S;
  return {n, s, n * p.stride_n + s * p.stride_s};
}

// Work item `item` of a kernel that cuts every position's classes into ranges of split_len (the last may be
// shorter): item = split * positions + position, so that consecutive threads take consecutive positions of one
// range (coalesced along a unit position stride). Host-callable for tests/host/visit_classes.cu.
struct SplitItem {
  int64_t position, split, begin, end;  // classes [begin, end) of position: its range number `split`
};

XENT_HOST_DEVICE SplitItem split_item(int64_t item, int64_t positions, int64_t split_len, int64_t num_classes) {
  const int64_t split = item / positions;
  const int64_t begin = split * split_len;
  return {item - split * positions, split, begin, begin + split_len < num_classes ? begin + split_len : num_classes};
}

// The same cut, numbered the other way for kernels that give a block one (position, range): item = position * splits
// + split, so that the blocks of one wave take the ranges of a few rows rather than one range of many rows.
XENT_HOST_DEVICE SplitItem row_split_item(int64_t item, int64_t splits, int64_t split_len, int64_t num_classes) {
  const int64_t position = item / splits;
  const int64_t split = item - position * splits;
  const int64_t begin = split * split_len;
  return {position, split, begin, begin + split_len < num_classes ? begin + split_len : num_classes};
}

// A position's class index as the forward needs it. For a valid one, the target's logit (read before any gradient
// written in the same pass may overwrite it) and weight; otherwise logit 0 and weight 1, which the loss ignores.
template <typename acc_t>
struct IndexTarget {
  int kind;
  int64_t y;
  acc_t logit, weight;
};

template <typename scalar_t>
__device__ __forceinline__ IndexTarget<acc_type<scalar_t>> read_index_target(const XentParams<scalar_t>& p, int64_t y,
                                                                             const scalar_t* x, int64_t class_stride) {
  using acc_t = acc_type<scalar_t>;
  IndexTarget<acc_t> target{kTargetValid, y, acc_t(0), acc_t(1)};
  target.kind = classify_target(target.y, p.ignore_index, p.C);
  if (target.kind == kTargetValid) {
    target.logit = static_cast<acc_t>(x[target.y * class_stride]);
    target.weight = class_weight(p.weight, target.y);
  }
  return target;
}

// Position r's target as a forward reads it: its class index (read_index_target), or for a probability target a
// valid one of logit 0 and weight 1, which its loss does not read (the probabilities carry the weights).
template <bool kProb, typename scalar_t>
__device__ __forceinline__ IndexTarget<acc_type<scalar_t>> forward_target(const XentParams<scalar_t>& p, int64_t r,
                                                                          const scalar_t* x, int64_t class_stride) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (kProb) {
    return {kTargetValid, 0, acc_t(0), acc_t(1)};
  } else {
    return read_index_target(p, p.target_index[r], x, class_stride);
  }
}

// The loss of a position and what it adds to total_weight (1 per probability-target position).
template <typename acc_t>
struct PositionLoss {
  acc_t loss, counted_weight;
};

// The outputs of one position, by the thread that holds its result: lse (from its statistics, with
// log_sum = st.log_sum()) and per-position loss where wanted, and its share of this thread's running loss and
// target-weight sums (for store_block_partials).
template <typename scalar_t>
__device__ __forceinline__ void record_position(const XentParams<scalar_t>& p, int64_t r,
                                                const RowStats<acc_type<scalar_t>>& st, acc_type<scalar_t> log_sum,
                                                const PositionLoss<acc_type<scalar_t>>& position,
                                                acc_type<scalar_t>& loss_acc, acc_type<scalar_t>& weight_acc) {
  if (p.lse) {
    p.lse[2 * r] = st.finite_max();
    p.lse[2 * r + 1] = log_sum;
  }
  if (p.loss_rows) p.loss_rows[r] = position.loss;
  loss_acc += position.loss;
  weight_acc += position.counted_weight;
}

// This block's loss and target-weight sums into the per-block partials that finalize_kernel adds up in a fixed
// order (reductions mean and sum); nothing to do for reduction none. Called by every thread of the block.
template <typename scalar_t>
__device__ __forceinline__ void store_block_partials(const XentParams<scalar_t>& p, acc_type<scalar_t> loss_acc,
                                                     acc_type<scalar_t> weight_acc) {
  if (!p.loss_partials && !p.weight_partials) return;
  block_sum_pair(loss_acc, weight_acc);
  if (threadIdx.x == 0) {
    if (p.loss_partials) p.loss_partials[blockIdx.x] = loss_acc;
    if (p.weight_partials) p.weight_partials[blockIdx.x] = weight_acc;
  }
}

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> upstream_scale(const XentParams<scalar_t>& p, int64_t n, int64_t s) {
  using acc_t = acc_type<scalar_t>;
  const acc_t g = p.grad_loss ? static_cast<acc_t>(p.grad_loss[n * p.grad_loss_stride_n + s * p.grad_loss_stride_s])
                              : acc_t(1);
  return grad_scale<acc_t>(p.reduction, g, p.reduction == kReductionMean ? *p.total_weight : acc_t(1));
}

template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> weight_sum_or_count(const XentParams<scalar_t>& p) {
  using acc_t = acc_type<scalar_t>;
  return p.weight_sum ? *p.weight_sum : acc_t(p.C);
}

// From the position's statistics, with log_sum = st.log_sum(), which is lse - finite_max(), the reference st.dot
// is relative to; `target` is only read for class indices.
template <bool kProb, typename acc_t>
__device__ __forceinline__ PositionLoss<acc_t> position_loss(const IndexTarget<acc_t>& target,
                                                             const RowStats<acc_t>& st, acc_t log_sum,
                                                             acc_t weight_sum, acc_t eps, int64_t num_classes) {
  if constexpr (kProb) {
    return {prob_target_loss<acc_t>(log_sum, st.tsum, st.dot), acc_t(1)};
  } else {
    if (target.kind == kTargetIgnored) return {acc_t(0), acc_t(0)};
    if (target.kind == kTargetInvalid) return {quiet_nan<acc_t>(), quiet_nan<acc_t>()};
    const auto k = index_target_coeffs<acc_t>(target.weight, eps, num_classes);
    const acc_t loss = index_target_loss<acc_t>(k, log_sum, target_gap<acc_t>(st.finite_max(), log_sum, target.logit),
                                                weight_sum, st.dot);
    return {loss, target.weight};
  }
}

// lse as the gradient takes it: p[c] = exp((x[c] - reference) - log_sum) times a factor folded into the row's
// coefficients of p (with_lse_factor), so that p keeps float precision at logits of 1e4, where lse itself is rounded
// by ~1e-3 (see target_gap). log_sum is 0 at compile time wherever it can be, one subtraction per class instead of
// two (at run time, it took the sm_90 gradient sweep of 16-bit rows from 64 registers to 94, one block of 512
// threads per SM instead of two): a backward takes the saved lse's hi and the factor exp(-lo) (saved_lse), a forward
// accumulating in float32 its max and exp(-log_sum) (forward_grad_row).
template <typename acc_t>
struct LseParts {
  acc_t reference, log_sum;
};

template <typename acc_t>
struct SavedLse {
  LseParts<acc_t> lse;
  acc_t factor;
};

template <typename scalar_t>
__device__ __forceinline__ SavedLse<acc_type<scalar_t>> saved_lse(const XentParams<scalar_t>& p, int64_t r) {
  using acc_t = acc_type<scalar_t>;
  const SplitLse<acc_t> split = split_lse<acc_t>(p.lse_in[2 * r], p.lse_in[2 * r + 1]);
  return {{split.hi, acc_t(0)}, exp_acc(-split.lo)};
}

// Everything the gradient of one position needs besides x[c] (and t[c]).
template <typename acc_t>
struct GradRow {
  int kind;           // TargetKind; probability targets are always valid
  int64_t target;     // class index
  LseParts<acc_t> lse;
  IndexGradCoeffs<acc_t> index;  // class-index targets
  acc_t scale, tsum;             // probability targets
};

template <typename acc_t>
__device__ __forceinline__ GradRow<acc_t> index_grad_row(int kind, int64_t y, acc_t weight_of_target,
                                                         LseParts<acc_t> lse, acc_t weight_sum, acc_t eps,
                                                         int64_t num_classes, acc_t scale) {
  GradRow<acc_t> g{};
  g.kind = kind;
  g.target = y;
  g.lse = lse;
  if (kind == kTargetValid) {
    g.index = index_grad_coeffs<acc_t>(index_target_coeffs<acc_t>(weight_of_target, eps, num_classes), weight_sum,
                                       scale);
  }
  return g;
}

// The GradRow of class-index position r in a backward, from the lse it saved (whose factor the caller folds in).
template <typename scalar_t>
__device__ __forceinline__ GradRow<acc_type<scalar_t>> backward_index_grad_row(const XentParams<scalar_t>& p,
                                                                                int64_t r,
                                                                                LseParts<acc_type<scalar_t>> lse,
                                                                                acc_type<scalar_t> weight_sum,
                                                                                acc_type<scalar_t> scale) {
  using acc_t = acc_type<scalar_t>;
  const int64_t y = p.target_index[r];
  const int kind = classify_target(y, p.ignore_index, p.C);
  const acc_t weight_of_target = kind == kTargetValid ? class_weight(p.weight, y) : acc_t(0);
  return index_grad_row<acc_t>(kind, y, weight_of_target, lse, weight_sum, p.label_smoothing, p.C, scale);
}

// The GradRow of a probability-target position (always valid): tsum = T = sum_c w[c] t'[c].
template <typename acc_t>
__device__ __forceinline__ GradRow<acc_t> prob_grad_row(LseParts<acc_t> lse, acc_t scale, acc_t tsum) {
  GradRow<acc_t> g{};
  g.kind = kTargetValid;
  g.lse = lse;
  g.scale = scale;
  g.tsum = tsum;
  return g;
}

// g with every coefficient of p multiplied by factor (see LseParts): prob_coef of class indices, T of probabilities
// (the other one is 0).
template <typename acc_t>
__device__ __forceinline__ GradRow<acc_t> with_lse_factor(GradRow<acc_t> g, acc_t factor) {
  g.index.prob_coef *= factor;
  g.tsum *= factor;
  return g;
}

// The GradRow of a fused forward, from the statistics it just computed (log_sum = st.log_sum()).
template <bool kProb, typename acc_t>
__device__ __forceinline__ GradRow<acc_t> forward_grad_row(const IndexTarget<acc_t>& target,
                                                           const RowStats<acc_t>& st, acc_t log_sum,
                                                           acc_t weight_sum, acc_t eps, int64_t num_classes,
                                                           acc_t scale) {
  // float64 keeps log_sum apart: the float64 thread-per-position forward spills with it folded (sm_90 SASS). The
  // factor of an ignored position (no classes: log_sum = -inf) is inf; its coefficients are never read, the sweeps
  // write a fill for any row that is not valid.
  constexpr bool kFloat64 = std::is_same_v<acc_t, double>;
  const LseParts<acc_t> lse{st.finite_max(), kFloat64 ? log_sum : acc_t(0)};
  const acc_t factor = kFloat64 ? acc_t(1) : exp_acc(-log_sum);
  if constexpr (kProb) {
    return with_lse_factor(prob_grad_row<acc_t>(lse, scale, st.tsum), factor);
  } else {
    return with_lse_factor(
        index_grad_row<acc_t>(target.kind, target.y, target.weight, lse, weight_sum, eps, num_classes, scale),
        factor);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t probability(const GradRow<acc_t>& g, acc_t x) {
  return exp_acc((x - g.lse.reference) - g.lse.log_sum);
}

// dloss/dx of classes c .. c+W-1 of a class-index position (valid target). Its two tests are taken once for the
// pack instead of once per class: smoothing (a branch the whole row takes alike) and whether the pack holds the
// target (one 64-bit subtraction; the rare pack that does compares small offsets). Per class that leaves the
// conversion, the exponential and two multiplications: in the sm_90 SASS of the block-row gradient sweep, the path
// without smoothing went from about 15 instructions per bfloat16 class (two branches and a 64-bit compare each) to
// about 8, with to_acc.
// Classes from `count` on (a run-time count < W: the spatial kernels' last chunk) are not classes of the position:
// their weights are not read, and their d, computed anyway, is not to be stored.
template <typename acc_t, int W, typename Count = std::integral_constant<int, W>>
__device__ __forceinline__ void index_grad_pack(const GradRow<acc_t>& g, const acc_t* weight, int64_t c,
                                                const acc_t (&x)[W], acc_t (&d)[W], Count count = {}) {
#pragma unroll
  for (int i = 0; i < W; ++i) d[i] = g.index.prob_coef * probability(g, x[i]);
  if (g.index.class_coef != acc_t(0)) {
#pragma unroll
    for (int i = 0; i < W && i < count; ++i) d[i] -= g.index.class_coef * class_weight(weight, c + i);
  }
  const int64_t target_offset = g.target - c;
  if (static_cast<uint64_t>(target_offset) < static_cast<uint64_t>(W)) {
    // Every class subtracts, 0 but at the target: written as `if (i == offset) d[i] -= ...`, the compiler turns the
    // loop into one store at a computed index, which puts d in local memory.
#pragma unroll
    for (int i = 0; i < W; ++i) d[i] -= i == static_cast<int>(target_offset) ? g.index.target_coef : acc_t(0);
  }
}

// dloss/dx[c] of a class-index position (valid target): index_grad_pack of one class.
template <typename acc_t>
__device__ __forceinline__ acc_t index_grad_at(const GradRow<acc_t>& g, const acc_t* weight, int64_t c, acc_t x) {
  const acc_t xs[1] = {x};
  acc_t d[1];
  index_grad_pack(g, weight, c, xs, d);
  return d[0];
}

// dloss/dx[c] of a probability-target position.
template <typename acc_t>
__device__ __forceinline__ acc_t prob_grad_at(const GradRow<acc_t>& g, const acc_t* weight, int64_t c, acc_t x,
                                              acc_t t, acc_t eps, int64_t num_classes) {
  const acc_t wt = class_weight(weight, c) * smoothed_probability<acc_t>(t, eps, num_classes);
  return prob_target_grad<acc_t>(g.scale, g.tsum, probability(g, x), wt);
}

// What a position that is not valid contributes wherever it counts (each element of its gradient row, its weight in
// the mean's denominator): 0 when ignored, NaN for a class index out of range.
template <typename acc_t>
__device__ __forceinline__ acc_t fill_value(int kind) {
  return kind == kTargetInvalid ? quiet_nan<acc_t>() : acc_t(0);
}

}  // namespace cuda
}  // namespace fused_xent
