// The CPU kernels, written once over a vector type V (the instruction set's FloatVec for float32, float16 and
// bfloat16 logits, computing in float32; ScalarVec<double> for float64) and the storage type T of the logits.
//
// Two layouts (see common/xent_problem.h):
//  - rows (class stride 1: (N, C) and channels_last): one position at a time. Its C logits are read in chunks of
//    kRowChunk classes: the chunk's max (read from memory), then its exps relative to the running max (re-read from
//    L1); the running sum is rescaled when the max grows, so rows of any length are read from memory once.
//  - spatial (position stride 1: NCHW): V::kWidth consecutive positions at a time, one per lane, looping over the
//    classes: no transpose, and every exp fills a whole vector. Short rows (uses_lane_kernels in kernel_plan.h) run
//    these lane kernels too, on tiles transposed in registers as they are copied in and out. Positions with many
//    classes (see uses_long_lanes) take them in chunks with an online softmax, like rows (xent_spatial_long.h).
// Forward + grad keeps each exp (in the accumulation dtype, in a per-thread buffer) and writes the gradient from it
// while the row or lane block is still in cache: one exp per logit, one read of the logits, one write of the
// gradient, which may be the logits themselves (everything read from a row is read before its gradient is written).
// Backward recomputes p = exp(x - lse) from the saved reference and log_sum (common/xent_math.h, split_lse): one
// read, one write. The two layouts live in xent_rows.h and xent_spatial.h; this file holds what they share and the
// multi-threaded driver.
//
// Included by kernels_<isa>.cpp inside namespace fused_xent::cpu::<isa>, after that instruction set's FloatVec and
// ScalarVec. The shared per-position algebra (common/xent_math.h) is compiled for the instruction set there too, so
// it is only ever instantiated with these namespaced types (ScalarVec stands for a plain number in row code).

// The kernel arguments with their types restored, and the constants of the problem.
template <class V, class T>
struct TypedArgs {
  using acc_t = typename V::value_type;
  using Scalar = ScalarVec<acc_t>;

  const T* logits;
  const T* target_prob;
  const int64_t* target_index;
  T* grad;
  const acc_t* weight;
  acc_t* loss;
  acc_t* lse;  // forward: (N, S, 2), each position's reference and log_sum
  const acc_t* lse_in;
  const acc_t* grad_loss;
  int64_t C, S, stride_n, stride_c, stride_s;
  int64_t reduction, ignore_index;
  bool smoothing;
  acc_t label_smoothing, weight_sum, total_weight;
  acc_t uniform_scale;  // the upstream gradient scale of every position when there is no per-position grad_loss

  explicit TypedArgs(const KernelArgs& args)
      : logits(static_cast<const T*>(args.logits)),
        target_prob(static_cast<const T*>(args.target_prob)),
        target_index(args.target_index),
        grad(static_cast<T*>(args.grad)),
        weight(static_cast<const acc_t*>(args.weight)),
        loss(static_cast<acc_t*>(args.loss)),
        lse(static_cast<acc_t*>(args.lse)),
        lse_in(static_cast<const acc_t*>(args.lse_in)),
        grad_loss(static_cast<const acc_t*>(args.grad_loss)),
        C(args.C),
        S(args.S),
        stride_n(args.stride_n),
        stride_c(args.stride_c),
        stride_s(args.stride_s),
        reduction(args.reduction),
        ignore_index(args.ignore_index),
        smoothing(args.label_smoothing != 0),
        label_smoothing(static_cast<acc_t>(args.label_smoothing)),
        weight_sum(static_cast<acc_t>(args.weight_sum)),
        total_weight(static_cast<acc_t>(args.total_weight)),
        uniform_scale(grad_scale<Scalar>(args.reduction, static_cast<acc_t>(args.grad_loss_scalar),
                                         static_cast<acc_t>(args.total_weight))
                          .v) {}

  acc_t weight_of(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  V weight_vec(int64_t c) const { return weight ? V(weight[c]) : V(1); }

  int64_t offset(int64_t position) const { return position / S * stride_n + position % S * stride_s; }

  // The class of a position, or -1 when it is ignored or out of range. The first out-of-range position of a block
  // is recorded (the op raises once the kernel is done) and is never used as an index.
  int64_t resolve_class(int64_t position, BlockResult& result) const {
    const int64_t y = target_index[position];
    if (y == ignore_index) return -1;
    if (y < 0 || y >= C) {
      if (result.first_bad_position < 0) result.first_bad_position = position;
      return -1;
    }
    return y;
  }
};

// Stores a whole vector; with `streaming`, and p aligned for it, past the caches (see V::stream).
template <class V, class T>
void store_vector(T* p, V v, bool streaming) {
  if (streaming && reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V::kWidth) == 0) {
    V::stream(p, v);
  } else {
    V::store(p, v);
  }
}

// The first `lanes` elements from p, zeros in the lanes past them. load_lanes and store_lanes serve the inner loops,
// where a call per vector (GCC's choice for 16-bit dtypes, whose partial stores convert lane by lane) would cost
// more than the work: always inlined.
template <class V, class T>
[[gnu::always_inline]] inline V load_lanes(const T* p, int lanes) {
  return lanes == V::kWidth ? V::load(p) : V::load_partial(p, lanes, 0);
}

// Stores the first `lanes` lanes of v; a whole vector as store_vector does.
template <class V, class T>
[[gnu::always_inline]] inline void store_lanes(T* p, V v, int lanes, bool streaming = false) {
  if (lanes == V::kWidth) {
    store_vector(p, v, streaming);
  } else {
    V::store_partial(p, v, lanes);
  }
}

// A running sum that keeps what its additions round away (Knuth's two-sum, exact whatever the magnitudes): for the
// loss sums, whose lanes may hold a class masked at -1e9 that would swallow every later block added to it.
template <class V>
struct CompensatedSum {
  V sum{0}, error{0};
  void add(V v) {
    const V total = sum + v;
    const V v_part = total - sum;
    error = error + ((sum - (total - v_part)) + (v - v_part));
    sum = total;
  }
  // With an infinite sum (a -inf logit under a positive weight) the error is NaN (inf - inf): the sum is the answer.
  V value() const { return select(equal(sum - sum, V(0)), sum + error, sum); }
};

// A position's sum of exps relative to its max. The max's own exp is exactly 1, and an accumulator holding it rounds
// away every later exp below half an ulp of 1 (~6e-8): a near-certain prediction (p_y = 1 - 1e-6 over 17 classes)
// would get a loss and a target gradient of 0. add() counts the exact 1s (the max and its ties) apart from the rest,
// and the log of the total gets back what adding the two rounded off. That costs a compare and a masked add per exp,
// which rows pay (a vector of a row's exps is summed across its lanes at the end of a chunk, and the max's 1 would
// round away there what its lanes kept apart). The NCHW lane kernels, whose one accumulator per position is PyTorch's
// own for such logits, add_plain() instead: counting apart would cost them a fifth of their time.
template <class V>
struct ExpSum {
  V ones{0}, rest{0};

  void add_plain(V e) { rest = rest + e; }
  void add(V e) {
    const auto one = equal(e, V(1));
    ones = add_where(one, ones, V(1));
    rest = add_unless(one, rest, e);
  }
  void add(const ExpSum& other) {
    ones = ones + other.ones;
    rest = rest + other.rest;
  }
  // To a reference higher by -log(factor): the 1s are then no longer at the max (a factor of exactly 1 moved none).
  void rescale(V factor) {
    const auto same = equal(factor, V(1));
    rest = select(same, rest, (ones + rest) * factor);
    ones = select(same, ones, V(0));
  }
  V total() const { return ones + rest; }
  // log(total) + dropped / total, dropped being what rounding the total took of rest (exact while rest <= ones:
  // Fast2Sum); otherwise the correction is within an ulp anyway.
  V log_total() const {
    const V total = ones + rest;
    const V dropped = rest - (total - ones);
    return select(equal(dropped, V(0)), vlog(total), vlog(total) + dropped / total);
  }
};

template <class V, class T>
void fill_zero_row(T* g, int64_t count) {
  constexpr int W = V::kWidth;
  int64_t i = 0;
  for (; i + W <= count; i += W) V::store(g + i, V(0));
  if (i < count) V::store_partial(g + i, V(0), static_cast<int>(count - i));
}

// Whether every one of `count` positions from `position` on is ignored (class-index targets). The row kernel skips
// an ignored row, the lane kernels a tile or lane block of them (a void border of a segmentation label, the padding
// of a batch of sequences): their gradient is 0 whatever their logits.
template <class V, class T>
bool all_ignored(const TypedArgs<V, T>& args, int64_t position, int64_t count) {
  if (args.target_prob) return false;
  for (int64_t i = 0; i < count; ++i) {
    if (args.target_index[position + i] != args.ignore_index) return false;
  }
  return true;
}

// The lse and loss of `count` ignored positions from `position` on, whose logits are not read: the lse of no
// classes, (0, -inf), and a zero loss.
template <class V, class T>
void record_ignored(const TypedArgs<V, T>& args, int64_t position, int64_t count) {
  for (int64_t i = position; i < position + count; ++i) {
    if (args.lse) {
      args.lse[2 * i] = 0;
      args.lse[2 * i + 1] = -std::numeric_limits<typename V::value_type>::infinity();
    }
    if (args.loss) args.loss[i] = 0;
  }
}

#include "cpu/xent_rows.h"
#include "cpu/xent_spatial.h"
#include "cpu/xent_spatial_long.h"

// -------------------------------------------------------------------------------------------------- driver

// Each worker owns a contiguous range of blocks. It claims them one at a time from its range's front, then from the
// other ranges', so a thread that the OS preempts does not hold up the others; each block's result lands in its own
// slot. Contiguous ranges, not blocks dealt alternately: on the dev VM, interleaved blocks made the gradient written
// over the logits take 11.5-12.5 ms instead of 8 (8x19x256x512 fp32) whenever the two vCPUs were placed so (copies
// were then faster too); the forward alone was not affected.
struct BlockRange {
  std::atomic<int64_t> next;
  int64_t end;
};

template <class V, class T>
void run_blocks(const KernelArgs& args, std::vector<BlockRange>& ranges, int64_t worker) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  const TypedArgs<V, T> typed(args);
  const bool backward = args.lse_in != nullptr;
  const int64_t positions = args.N * args.S;
  RowScratch<acc_t> rows;
  SpatialScratch<acc_t> spatial;
  LongLaneScratch<acc_t> long_lanes;
  const bool lanes = uses_lane_kernels(args.layout, args.C, backward, W);
  const bool chunked_lanes = uses_long_lanes(args.layout, args.C, args.S);
  if (!lanes) {
    if (args.grad && !backward) {
      rows.exps.resize(args.C + W);
      rows.chunk_max.resize((args.C + kRowChunk - 1) / kRowChunk);
    }
  } else if (chunked_lanes) {
    long_lanes.x.resize(kLaneChunkClasses * W);
    if (args.target_prob) long_lanes.t.resize(kLaneChunkClasses * W);
    if (args.grad) long_lanes.g.resize(kLaneChunkClasses * W);
    if (args.grad && !backward) {
      long_lanes.exps.resize(args.C * W);
      long_lanes.chunk_max.resize((args.C + kLaneChunkClasses - 1) / kLaneChunkClasses * W);
    }
  } else {
    spatial.x.resize(args.C * kTilePositions);
    if (args.target_prob) spatial.t.resize(args.C * kTilePositions);
    if (args.grad) spatial.g.resize(args.C * kTilePositions);
    if (args.grad && !backward) spatial.exps.resize(args.C * W);
  }
  const int64_t workers = static_cast<int64_t>(ranges.size());
  for (int64_t k = 0; k < workers; ++k) {
    BlockRange& range = ranges[(worker + k) % workers];
    for (int64_t b; (b = range.next.fetch_add(1, std::memory_order_relaxed)) < range.end;) {
      BlockResult result;
      const int64_t first = b * args.positions_per_block;
      const int64_t last = std::min(positions, first + args.positions_per_block);
      if (!lanes) {
        for (int64_t position = first; position < last; ++position) {
          if (backward) {
            row_backward(typed, position, result);
          } else {
            row_forward(typed, position, rows, result);
          }
        }
      } else if (chunked_lanes) {
        long_lanes_block(typed, first, last, long_lanes, result);
      } else {
        spatial_block(typed, first, last, spatial, result);
      }
      args.blocks[b] = result;
    }
  }
  V::stream_fence();
}

template <class V, class T>
void run_typed(const KernelArgs& args) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), args.num_blocks);
  std::vector<BlockRange> ranges(workers);
  for (int64_t w = 0; w < workers; ++w) {
    ranges[w].next = w * args.num_blocks / workers;
    ranges[w].end = (w + 1) * args.num_blocks / workers;
  }
  const unsigned caller_denormal_mode = denormal_mode();
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    const DenormalModeGuard same_subnormals_as_the_caller(caller_denormal_mode);
    for (int64_t worker = begin; worker < end; ++worker) run_blocks<V, T>(args, ranges, worker);
  });
}

void run_kernel(const KernelArgs& args) {
  switch (args.dtype) {
    case at::kFloat:
      return run_typed<FloatVec, float>(args);
    case at::kHalf:
      return run_typed<FloatVec, c10::Half>(args);
    case at::kBFloat16:
      return run_typed<FloatVec, c10::BFloat16>(args);
    case at::kDouble:
      return run_typed<ScalarVec<double>, double>(args);
    default:
      TORCH_CHECK(false, "fused_xent: the CPU kernel does not support logits of dtype ", args.dtype);
  }
}
