// One thread per position, looping over its C classes with any strides. Built for NCHW (position stride 1):
// consecutive threads own consecutive positions, so every class step is a coalesced warp-wide load. Also used for
// rows with very few classes (C <= 32, e.g. channels_last segmentation), where a thread's classes are contiguous
// and neighbouring threads' rows share cache lines. The class loops take a chunk of classes at a time (16 bytes of
// logits: 4 fp32 or 8 bf16/fp16; 4 fp64, 32 bytes), issuing all of its loads before using them, so that each
// thread keeps several loads in flight (one thread per position leaves little other parallelism to hide memory
// latency) and the online softmax rescales once per chunk at most. Occupancy, not a thread's own loads, hides most
// of the latency here: chunks of up to 32 classes, all loads issued before any use (one round trip for a 19-class
// position), took these kernels from 40-48 registers to 64-124 and measured 20-100% slower on an H200 (2026-11-30,
// benchmarks/RESULTS.md).
//
// NCHW inputs with few positions and many classes (say (8, 32000, 512), vocabulary logits laid out as (N, C, T))
// would leave most of the GPU idle and each thread walking all C classes one latency at a time, so their classes are
// cut into ranges and a thread takes one (position, range): the split statistics are merged per position by the
// combine of xent_rows_split.cu, and the gradient kernel writes one range per thread.
#include <c10/util/Exception.h>

#include <algorithm>

#include "cuda/xent_launch.h"
#include "cuda/xent_position.cuh"
#include "cuda/xent_vectors.cuh"

namespace fused_xent {
namespace cuda {
namespace {

template <typename scalar_t>
constexpr int kClassChunk = sizeof(scalar_t) >= 4 ? 4 : 8;

// Calls body(width, c, count) for classes c .. c+count-1 of [begin, end), width an integral_constant: full chunks
// of kChunk, whose count is their width (so that `i < count` folds away), then the rest in chunks of kTailChunk
// whose last one has a run-time count, its loads issued together. Taken one class at a time, the last 3 classes of
// a 19-class position were 3 round trips to memory, one after another: 7 per float32 position where a tail chunk
// makes 5, and 5 per 16-bit one where it makes 3, in kernels whose memory latency only occupancy hides (predicted to
// matter, not yet measured on a GPU). The tail takes at most 4 classes a chunk: 8 took the sm_90 16-bit gradient
// kernels from 40 registers to 44-47 (5 blocks per SM instead of 6) and spilled the 16-bit forward; float64 keeps
// single classes, whose kernels spill with a run-time count.
template <typename scalar_t>
constexpr int kTailChunk = sizeof(scalar_t) == 8 ? 1 : 4;

template <typename scalar_t, typename Body>
__device__ __forceinline__ void for_class_chunks(int64_t begin, int64_t end, Body&& body) {
  constexpr int kChunk = kClassChunk<scalar_t>;
  const auto width = std::integral_constant<int, kChunk>{};
  const auto tail_width = std::integral_constant<int, kTailChunk<scalar_t>>{};
  int64_t c = begin;
  for (; c + kChunk <= end; c += kChunk) body(width, c, width);
  for (; c < end; c += tail_width) {
    if constexpr (tail_width == 1) {
      body(tail_width, c, tail_width);
    } else {
      body(tail_width, c, static_cast<int>(std::min<int64_t>(end - c, tail_width)));
    }
  }
}

// The logits of classes c .. c+W-1 in the accumulation type, -inf past `count` (nothing to the sum or the max).
template <int W, typename scalar_t, typename Count>
__device__ __forceinline__ void load_chunk(const scalar_t* x, int64_t c, int64_t stride, Count count,
                                           acc_type<scalar_t> (&xs)[W]) {
#pragma unroll
  for (int i = 0; i < W; ++i) {
    xs[i] = i < count ? static_cast<acc_type<scalar_t>>(x[(c + i) * stride]) : neg_infinity<acc_type<scalar_t>>();
  }
}

// One thread sums all the classes of its position (or range), so it takes them in blocks of kStatsBlock, each into
// fresh statistics merged into the running ones: a single float32 running sum over 32K classes drifts by ~1e-5 of
// its value, blocks of 256 keep it near float32 rounding. The merge costs two exps per block.
constexpr int64_t kStatsBlock = 256;

// Statistics of classes [begin, end) of one position: add_chunk(stats, width, c, count) adds classes
// c .. c+count-1 (for_class_chunks).
template <typename scalar_t, typename AddChunk>
__device__ __forceinline__ RowStats<acc_type<scalar_t>> class_range_stats(int64_t begin, int64_t end,
                                                                          AddChunk&& add_chunk) {
  auto total = RowStats<acc_type<scalar_t>>::empty();
  for (int64_t block = begin; block < end; block += kStatsBlock) {
    auto part = RowStats<acc_type<scalar_t>>::empty();
    for_class_chunks<scalar_t>(block, std::min(block + kStatsBlock, end),
                               [&](auto width, int64_t c, auto count) { add_chunk(part, width, c, count); });
    total.merge(part);
  }
  return total;
}

// The gradient of classes [begin, end) of one position, written to g with class stride gs (the logits' own, or 1
// in a warp's staging buffer).
template <typename scalar_t, bool kProb>
__device__ __forceinline__ void write_position_grad(const XentParams<scalar_t>& p, const scalar_t* x,
                                                    const scalar_t* t, scalar_t* g, int64_t gs,
                                                    const GradRow<acc_type<scalar_t>>& row, int64_t begin,
                                                    int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const int64_t sc = p.stride_c;
  if (row.kind != kTargetValid) {
    const auto fill = static_cast<scalar_t>(fill_value<acc_t>(row.kind));
    for (int64_t c = begin; c < end; ++c) g[c * gs] = fill;
    return;
  }
  const acc_t eps = p.label_smoothing;
  // g may alias x (the in-place op), so the compiler cannot move a load above an earlier store: load the whole
  // chunk first, then store it. The same thread reads x[c] before writing g[c], which keeps aliasing safe.
  for_class_chunks<scalar_t>(begin, end, [&](auto width, int64_t c, auto count) {
    constexpr int W = decltype(width)::value;
    acc_t xs[W];
    [[maybe_unused]] acc_t ts[W];  // probability targets only
    load_chunk(x, c, sc, count, xs);
    if constexpr (kProb) {
#pragma unroll
      for (int i = 0; i < W; ++i) ts[i] = i < count ? static_cast<acc_t>(t[(c + i) * sc]) : acc_t(0);
    }
    if constexpr (kProb || std::is_same_v<acc_t, double>) {
      // Class by class: a chunk's gradients held at once took the float32 forward of probability targets from 40
      // registers to 48, and spilled the float64 kernels (sm_90 SASS).
#pragma unroll
      for (int i = 0; i < W && i < count; ++i) {
        acc_t d;
        if constexpr (kProb) {
          d = prob_grad_at<acc_t>(row, p.weight, c + i, xs[i], ts[i], eps, p.C);
        } else {
          d = index_grad_at<acc_t>(row, p.weight, c + i, xs[i]);
        }
        g[(c + i) * gs] = static_cast<scalar_t>(d);
      }
    } else {
      acc_t d[W];
      index_grad_pack(row, p.weight, c, xs, d, count);  // the chunk's tests once
#pragma unroll
      for (int i = 0; i < W && i < count; ++i) g[(c + i) * gs] = static_cast<scalar_t>(d[i]);
    }
  });
}

// Rows of at most 32 classes that follow one another in memory (LaunchShape::staged_rows: (N, C) inputs and dense
// channels_last), a thread per row. Written by its thread, a row's gradient is C narrow stores, and one warp-wide
// store instruction then covers 32 rows C elements apart: 19 bfloat16 classes make 19 instructions that each write
// 2 bytes into 32 of the 38 sectors that the warp's 1216 bytes span. Loads of that pattern are served by L1, which
// keeps the lines between a thread's loads; stores go on to L2 piece by piece. On the H200 (2026-11-30) the forward of
// 8x19x512x512 channels_last bfloat16 took 0.071 ms and a gradient pass about 0.38, where NCHW logits four times as
// large, whose stores are coalesced, took 0.25 for theirs. So a warp that owns 32 whole rows writes their gradient to
// shared memory first, then stores the 32 C elements as 16-byte vectors, as the block-per-row kernels do (predicted
// to pay, not yet timed). Its buffer takes the gradient's address phase, so that its reads are vectors too.
template <typename scalar_t>
constexpr int kStagedRowElements = 32 * 32 + 16 / int(sizeof(scalar_t));  // 32 rows of up to 32, and the phase

template <typename scalar_t, bool kProb>
__device__ __forceinline__ void write_warp_rows_grad(const XentParams<scalar_t>& p, const scalar_t* x,
                                                     const scalar_t* t, const GradRow<acc_type<scalar_t>>& row,
                                                     int64_t r, int64_t positions, scalar_t* warp_buffer) {
  const int lane = threadIdx.x & 31;
  const int64_t first = r - lane;  // the warp's first row: blocks and the grid stride are whole warps
  scalar_t* g = p.grad + first * p.C;
  if (first + 32 > positions) {  // a partial warp at the end: each thread stores its own row
    write_position_grad<scalar_t, kProb>(p, x, t, g + lane * p.C, 1, row, 0, p.C);
    return;
  }
  scalar_t* staged = warp_buffer + (reinterpret_cast<uintptr_t>(g) & 15) / sizeof(scalar_t);
  write_position_grad<scalar_t, kProb>(p, x, t, staged + lane * p.C, 1, row, 0, p.C);
  __syncwarp();
  // x may be g (the in-place op): every lane has used its loads of x by now, so no store below can reach one.
  visit_classes<WarpGroup, /*kBatch=*/1>(
      g, 0, 32 * p.C, /*vectorize=*/true,
      [&](auto width, int64_t c) { return load_pack<decltype(width)::value>(staged + c); },
      [&](auto width, int64_t c, const auto& values) { store_pack<decltype(width)::value>(g + c, values); });
  __syncwarp();  // the buffer holds the next rows' gradient after this
}

// Blocks per SM the staged kernels are built for: four of 256 threads, at 64 registers without spills (sm_90 SASS),
// where the unstaged ones take 40-48 registers, five or six blocks. Held to five blocks (48 registers), every staged
// kernel spilled; left to ptxas, the float32 probability-target forward took 80 registers and spilled.
template <bool kStaged>
constexpr int kStagedMinBlocks = kStaged ? 4 : 0;

// This warp's staging buffer (kStaged kernels: a dtype of at most 4 bytes, 8.1 KiB of float32 a warp).
template <typename scalar_t>
struct alignas(16) BlockRowBuffers {  // raw bytes: a __shared__ array of c10::BFloat16 would need a constructor
  unsigned char bytes[kPerPositionThreads / 32 * kStagedRowElements<scalar_t> * sizeof(scalar_t)];
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t* warp_row_buffer() {
  __shared__ BlockRowBuffers<scalar_t> buffers;
  return reinterpret_cast<scalar_t*>(buffers.bytes) + (threadIdx.x >> 5) * kStagedRowElements<scalar_t>;
}

template <typename scalar_t, bool kProb, bool kStaged>
__global__ void __launch_bounds__(kPerPositionThreads, kStagedMinBlocks<kStaged>)
    spatial_forward_kernel(const XentParams<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t positions = p.N * p.S;
  const int64_t sc = p.stride_c;
  const acc_t eps = p.label_smoothing;
  const bool smoothing = eps != acc_t(0);
  const acc_t weight_sum = weight_sum_or_count(p);
  acc_t loss_acc = 0, weight_acc = 0;

  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < positions;
       r += int64_t(gridDim.x) * blockDim.x) {
    const Position pos = locate(p, r);
    const scalar_t* x = p.logits + pos.offset;
    const scalar_t* t = kProb ? p.target_prob + pos.offset : nullptr;
    const auto target = forward_target<kProb>(p, r, x, sc);

    // An ignored position is not read: its lse is that of no classes.
    auto st = RowStats<acc_t>::empty();
    if (kProb || target.kind != kTargetIgnored) {
      st = class_range_stats<scalar_t>(0, p.C, [&](RowStats<acc_t>& part, auto width, int64_t c, auto count) {
        constexpr int W = decltype(width)::value;
        acc_t xs[W];
        load_chunk(x, c, sc, count, xs);
        const acc_t m = part.add_logits(xs);
        if constexpr (kProb) {
#pragma unroll
          for (int i = 0; i < W && i < count; ++i) {
            part.add_term(class_weight(p.weight, c + i) *
                              smoothed_probability<acc_t>(static_cast<acc_t>(t[(c + i) * sc]), eps, p.C),
                          xs[i], m);
          }
        } else if (smoothing) {
#pragma unroll
          for (int i = 0; i < W && i < count; ++i) part.add_term(class_weight(p.weight, c + i), xs[i], m);
        }
      });
    }

    const acc_t log_sum = st.log_sum();
    const auto loss = position_loss<kProb>(target, st, log_sum, weight_sum, eps, p.C);
    record_position(p, r, st, log_sum, loss, loss_acc, weight_acc);

    if (p.grad) {
      const auto row =
          forward_grad_row<kProb>(target, st, log_sum, weight_sum, eps, p.C, upstream_scale(p, pos.n, pos.s));
      if constexpr (kStaged) {
        write_warp_rows_grad<scalar_t, kProb>(p, x, t, row, r, positions, warp_row_buffer<scalar_t>());
      } else {
        write_position_grad<scalar_t, kProb>(p, x, t, p.grad + pos.offset, sc, row, 0, p.C);
      }
    }
  }

  store_block_partials(p, loss_acc, weight_acc);
}

// Statistics of one class range of a position per thread (class-index targets), for the combine.
template <typename scalar_t>
__global__ void __launch_bounds__(kPerPositionThreads)
    spatial_split_stats_kernel(const XentParams<scalar_t> p, int64_t splits, int64_t split_len,
                               RowStats<acc_type<scalar_t>>* split_stats) {
  using acc_t = acc_type<scalar_t>;
  const int64_t positions = p.N * p.S;
  const int64_t items = positions * splits;
  const int64_t sc = p.stride_c;
  const bool smoothing = p.label_smoothing != acc_t(0);

  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * blockDim.x) {
    const SplitItem work = split_item(item, positions, split_len, p.C);
    const scalar_t* x = p.logits + locate(p, work.position).offset;
    // An ignored position is not read: the combine finds the lse of no classes.
    const bool ignored = classify_target(p.target_index[work.position], p.ignore_index, p.C) == kTargetIgnored;
    const int64_t end = ignored ? work.begin : work.end;
    const auto add_chunk = [&](RowStats<acc_t>& part, auto width, int64_t c, auto count) {
      constexpr int W = decltype(width)::value;
      acc_t xs[W];
      load_chunk(x, c, sc, count, xs);
      const acc_t m = part.add_logits(xs);
      if (smoothing) {
#pragma unroll
        for (int i = 0; i < W && i < count; ++i) part.add_term(class_weight(p.weight, c + i), xs[i], m);
      }
    };
    const auto st = class_range_stats<scalar_t>(work.begin, end, add_chunk);
    split_stats[work.split * positions + work.position] = st;
  }
}

// One thread per position, or with kSplit per (position, class range); probability targets always come with one
// range (all C classes), since every gradient element needs the whole row's target sum. kSplit is a compile-time
// choice: the split arithmetic took the sm_90 fp32 kernel from 40 to 46 registers, 5 blocks per SM instead of 6.
// kStaged (never with kSplit): rows stored a warp at a time (write_warp_rows_grad).
template <typename scalar_t, bool kProb, bool kSplit, bool kStaged>
__global__ void __launch_bounds__(kPerPositionThreads, kStagedMinBlocks<kStaged>)
    spatial_grad_kernel(const XentParams<scalar_t> p, int64_t splits, int64_t split_len) {
  using acc_t = acc_type<scalar_t>;
  const int64_t positions = p.N * p.S;
  const int64_t items = positions * splits;
  const int64_t sc = p.stride_c;
  const acc_t eps = p.label_smoothing;
  const acc_t weight_sum = weight_sum_or_count(p);

  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * blockDim.x) {
    SplitItem work{item, 0, 0, p.C};
    if constexpr (kSplit) work = split_item(item, positions, split_len, p.C);
    const int64_t r = work.position;
    const Position pos = locate(p, r);
    const scalar_t* t = kProb ? p.target_prob + pos.offset : nullptr;
    const SavedLse<acc_t> saved = saved_lse(p, r);
    const acc_t scale = upstream_scale(p, pos.n, pos.s);

    GradRow<acc_t> row{};
    if constexpr (kProb) {
      acc_t tsum = 0;  // in blocks, as the forward's statistics
      for (int64_t block = 0; block < p.C; block += kStatsBlock) {
        acc_t part = 0;
        for (int64_t c = block; c < std::min(block + kStatsBlock, p.C); ++c) {
          part += class_weight(p.weight, c) * smoothed_probability<acc_t>(static_cast<acc_t>(t[c * sc]), eps, p.C);
        }
        tsum += part;
      }
      row = prob_grad_row<acc_t>(saved.lse, scale, tsum);
    } else {
      row = backward_index_grad_row(p, r, saved.lse, weight_sum, scale);
    }
    if constexpr (kStaged) {
      write_warp_rows_grad<scalar_t, kProb>(p, p.logits + pos.offset, t, with_lse_factor(row, saved.factor), r,
                                            positions, warp_row_buffer<scalar_t>());
    } else {
      write_position_grad<scalar_t, kProb>(p, p.logits + pos.offset, t, p.grad + pos.offset, sc,
                                           with_lse_factor(row, saved.factor), work.begin, work.end);
    }
  }
}

}  // namespace

// float64 rows are never staged (32 of 32 classes a warp would need 64 KiB a block): no such kernels are built.
template <typename scalar_t>
constexpr bool kStagedRowsBuilt = sizeof(scalar_t) <= 4;

template <typename scalar_t>
void launch_spatial_forward(const XentParams<scalar_t>& p, const LaunchShape& shape, cudaStream_t stream) {
  auto kernel = p.target_prob ? spatial_forward_kernel<scalar_t, true, false>
                              : spatial_forward_kernel<scalar_t, false, false>;
  if constexpr (kStagedRowsBuilt<scalar_t>) {
    if (shape.staged_rows && p.grad) {
      kernel = p.target_prob ? spatial_forward_kernel<scalar_t, true, true>
                             : spatial_forward_kernel<scalar_t, false, true>;
    }
  }
  launch_kernel(kernel, shape.grid, shape.threads, stream, p);
}

template <typename scalar_t>
void launch_spatial_split_stats(const XentParams<scalar_t>& p, const LaunchShape& shape,
                                RowStats<acc_type<scalar_t>>* split_stats, cudaStream_t stream) {
  launch_kernel(spatial_split_stats_kernel<scalar_t>, shape.grid, shape.threads, stream, p, shape.splits,
                shape.split_len, split_stats);
}

template <typename scalar_t>
void launch_spatial_grad(const XentParams<scalar_t>& p, const LaunchShape& shape, cudaStream_t stream) {
  const bool split = shape.splits > 1;
  TORCH_INTERNAL_ASSERT(!split || !p.target_prob, "split spatial gradient of probability targets");
  auto kernel = p.target_prob ? spatial_grad_kernel<scalar_t, true, false, false>
                : split       ? spatial_grad_kernel<scalar_t, false, true, false>
                              : spatial_grad_kernel<scalar_t, false, false, false>;
  if constexpr (kStagedRowsBuilt<scalar_t>) {
    if (shape.staged_rows && !split) {
      kernel = p.target_prob ? spatial_grad_kernel<scalar_t, true, false, true>
                             : spatial_grad_kernel<scalar_t, false, false, true>;
    }
  }
  launch_kernel(kernel, shape.grid, shape.threads, stream, p, shape.splits, shape.split_len);
}

#define INSTANTIATE(T)                                                                                           \
  template void launch_spatial_forward<T>(const XentParams<T>&, const LaunchShape&, cudaStream_t);                \
  template void launch_spatial_split_stats<T>(const XentParams<T>&, const LaunchShape&, RowStats<acc_type<T>>*,   \
                                              cudaStream_t);                                                     \
  template void launch_spatial_grad<T>(const XentParams<T>&, const LaunchShape&, cudaStream_t);
FUSED_XENT_FOR_EACH_SCALAR(INSTANTIATE)
#undef INSTANTIATE

}  // namespace cuda
}  // namespace fused_xent
