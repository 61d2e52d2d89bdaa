// The spatial kernels for positions with many classes (NCHW with C > kLaneChunkClasses and either fewer positions
// per batch entry than a tile or C > kMaxTileClasses, e.g. vocabulary logits laid out (N, C, T)), see
// xent_kernels.h. Included by xent_kernels.h inside the instruction set's namespace, after
// xent_spatial.h.
//
// The tiles of xent_spatial.h hold all C classes of 64 positions: megabytes for a vocabulary, streamed from memory
// again by every pass over them (max, exps, gradient). Here a lane block (V::kWidth consecutive positions, across
// batch entries when S is shorter than a vector, so that lanes do not idle) walks its classes in chunks of
// kLaneChunkClasses. Each chunk is copied to a small tile that stays in L1 while its max and exps are taken, and
// the online softmax carries the running max and sum from chunk to chunk (one exp per logit). A gradient made in the
// forward comes from the kept exps, each chunk's rescaled from the running max it was taken against (as in
// row_forward), so the logits are read from memory once either way.

// Class rows are stride_c apart, often a multiple of 4 KiB, which the hardware prefetchers do not follow: the copy
// asks for the row this many classes ahead (a few hundred ns of work; 32 read 10-25% faster than 8 on the dev VM).
constexpr int64_t kPrefetchClasses = 32;

// Per-thread buffers: one chunk of logits, targets and gradient; the exps of a lane block and the running max after
// each of its chunks (forward with gradient).
template <class acc_t>
struct LongLaneScratch {
  std::vector<acc_t> x, t, g, exps, chunk_max;
};

// A lane block's positions as runs of consecutive positions of one batch entry, each adjacent in memory.
template <class V>
struct LaneRuns {
  int count = 0;
  std::array<int64_t, V::kWidth> offset;  // element offset of the run's class 0
  std::array<int, V::kWidth> first_lane, lanes;
};

template <class V, class T>
LaneRuns<V> lane_runs(const TypedArgs<V, T>& args, int64_t position, int lanes) {
  LaneRuns<V> runs;
  for (int lane = 0; lane < lanes; ++runs.count) {
    const int64_t p = position + lane;
    const int length = static_cast<int>(std::min<int64_t>(lanes - lane, args.S - p % args.S));
    runs.offset[runs.count] = args.offset(p);
    runs.first_lane[runs.count] = lane;
    runs.lanes[runs.count] = length;
    lane += length;
  }
  return runs;
}

// Classes [c0, c0 + classes) of a lane block's positions into tile[c * W + lane], in the accumulation dtype, with
// zeros in the lanes past the block. A block of several runs is copied one run at a time: a run's classes are
// then read in address order (with S shorter than a vector, consecutive classes share cache lines).
template <class V, class T>
void load_lane_chunk(const T* base, int64_t class_stride, const LaneRuns<V>& runs, int lanes, int64_t c0,
                     int64_t classes, typename V::value_type* tile) {
  constexpr int W = V::kWidth;
  const int64_t ahead = kPrefetchClasses * class_stride;
  const T* first_class = base + c0 * class_stride;
  if (runs.count == 1 && lanes == W) {
    for (int64_t c = 0; c < classes; ++c) {
      const T* in = first_class + c * class_stride + runs.offset[0];
      __builtin_prefetch(in + ahead, 0, 1);
      V::store(tile + c * W, V::load(in));
    }
    return;
  }
  if (lanes < W) {
    for (int64_t c = 0; c < classes; ++c) V::store(tile + c * W, V(0));
  }
  for (int r = 0; r < runs.count; ++r) {
    for (int64_t c = 0; c < classes; ++c) {
      const T* in = first_class + c * class_stride + runs.offset[r];
      __builtin_prefetch(in + ahead, 0, 1);
      V::store_partial(tile + c * W + runs.first_lane[r], V::load_partial(in, runs.lanes[r], 0), runs.lanes[r]);
    }
  }
}

// The inverse copy, for the gradient; `streaming` as in store_tile. Runs one at a time, as in load_lane_chunk: a
// cache line of a fresh gradient is then written whole before the next, instead of being fetched again for each
// run's part of it.
template <class V, class T>
void store_lane_chunk(const typename V::value_type* tile, const LaneRuns<V>& runs, int lanes, int64_t c0,
                      int64_t classes, T* base, int64_t class_stride, bool streaming) {
  constexpr int W = V::kWidth;
  T* first_class = base + c0 * class_stride;
  if (runs.count == 1 && lanes == W) {
    for (int64_t c = 0; c < classes; ++c) {
      store_vector(first_class + c * class_stride + runs.offset[0], V::load(tile + c * W), streaming);
    }
    return;
  }
  for (int r = 0; r < runs.count; ++r) {
    for (int64_t c = 0; c < classes; ++c) {
      // Only the run's lanes are loaded: a whole vector from first_lane would read past the end of the tile.
      V::store_partial(first_class + c * class_stride + runs.offset[r],
                       V::load_partial(tile + c * W + runs.first_lane[r], runs.lanes[r], 0), runs.lanes[r]);
    }
  }
}

template <class V, class T>
void long_lanes_forward(const TypedArgs<V, T>& args, int64_t position, int lanes,
                        LongLaneScratch<typename V::value_type>& s, LaneSums<V>& sums, BlockResult& result) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t C = args.C;
  const bool prob = args.target_prob != nullptr;
  const LaneRuns<V> runs = lane_runs(args, position, lanes);
  LaneTargets<V> targets{};
  if (!prob) {
    targets = lane_targets_by_position(args, position, lanes, result, [&](int lane, int64_t y) {
      return static_cast<acc_t>(args.logits[args.offset(position + lane) + y * args.stride_c]);
    });
  }

  V max(kNegInf);
  LaneTotals<V> totals;
  for (int64_t c0 = 0, chunk = 0; c0 < C; c0 += kLaneChunkClasses, ++chunk) {
    const int64_t classes = std::min(kLaneChunkClasses, C - c0);
    load_lane_chunk(args.logits, args.stride_c, runs, lanes, c0, classes, s.x.data());
    if (prob) load_lane_chunk(args.target_prob, args.stride_c, runs, lanes, c0, classes, s.t.data());
    V chunk_max = max;
    for (int64_t c = 0; c < classes; ++c) chunk_max = vmax(chunk_max, V::load(s.x.data() + c * W));
    // Lanes whose logits are all -inf so far take exps relative to 0 (exp(-inf) = 0) instead of NaN. The running
    // sum moves to the new reference: exp(max - ref) <= 1, and 0 while max is -inf (when the sum is 0 too).
    const V ref = select(equal(chunk_max, V(kNegInf)), V(0), chunk_max);
    totals.sum.rescale(vexp(max - ref));
    totals.rebase(ref);
    max = chunk_max;
    if (!s.chunk_max.empty()) V::store(s.chunk_max.data() + chunk * W, chunk_max);
    for (int64_t b0 = 0; b0 < classes; b0 += kLaneSumClasses) {
      LaneTotals<V> block = totals.block();
      for (int64_t c = b0; c < std::min(classes, b0 + kLaneSumClasses); ++c) {
        const V xv = V::load(s.x.data() + c * W);
        const V e = vexp(xv - ref);
        block.sum.add_plain(e);  // as the NCHW lanes (ExpSum); a 64-class block bounds what the max's 1 rounds off
        if (!s.exps.empty()) V::store(s.exps.data() + (c0 + c) * W, e);
        block.add_class(args, c0 + c, xv, prob ? s.t.data() + c * W : nullptr);
      }
      totals.add(block);
    }
  }
  const V reference = select(equal(max, V(kNegInf)), V(0), max);
  const IndexTargetCoeffs<V> k = record_lanes(args, position, lanes, targets, reference, totals, sums, result);
  if (!args.grad) return;

  // p = e exp(chunk max - max) / sum: the difference of two logits is exact, where lse ~ 1e4 would carry a rounding
  // error of ~1e-3 into exp(chunk max - lse). A chunk max of -inf gives 0 (its exps are 0 too), a max of -inf NaN.
  const V scale(args.uniform_scale);
  const bool streaming = args.grad != args.logits;
  const IndexGradCoeffs<V> gk = index_grad_coeffs(k, V(args.weight_sum), scale);
  const V inverse_sum = V(1) / totals.sum.total();
  for (int64_t c0 = 0, chunk = 0; c0 < C; c0 += kLaneChunkClasses, ++chunk) {
    const int64_t classes = std::min(kLaneChunkClasses, C - c0);
    const V factor = vexp(V::load(s.chunk_max.data() + chunk * W) - max) * inverse_sum;
    auto probability = [&](int64_t c) { return V::load(s.exps.data() + (c0 + c) * W) * factor; };
    if (prob) {
      load_lane_chunk(args.target_prob, args.stride_c, runs, lanes, c0, classes, s.t.data());
      prob_grad_lanes(args, scale * totals.weighted_targets, scale, c0, classes, s.t.data(), W, s.g.data(), W,
                      probability);
    } else {
      index_grad_lanes(args, targets, gk, c0, classes, s.g.data(), W, probability);
    }
    store_lane_chunk(s.g.data(), runs, lanes, c0, classes, args.grad, args.stride_c, streaming);
  }
}

template <class V, class T>
void long_lanes_backward(const TypedArgs<V, T>& args, int64_t position, int lanes,
                         LongLaneScratch<typename V::value_type>& s, BlockResult& result) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  const int64_t C = args.C;
  const bool prob = args.target_prob != nullptr;
  const LaneRuns<V> runs = lane_runs(args, position, lanes);
  const LaneLse<V> lse = saved_lane_lse(args, position, lanes);
  const V scale =
      args.grad_loss ? grad_scale(args.reduction, load_lanes<V>(args.grad_loss + position, lanes), V(args.total_weight))
                     : V(args.uniform_scale);
  V prob_coef(0);
  LaneTargets<V> targets{};
  IndexGradCoeffs<V> gk{};
  if (prob) {  // T = sum_c w[c] t'[c] first: every gradient element needs it
    CompensatedSum<V> weighted_targets;  // as in row_backward
    for (int64_t c0 = 0; c0 < C; c0 += kLaneChunkClasses) {
      const int64_t classes = std::min(kLaneChunkClasses, C - c0);
      load_lane_chunk(args.target_prob, args.stride_c, runs, lanes, c0, classes, s.t.data());
      for (int64_t c = 0; c < classes; ++c) {
        const V tv = V::load(s.t.data() + c * W);
        weighted_targets.add(smoothed_probability(tv, V(args.label_smoothing), C) * args.weight_vec(c0 + c));
      }
    }
    prob_coef = scale * weighted_targets.value() * lse.factor;
  } else {
    targets = lane_targets_by_position(args, position, lanes, result, [&](int, int64_t) { return acc_t(0); });
    gk = index_grad_coeffs(index_target_coeffs(targets.weight, V(args.label_smoothing), C), V(args.weight_sum), scale);
    gk.prob_coef = gk.prob_coef * lse.factor;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kLaneChunkClasses) {
    const int64_t classes = std::min(kLaneChunkClasses, C - c0);
    load_lane_chunk(args.logits, args.stride_c, runs, lanes, c0, classes, s.x.data());
    auto probability = [&](int64_t c) { return vexp(V::load(s.x.data() + c * W) - lse.hi); };
    if (prob) {
      load_lane_chunk(args.target_prob, args.stride_c, runs, lanes, c0, classes, s.t.data());
      prob_grad_lanes(args, prob_coef, scale, c0, classes, s.t.data(), W, s.g.data(), W, probability);
    } else {
      index_grad_lanes(args, targets, gk, c0, classes, s.g.data(), W, probability);
    }
    store_lane_chunk(s.g.data(), runs, lanes, c0, classes, args.grad, args.stride_c, /*streaming=*/true);
  }
}

// The outputs of a lane block whose positions are all ignored, without reading its logits: record_ignored, and a
// zero gradient.
template <class V, class T>
void skip_ignored_lanes(const TypedArgs<V, T>& args, int64_t position, int lanes) {
  record_ignored(args, position, lanes);
  if (!args.grad) return;
  const LaneRuns<V> runs = lane_runs(args, position, lanes);
  for (int r = 0; r < runs.count; ++r) {
    for (int64_t c = 0; c < args.C; ++c)
      V::store_partial(args.grad + runs.offset[r] + c * args.stride_c, V(0), runs.lanes[r]);
  }
}

template <class V, class T>
void long_lanes_block(const TypedArgs<V, T>& args, int64_t first, int64_t last,
                      LongLaneScratch<typename V::value_type>& s, BlockResult& result) {
  constexpr int W = V::kWidth;
  LaneSums<V> sums;
  for (int64_t position = first; position < last; position += W) {
    const int lanes = static_cast<int>(std::min<int64_t>(W, last - position));
    if (all_ignored(args, position, lanes)) {
      skip_ignored_lanes(args, position, lanes);
    } else if (args.lse_in) {
      long_lanes_backward(args, position, lanes, s, result);
    } else {
      long_lanes_forward(args, position, lanes, s, sums, result);
    }
  }
  sums.flush(result);
}
