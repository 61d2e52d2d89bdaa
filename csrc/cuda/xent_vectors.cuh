// 16-byte vector access to a position's classes: packs, their loads and stores with cache hints, and the visit
// that spreads a position's classes over the threads of a group in whole 16-byte vectors.
#pragma once

#include "cuda/xent_device.cuh"

namespace fused_xent {
namespace cuda {

// A pack of kWidth elements (16 bytes when kWidth = kVecWidth); Pack<1, T> is a plain element.
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
// kBatch 1: write_warp_rows_grad's copy out of shared memory (xent_spatial.cu; with 4, that staged kernel spilled at
// its 64 registers). The cluster kernel's sweeps over its staged slices keep the default.
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

}  // namespace cuda
}  // namespace fused_xent
