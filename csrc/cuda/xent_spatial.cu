// One thread per position, looping over its C classes with any strides. Built for NCHW (position stride 1):
// consecutive threads own consecutive positions, so every class step is a coalesced warp-wide load. Also used for
// rows with very few classes (C <= 32, e.g. channels_last segmentation), where a thread's classes are contiguous
// and neighbouring threads' rows share cache lines.
//
// One thread per position leaves little parallelism besides a thread's own loads to hide memory latency, so the
// class loops take a chunk of up to 32 classes at a time and issue all of its loads before using any (a partial
// last chunk is predicated, not looped): a segmentation position of 19 classes is one round trip to memory, 150
// are five. (Chunks of 4-8 classes with single-class tails took 5-8 dependent round trips for 19 classes: the
// H200 measured 1.9 TB/s for the float32 forward, 1.1 TB/s for bfloat16.) The next position's class index is
// fetched a position ahead for the same reason: the loads of a position wait for its target (an ignored position is
// not read).
//
// NCHW inputs with few positions and many classes (say (8, 32000, 512), vocabulary logits laid out as (N, C, T))
// would leave most of the GPU idle and each thread walking all C classes one chunk at a time, so their classes are
// cut into ranges and a thread takes one (position, range): the split statistics are merged per position by the
// combine of xent_rows_split.cu, and the gradient kernel writes one range per thread.
#include <c10/util/Exception.h>

#include <algorithm>

#include "cuda/xent_launch.h"

namespace fused_xent {
namespace cuda {
namespace {

// Classes per chunk: for the statistics, and for the gradient (whose loop also holds its store addresses and the
// position's coefficients: at 32 classes it took 117 registers on sm_90, at 16 it takes 63). Probability targets
// load a target per class as well; float64 takes two registers a value.
template <typename scalar_t, bool kProb>
constexpr int kStatsChunk = (kProb ? 16 : 32) / (sizeof(scalar_t) == 8 ? 2 : 1);
template <typename scalar_t, bool kProb>
constexpr int kGradChunk = kStatsChunk<scalar_t, kProb> / 2;

// Blocks per multiprocessor each kernel is built for (its __launch_bounds__). Left to itself, ptxas held some
// variants to 64-80 registers and spilled (sm_90, nvcc 13): the hot ones (class indices, float32 and 16-bit) fit
// these bounds without spilling; probability targets and float64 get all the registers they ask for instead.
template <typename scalar_t, bool kProb>
constexpr bool kHeavyPosition = kProb || sizeof(scalar_t) == 8;
template <typename scalar_t, bool kProb, bool kGrad = false>
constexpr int kStatsMinBlocks = kHeavyPosition<scalar_t, kProb> ? 1 : kGrad ? 2 : 3;
template <typename scalar_t, bool kProb, bool kSplit>
constexpr int kGradMinBlocks = kHeavyPosition<scalar_t, kProb> ? 1 : kSplit ? 3 : 4;

// Calls body(c, width) for classes c .. c+width-1 of [begin, end): full chunks of kChunk, then one shorter chunk.
template <int kChunk, typename Body>
__device__ __forceinline__ void for_class_chunks(int64_t begin, int64_t end, Body&& body) {
  for (int64_t c = begin; c < end; c += kChunk) body(c, static_cast<int>(std::min<int64_t>(kChunk, end - c)));
}

// Classes c .. c+width-1 of x (class stride sc) into v[0 .. width-1], every load issued before any value is used;
// v[width ..] = fill.
template <int kChunk, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(acc_t (&v)[kChunk], const scalar_t* x, int64_t sc, int64_t c, int width,
                                           acc_t fill) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) v[i] = i < width ? static_cast<acc_t>(x[(c + i) * sc]) : fill;
}

// One thread sums all the classes of its position (or range), so it takes them in blocks of kStatsBlock, each into
// fresh statistics merged into the running ones: a single float32 running sum over 32K classes drifts by ~1e-5 of
// its value, blocks of 256 keep it near float32 rounding. The merge costs two exps per block.
constexpr int64_t kStatsBlock = 256;

// Statistics of classes [begin, end) of one position: add_chunk(stats, c, width) adds classes c .. c+width-1.
template <int kChunk, typename acc_t, typename AddChunk>
__device__ __forceinline__ RowStats<acc_t> class_range_stats(int64_t begin, int64_t end, AddChunk&& add_chunk) {
  static_assert(kStatsBlock % kChunk == 0, "a statistics block is whole chunks");
  auto total = RowStats<acc_t>::empty();
  for (int64_t block = begin; block < end; block += kStatsBlock) {
    auto part = RowStats<acc_t>::empty();
    for_class_chunks<kChunk>(block, std::min(block + kStatsBlock, end),
                             [&](int64_t c, int width) { add_chunk(part, c, width); });
    total.merge(part);
  }
  return total;
}

// Adds logit chunk xs (padded with -inf, which adds exp(-inf) = 0) of classes c .. c+width-1 to part, with the
// smoothing terms of class-index targets (weight_sum_terms) when asked.
template <int kChunk, typename acc_t>
__device__ __forceinline__ void add_index_chunk(RowStats<acc_t>& part, const acc_t (&xs)[kChunk], const acc_t* weight,
                                                int64_t c, int width, bool smoothing) {
  const acc_t m = part.add_logits(xs);
  if (smoothing) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (i < width) part.add_term(class_weight(weight, c + i), xs[i], m);
    }
  }
}

// The gradient of classes [begin, end) of one position.
template <typename scalar_t, bool kProb>
__device__ __forceinline__ void write_position_grad(const XentParams<scalar_t>& p, const scalar_t* x,
                                                    const scalar_t* t, scalar_t* g,
                                                    const GradRow<acc_type<scalar_t>>& row, int64_t begin,
                                                    int64_t end) {
  using acc_t = acc_type<scalar_t>;
  constexpr int K = kGradChunk<scalar_t, kProb>;
  const int64_t sc = p.stride_c;
  if (row.kind != kTargetValid) {
    const auto fill = static_cast<scalar_t>(fill_value<acc_t>(row.kind));
    for (int64_t c = begin; c < end; ++c) g[c * sc] = fill;
    return;
  }
  const acc_t eps = p.label_smoothing;
  // g may alias x (the in-place op), so the compiler cannot move a load above an earlier store: load the whole
  // chunk first, then store it. The same thread reads x[c] before writing g[c], which keeps aliasing safe.
  for_class_chunks<K>(begin, end, [&](int64_t c, int width) {
    acc_t xs[K];
    [[maybe_unused]] acc_t ts[K];  // probability targets only
    load_chunk(xs, x, sc, c, width, acc_t(0));
    if constexpr (kProb) load_chunk(ts, t, sc, c, width, acc_t(0));
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i >= width) break;
      acc_t d;
      if constexpr (kProb) {
        d = prob_grad_at<acc_t>(row, p.weight, c + i, xs[i], ts[i], eps, p.C);
      } else {
        d = index_grad_at<acc_t>(row, p.weight, c + i, xs[i]);
      }
      g[(c + i) * sc] = static_cast<scalar_t>(d);
    }
  });
}

// The class index of position r for the thread that takes it next, read a position ahead (see the top): -1 stands
// in past the end, where nothing reads it.
template <typename scalar_t>
__device__ __forceinline__ int64_t prefetch_target(const XentParams<scalar_t>& p, int64_t r, int64_t positions) {
  return r < positions ? p.target_index[r] : -1;
}

// kGrad: the fused forward, which also writes the gradient (p.grad). A compile-time choice: the gradient's live
// values on top of the statistics' took the sm_90 kernel from 79 registers to 121, for every forward.
template <typename scalar_t, bool kProb, bool kGrad>
__global__ void __launch_bounds__(kPerPositionThreads, (kStatsMinBlocks<scalar_t, kProb, kGrad>))
    spatial_forward_kernel(const XentParams<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  constexpr int K = kStatsChunk<scalar_t, kProb>;
  const int64_t positions = p.N * p.S;
  const int64_t sc = p.stride_c;
  const acc_t eps = p.label_smoothing;
  const bool smoothing = eps != acc_t(0);
  const acc_t weight_sum = weight_sum_or_count(p);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  acc_t loss_acc = 0, weight_acc = 0;

  int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  [[maybe_unused]] int64_t y_next = kProb ? 0 : prefetch_target(p, r, positions);
  for (; r < positions; r += stride) {
    const Position pos = locate(p, r);
    const scalar_t* x = p.logits + pos.offset;
    const scalar_t* t = kProb ? p.target_prob + pos.offset : nullptr;
    IndexTarget<acc_t> target{kTargetValid, 0, acc_t(0), acc_t(1)};
    if constexpr (!kProb) {
      target = read_index_target(p, y_next, x, sc);
      y_next = prefetch_target(p, r + stride, positions);
    }

    // An ignored position is not read: its lse is that of no classes.
    auto st = RowStats<acc_t>::empty();
    if (kProb || target.kind != kTargetIgnored) {
      st = class_range_stats<K, acc_t>(0, p.C, [&](RowStats<acc_t>& part, int64_t c, int width) {
        acc_t xs[K];
        load_chunk(xs, x, sc, c, width, neg_infinity<acc_t>());
        if constexpr (kProb) {
          acc_t ts[K];
          load_chunk(ts, t, sc, c, width, acc_t(0));
          const acc_t m = part.add_logits(xs);
#pragma unroll
          for (int i = 0; i < K; ++i) {
            if (i < width) {
              part.add_term(class_weight(p.weight, c + i) * smoothed_probability<acc_t>(ts[i], eps, p.C), xs[i], m);
            }
          }
        } else {
          add_index_chunk(part, xs, p.weight, c, width, smoothing);
        }
      });
    }

    const acc_t log_sum = st.log_sum();
    const auto loss = position_loss<kProb>(target, st, log_sum, weight_sum, eps, p.C);
    record_position(p, r, st, log_sum, loss, loss_acc, weight_acc);

    if constexpr (kGrad) {
      const auto row =
          forward_grad_row<kProb>(target, st, log_sum, weight_sum, eps, p.C, upstream_scale(p, pos.n, pos.s));
      write_position_grad<scalar_t, kProb>(p, x, t, p.grad + pos.offset, row, 0, p.C);
    }
  }

  store_block_partials(p, loss_acc, weight_acc);
}

// Statistics of one class range of a position per thread (class-index targets), for the combine.
template <typename scalar_t>
__global__ void __launch_bounds__(kPerPositionThreads, (kStatsMinBlocks<scalar_t, false>))
    spatial_split_stats_kernel(const XentParams<scalar_t> p, int64_t splits, int64_t split_len,
                               RowStats<acc_type<scalar_t>>* split_stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr int K = kStatsChunk<scalar_t, false>;
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
    const auto st = class_range_stats<K, acc_t>(work.begin, end, [&](RowStats<acc_t>& part, int64_t c, int width) {
      acc_t xs[K];
      load_chunk(xs, x, sc, c, width, neg_infinity<acc_t>());
      add_index_chunk(part, xs, p.weight, c, width, smoothing);
    });
    split_stats[work.split * positions + work.position] = st;
  }
}

// One thread per position, or with kSplit per (position, class range); probability targets always come with one
// range (all C classes), since every gradient element needs the whole row's target sum. kSplit is a compile-time
// choice: the split arithmetic took the sm_90 fp32 kernel from 40 to 46 registers, 5 blocks per SM instead of 6
// (before the chunked class loops, which hold 63-64 registers either way).
template <typename scalar_t, bool kProb, bool kSplit>
__global__ void __launch_bounds__(kPerPositionThreads, (kGradMinBlocks<scalar_t, kProb, kSplit>))
    spatial_grad_kernel(const XentParams<scalar_t> p, int64_t splits, int64_t split_len) {
  using acc_t = acc_type<scalar_t>;
  const int64_t positions = p.N * p.S;
  const int64_t items = positions * splits;
  const int64_t sc = p.stride_c;
  const acc_t eps = p.label_smoothing;
  const acc_t weight_sum = weight_sum_or_count(p);

  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  // The position of work item `item`, for the target read a position ahead.
  const auto position_of = [&](int64_t item) { return kSplit ? item % positions : item; };

  int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  [[maybe_unused]] int64_t y_next = kProb || item >= items ? 0 : p.target_index[position_of(item)];
  for (; item < items; item += stride) {
    SplitItem work{item, 0, 0, p.C};
    if constexpr (kSplit) work = split_item(item, positions, split_len, p.C);
    const int64_t r = work.position;
    const Position pos = locate(p, r);
    const scalar_t* t = kProb ? p.target_prob + pos.offset : nullptr;
    const SavedLse<acc_t> saved = saved_lse(p, r);
    const acc_t scale = upstream_scale(p, pos.n, pos.s);

    GradRow<acc_t> row{};
    if constexpr (kProb) {
      constexpr int K = kStatsChunk<scalar_t, true>;
      acc_t tsum = 0;  // in blocks, each summed in class order: the forward's statistics, bit for bit
      for (int64_t block = 0; block < p.C; block += kStatsBlock) {
        acc_t part = 0;
        for_class_chunks<K>(block, std::min(block + kStatsBlock, p.C), [&](int64_t c, int width) {
          acc_t ts[K];
          load_chunk(ts, t, sc, c, width, acc_t(0));
#pragma unroll
          for (int i = 0; i < K; ++i) {
            if (i < width) part += class_weight(p.weight, c + i) * smoothed_probability<acc_t>(ts[i], eps, p.C);
          }
        });
        tsum += part;
      }
      row = prob_grad_row<acc_t>(saved.lse, scale, tsum);
    } else {
      const int64_t y = y_next;
      y_next = item + stride < items ? p.target_index[position_of(item + stride)] : 0;
      const int kind = classify_target(y, p.ignore_index, p.C);
      const acc_t weight_of_target = kind == kTargetValid ? class_weight(p.weight, y) : acc_t(0);
      row = index_grad_row<acc_t>(kind, y, weight_of_target, saved.lse, weight_sum, eps, p.C, scale);
    }
    write_position_grad<scalar_t, kProb>(p, p.logits + pos.offset, t, p.grad + pos.offset,
                                         with_lse_factor(row, saved.factor), work.begin, work.end);
  }
}

}  // namespace

template <typename scalar_t>
void launch_spatial_forward(const XentParams<scalar_t>& p, const LaunchShape& shape, cudaStream_t stream) {
  const auto kernel = p.target_prob ? (p.grad ? spatial_forward_kernel<scalar_t, true, true>
                                               : spatial_forward_kernel<scalar_t, true, false>)
                     : p.grad     ? spatial_forward_kernel<scalar_t, false, true>
                                  : spatial_forward_kernel<scalar_t, false, false>;
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
  auto kernel = p.target_prob ? spatial_grad_kernel<scalar_t, true, false>
                : split       ? spatial_grad_kernel<scalar_t, false, true>
                              : spatial_grad_kernel<scalar_t, false, false>;
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
