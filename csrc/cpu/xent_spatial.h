// The spatial kernels (position stride 1, NCHW), see xent_kernels.h. Included by xent_kernels.h inside the
// instruction set's namespace.
//
// A tile of kTilePositions consecutive positions is first copied, in the accumulation dtype, to a small buffer
// with the classes kTilePositions apart. In NCHW tensors the classes are H*W apart, usually a multiple of 4 KiB:
// the C lines of a lane block then fall in one cache set, of which L1 and L2 hold only 8 ways, so a second read of
// the logits from the tensor (or prefetching them) would miss. The buffer is read instead, and its padding makes
// partial tiles at the end of a batch entry ordinary vectors. The gradient is built in a buffer alike and copied
// out. Short rows (class stride 1, see uses_lane_kernels) use the same tiles: the copies transpose them.

// Offsets into a tile (class * kTilePositions + lane) fit the int32 lanes of a gather: tiles hold at most
// kMaxTileClasses classes (kernel_plan.h, uses_long_lanes).
static_assert(kMaxTileClasses * kTilePositions < (int64_t{1} << 31));
// Lane blocks whose losses are summed in vector precision before the sum moves to the block's double.
constexpr int kLaneBlocksPerFlush = 32;
// Classes whose terms a lane sums in one chain before adding it to its total: a lane has one accumulator per sum,
// so summing C terms in a row would round ~C times into it (1e-5 relative at 20000 classes, and a class masked at
// -1e9 would swallow every later term).
constexpr int64_t kLaneSumClasses = 64;

// Loss and weight sums of a block's lane blocks, moved to the block's doubles every kLaneBlocksPerFlush adds.
template <class V>
struct LaneSums {
  V loss{0}, weight{0};
  int pending = 0;
  void add(V lane_loss, V lane_weight, BlockResult& result) {
    loss = loss + lane_loss;
    weight = weight + lane_weight;
    if (++pending == kLaneBlocksPerFlush) flush(result);
  }
  void flush(BlockResult& result) {
    result.loss_sum += reduce_add(loss);
    result.weight_sum += reduce_add(weight);
    loss = V(0);
    weight = V(0);
    pending = 0;
  }
};

// The class-index targets of one lane block.
template <class V>
struct LaneTargets {
  typename V::Lanes cls;  // -1 where ignored (or past the last position)
  typename V::Mask valid;
  V weight;  // weight[target], 0 where ignored
  V logit;   // x[target], 0 where ignored
};

// The (reference, log_sum) pairs of `lanes` positions, one per lane, into lse (N, S, 2) from the first's pair on.
template <class V>
void store_lse_lanes(typename V::value_type* lse, V reference, V log_sum, int lanes) {
  typename V::value_type references[V::kWidth], log_sums[V::kWidth];
  V::store(references, reference);
  V::store(log_sums, log_sum);
  for (int i = 0; i < lanes; ++i) {
    lse[2 * i] = references[i];
    lse[2 * i + 1] = log_sums[i];
  }
}

// The targets of the `lanes` positions from `position` on, one lane at a time; logit_of(lane, y) reads x[y] of a
// lane's position. Out-of-range classes are reported and treated as ignored.
template <class V, class T, class LogitOf>
LaneTargets<V> lane_targets_by_position(const TypedArgs<V, T>& args, int64_t position, int lanes, BlockResult& result,
                                        LogitOf&& logit_of) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  alignas(64) int32_t cls[W];
  alignas(64) acc_t weight[W];
  alignas(64) acc_t logit[W];
  for (int i = 0; i < W; ++i) {
    const int64_t y = i < lanes ? args.resolve_class(position + i, result) : -1;
    cls[i] = static_cast<int32_t>(y);
    weight[i] = y >= 0 ? args.weight_of(y) : acc_t(0);
    logit[i] = y >= 0 ? logit_of(i, y) : acc_t(0);
  }
  LaneTargets<V> targets;
  targets.cls = V::Lanes::load(cls);
  targets.valid = targets.cls.valid();
  targets.weight = V::load(weight);
  targets.logit = V::load(logit);
  return targets;
}

// The targets of a lane block whose logits are in a tile (x[c * kTilePositions + lane]).
template <class V, class T>
LaneTargets<V> lane_targets(const TypedArgs<V, T>& args, int64_t position, int lanes, const typename V::value_type* x,
                            BlockResult& result) {
  constexpr int W = V::kWidth;
  LaneTargets<V> targets;
  if (lanes == W && V::Lanes::load_classes(args.target_index + position, args.ignore_index, args.C, targets.cls)) {
    targets.valid = targets.cls.valid();
    targets.weight =
        args.weight ? V::gather(args.weight, targets.cls, targets.valid) : select(targets.valid, V(1), V(0));
    targets.logit = V::gather(x, targets.cls.offsets(kTilePositions), targets.valid);
    return targets;
  }
  // A partial lane block, or a class out of range (to be reported).
  return lane_targets_by_position(args, position, lanes, result,
                                  [&](int lane, int64_t y) { return x[y * kTilePositions + lane]; });
}

// The per-lane sums of one pass over the classes.
template <class V>
struct LaneTotals {
  V reference{0};               // what the loss sums are relative to: each lane's (running) max, 0 while -inf
  ExpSum<V> sum;                // of exps, relative to the pass's reference
  V weighted_logits{0};         // sum_c w[c] (x[c] - reference) (class indices with smoothing)
  V weights_seen{0};            // sum_c w[c] over the classes in weighted_logits
  V weighted_targets{0};        // sum_c w[c] t'[c] (probabilities)
  V weighted_target_logits{0};  // sum_c w[c] t'[c] (x[c] - reference) (probabilities)
  // What adding blocks to the two loss sums rounded away (see CompensatedSum).
  V logits_error{0}, target_logits_error{0};

  // Moves the loss sums to a new reference (xent_math.h): sum a (x - new) = sum a (x - old) + A (old - new).
  void rebase(V new_reference) {
    const V rise = reference - new_reference;
    add_compensated(weighted_logits, logits_error, weights_seen * rise);
    add_compensated(weighted_target_logits, target_logits_error, weighted_targets * rise);
    reference = new_reference;
  }

  // Empty sums with this reference, for one block of classes (see kLaneSumClasses).
  LaneTotals block() const {
    LaneTotals empty;
    empty.reference = reference;
    return empty;
  }
  void add(const LaneTotals& block) {
    sum.add(block.sum);
    add_compensated(weighted_logits, logits_error, block.weighted_logits);
    weights_seen = weights_seen + block.weights_seen;
    weighted_targets = weighted_targets + block.weighted_targets;
    add_compensated(weighted_target_logits, target_logits_error, block.weighted_target_logits);
  }

  static void add_compensated(V& total, V& error, V value) {
    CompensatedSum<V> running{total, error};
    running.add(value);
    total = running.sum;
    error = running.error;
  }
  V logits_value() const { return CompensatedSum<V>{weighted_logits, logits_error}.value(); }
  V target_logits_value() const { return CompensatedSum<V>{weighted_target_logits, target_logits_error}.value(); }

  // The loss terms of class c, whose logits are xv and (probabilities) targets *t.
  template <class T>
  void add_class(const TypedArgs<V, T>& args, int64_t c, V xv, const typename V::value_type* t) {
    if (t) {
      const V wt = smoothed_probability(V::load(t), V(args.label_smoothing), args.C) * args.weight_vec(c);
      weighted_targets = weighted_targets + wt;
      weighted_target_logits = fmadd(wt, xv - reference, weighted_target_logits);
    } else if (args.smoothing) {
      const V w = args.weight_vec(c);
      weighted_logits = fmadd(w, xv - reference, weighted_logits);
      weights_seen = weights_seen + w;
    }
  }
};

// lse and loss of a lane block into the outputs and the block's sums, from the reference its exps were taken
// against (see target_gap) and totals.sum; returns the class-index coefficients.
template <class V, class T>
IndexTargetCoeffs<V> record_lanes(const TypedArgs<V, T>& args, int64_t position, int lanes,
                                  const LaneTargets<V>& targets, V reference, const LaneTotals<V>& totals,
                                  LaneSums<V>& sums, BlockResult& result) {
  const V log_sum = totals.sum.log_total();
  if (args.lse) {
    // An ignored position reports the lse of no classes, (0, -inf), as the row kernel, which skips it, does (an
    // out-of-range one too, but the op raises then).
    const auto kept = args.target_prob ? V::prefix(lanes) : targets.valid;
    const V no_classes(-std::numeric_limits<typename V::value_type>::infinity());
    store_lse_lanes(args.lse + 2 * position, select(kept, reference, V(0)), select(kept, log_sum, no_classes), lanes);
  }
  // The loss sums are relative to `reference` (totals.reference), so lse - reference = log_sum.
  const IndexTargetCoeffs<V> k = index_target_coeffs(targets.weight, V(args.label_smoothing), args.C);
  V loss;
  if (args.target_prob) {
    loss = select(V::prefix(lanes),
                  prob_target_loss(log_sum, totals.weighted_targets, totals.target_logits_value()), V(0));
  } else {
    loss = index_target_loss_given_smoothing(args.smoothing, k, log_sum, target_gap(reference, log_sum, targets.logit),
                                             V(args.weight_sum), totals.logits_value());
    loss = select(targets.valid, loss, V(0));
  }
  sums.add(loss, targets.weight, result);
  if (args.loss) store_lanes(args.loss + position, loss, lanes);
  return k;
}

// The saved lse of a lane block as a backward takes it (split_lse): p = exp(x - hi) * factor.
template <class V>
struct LaneLse {
  V hi, factor;
};

template <class V, class T>
LaneLse<V> saved_lane_lse(const TypedArgs<V, T>& args, int64_t position, int lanes) {
  using acc_t = typename V::value_type;
  acc_t reference[V::kWidth] = {}, log_sum[V::kWidth] = {};
  for (int i = 0; i < lanes; ++i) {
    reference[i] = args.lse_in[2 * (position + i)];
    log_sum[i] = args.lse_in[2 * (position + i) + 1];
  }
  const SplitLse<V> lse = split_lse(V::load(reference), V::load(log_sum));
  return {lse.hi, vexp(V(0) - lse.lo)};
}

// The gradient of classes c0 .. c0 + classes - 1 of a lane block into g[c * g_stride], given p(c) = exp(x - lse)
// of class c0 + c. Class-index targets: prob_coef p - class_coef w[c] - [c == y] target_coef, 0 in ignored lanes.
template <class V, class T, class Probability>
void index_grad_lanes(const TypedArgs<V, T>& args, const LaneTargets<V>& targets, const IndexGradCoeffs<V>& gk,
                      int64_t c0, int64_t classes, typename V::value_type* g, int64_t g_stride,
                      Probability&& probability) {
  for (int64_t c = 0; c < classes; ++c) {
    V gv = gk.prob_coef * probability(c);
    if (args.smoothing) gv = gv - gk.class_coef * args.weight_vec(c0 + c);
    gv = select(targets.cls.equals(static_cast<int32_t>(c0 + c)), gv - gk.target_coef, gv);
    V::store(g + c * g_stride, select(targets.valid, gv, V(0)));
  }
}

// The same for probability targets, whose t[c * t_stride] give t'[c0 + c]: prob_coef p - scale w[c] t'[c], with
// prob_coef = scale T.
template <class V, class T, class Probability>
void prob_grad_lanes(const TypedArgs<V, T>& args, V prob_coef, V scale, int64_t c0, int64_t classes,
                     const typename V::value_type* t, int64_t t_stride, typename V::value_type* g, int64_t g_stride,
                     Probability&& probability) {
  for (int64_t c = 0; c < classes; ++c) {
    const V wt =
        smoothed_probability(V::load(t + c * t_stride), V(args.label_smoothing), args.C) * args.weight_vec(c0 + c);
    V::store(g + c * g_stride, prob_coef * probability(c) - scale * wt);
  }
}

// Forward of the `lanes` positions from `position` on, whose class c logits are x[c * kTilePositions] in the tile
// buffer (likewise t and g).
template <class V, class T>
void lanes_forward(const TypedArgs<V, T>& args, int64_t position, int lanes, const typename V::value_type* x,
                   const typename V::value_type* t, typename V::value_type* g, int64_t g_stride,
                   typename V::value_type* exps, LaneSums<V>& sums, BlockResult& result) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr int64_t stride = kTilePositions;
  const int64_t C = args.C;
  LaneTargets<V> targets{};
  if (!t) targets = lane_targets(args, position, lanes, x, result);

  V max(kNegInf);
  for (int64_t c = 0; c < C; ++c) max = vmax(max, V::load(x + c * stride));
  // Lanes whose logits are all -inf take exps relative to 0 (exp(-inf) = 0) instead of exp(-inf + inf) = NaN.
  const V ref = select(equal(max, V(kNegInf)), V(0), max);

  LaneTotals<V> totals;
  totals.reference = ref;  // the max, known before the sums here
  // Short rows (a lane per row: class stride 1, channels_last too) keep their small exps apart from the max's 1
  // (ExpSum), as PyTorch's vectorized rows keep most of them, for 5-10% more time; NCHW lanes sum them plainly, as
  // PyTorch's NCHW kernel does, where counting apart would cost a fifth of the time.
  auto add_classes = [&](LaneTotals<V>& into, int64_t begin, int64_t end, auto apart_from_max) {
    for (int64_t c = begin; c < end; ++c) {
      const V xv = V::load(x + c * stride);
      const V e = vexp(xv - ref);
      if constexpr (decltype(apart_from_max)::value) {
        into.sum.add(e);
      } else {
        into.sum.add_plain(e);
      }
      if (exps) V::store(exps + c * W, e);
      into.add_class(args, c, xv, t ? t + c * stride : nullptr);
    }
  };
  auto add_all_classes = [&](auto apart_from_max) {
    if (C <= kLaneSumClasses) {  // one block: straight into the totals (segmentation's few classes)
      add_classes(totals, 0, C, apart_from_max);
    } else {
      for (int64_t c0 = 0; c0 < C; c0 += kLaneSumClasses) {
        LaneTotals<V> block = totals.block();
        add_classes(block, c0, std::min(C, c0 + kLaneSumClasses), apart_from_max);
        totals.add(block);
      }
    }
  };
  if (args.stride_c == 1) {
    add_all_classes(std::true_type{});
  } else {
    add_all_classes(std::false_type{});
  }
  const IndexTargetCoeffs<V> k = record_lanes(args, position, lanes, targets, ref, totals, sums, result);
  if (!g) return;

  // Gradient from the kept exps, p = e / sum (see row_forward for the two formulas).
  const V scale(args.uniform_scale);
  const V inverse_sum = V(1) / totals.sum.total();
  auto probability = [&](int64_t c) { return V::load(exps + c * W) * inverse_sum; };
  if (t) {
    prob_grad_lanes(args, scale * totals.weighted_targets, scale, 0, C, t, stride, g, g_stride, probability);
  } else {
    index_grad_lanes(args, targets, index_grad_coeffs(k, V(args.weight_sum), scale), 0, C, g, g_stride, probability);
  }
}

// Backward of a lane block (arguments as lanes_forward).
template <class V, class T>
void lanes_backward(const TypedArgs<V, T>& args, int64_t position, int lanes, const typename V::value_type* x,
                    const typename V::value_type* t, typename V::value_type* g, BlockResult& result) {
  constexpr int64_t stride = kTilePositions;
  const int64_t C = args.C;
  const LaneLse<V> lse = saved_lane_lse(args, position, lanes);
  const V scale =
      args.grad_loss ? grad_scale(args.reduction, load_lanes<V>(args.grad_loss + position, lanes), V(args.total_weight))
                     : V(args.uniform_scale);
  auto probability = [&](int64_t c) { return vexp(V::load(x + c * stride) - lse.hi); };
  if (t) {
    CompensatedSum<V> weighted_targets;  // as in row_backward
    for (int64_t c = 0; c < C; ++c) {
      weighted_targets.add(smoothed_probability(V::load(t + c * stride), V(args.label_smoothing), C) *
                           args.weight_vec(c));
    }
    prob_grad_lanes(args, scale * weighted_targets.value() * lse.factor, scale, 0, C, t, stride, g, stride,
                    probability);
    return;
  }
  const LaneTargets<V> targets = lane_targets(args, position, lanes, x, result);
  IndexGradCoeffs<V> gk =
      index_grad_coeffs(index_target_coeffs(targets.weight, V(args.label_smoothing), C), V(args.weight_sum), scale);
  gk.prob_coef = gk.prob_coef * lse.factor;
  index_grad_lanes(args, targets, gk, 0, C, g, stride, probability);
}

// Per-thread buffers of the spatial kernels: one tile of logits, targets and gradient, and a lane block's exps.
template <class acc_t>
struct SpatialScratch {
  std::vector<acc_t> x, t, g, exps;
};

// Calls body(i0, positions, c0, classes) for each W x W square of a tile of `count` short rows of C classes: from
// position i0 and class c0 on, of which `positions` and `classes` lie inside.
template <int W, class Body>
void for_each_square(int64_t count, int64_t C, Body&& body) {
  for (int64_t i0 = 0; i0 < count; i0 += W) {
    const int positions = static_cast<int>(std::min<int64_t>(W, count - i0));
    for (int64_t c0 = 0; c0 < C; c0 += W) body(i0, positions, c0, static_cast<int>(std::min<int64_t>(W, C - c0)));
  }
}

// Copies `count` positions of each class from a tensor (classes class_stride apart, positions position_stride
// apart) to a tile buffer, converting to the accumulation dtype and padding with zeros to whole vectors (store_tile
// copies back).
template <class V, class T>
void load_tile(const T* from, int64_t class_stride, int64_t position_stride, int64_t C, int64_t count,
               typename V::value_type* tile) {
  constexpr int W = V::kWidth;
  constexpr int64_t kLine = 64 / sizeof(T);
  if (position_stride != 1) {  // short rows (adjacent classes): transpose W x W blocks in registers
    for_each_square<W>(count, C, [&](int64_t i0, int positions, int64_t c0, int classes) {
      V block[W];
      for (int r = 0; r < W; ++r) {  // positions past `count` pad the tile with zeros
        const T* row = r < positions ? from + (i0 + r) * position_stride + c0 : nullptr;
        block[r] = row ? load_lanes<V>(row, classes) : V(0);
      }
      V::transpose(block);
      for (int k = 0; k < classes; ++k) V::store(tile + (c0 + k) * kTilePositions + i0, block[k]);
    });
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    // The hardware prefetchers do not follow C streams that alias in the cache; ask for the tile after next.
    // (Low temporal locality: the lines only have to reach the outer caches, the conflicts are in L1 and L2.)
    for (int64_t i = 0; i < kTilePositions; i += kLine) {
      __builtin_prefetch(from + c * class_stride + 2 * kTilePositions + i, 0, 1);
    }
    for (int64_t i = 0; i < count; i += W) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, count - i));
      V::store(tile + c * kTilePositions + i, load_lanes<V>(from + c * class_stride + i, lanes));
    }
  }
}

// With `streaming` (a fresh gradient, whose lines are not cached), whole aligned vectors of NCHW tiles are written
// past the caches (the transposed stores of short rows ignore it); a gradient written over the logits is not: their
// lines may still be cached.
template <class V, class T>
void store_tile(const typename V::value_type* tile, int64_t C, int64_t count, T* to, int64_t class_stride,
                int64_t position_stride, bool streaming) {
  constexpr int W = V::kWidth;
  if (position_stride != 1) {  // short rows (adjacent classes): transpose W x W blocks in registers
    for_each_square<W>(count, C, [&](int64_t i0, int positions, int64_t c0, int classes) {
      V block[W];
      for (int k = 0; k < W; ++k) block[k] = k < classes ? V::load(tile + (c0 + k) * kTilePositions + i0) : V(0);
      V::transpose(block);
      for (int r = 0; r < positions; ++r) store_lanes(to + (i0 + r) * position_stride + c0, block[r], classes);
    });
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < count; i += W) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, count - i));
      store_lanes(to + c * class_stride + i, V::load(tile + c * kTilePositions + i), lanes, streaming);
    }
  }
}

// The outputs of a tile whose positions are all ignored, without reading its logits: record_ignored, and a zero
// gradient laid out as store_tile lays a tile out.
template <class V, class T>
void skip_ignored_tile(const TypedArgs<V, T>& args, int64_t position, int64_t count, int64_t offset,
                       int64_t position_stride) {
  record_ignored(args, position, count);
  if (!args.grad) return;
  if (position_stride == 1) {
    for (int64_t c = 0; c < args.C; ++c) fill_zero_row<V>(args.grad + offset + c * args.stride_c, count);
  } else {  // short rows: classes adjacent
    for (int64_t i = 0; i < count; ++i) fill_zero_row<V>(args.grad + offset + i * position_stride, args.C);
  }
}

template <class V, class T>
void spatial_block(const TypedArgs<V, T>& args, int64_t first, int64_t last,
                   SpatialScratch<typename V::value_type>& scratch, BlockResult& result) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  const bool backward = args.lse_in != nullptr;
  acc_t* exps = args.grad && !backward ? scratch.exps.data() : nullptr;
  acc_t* const g_tile = args.grad ? scratch.g.data() : nullptr;
  const acc_t* t = args.target_prob ? scratch.t.data() : nullptr;
  LaneSums<V> sums;
  // Positions of one batch entry are position_stride apart in memory (1 in the spatial layout, C in channels_last
  // rows); a tile never straddles two entries, unless S == 1: then the positions are the batch entries.
  const int64_t position_stride = args.S == 1 ? args.stride_n : args.stride_s;
  for (int64_t position = first; position < last;) {
    const int64_t run_end = args.S == 1 ? last : std::min(last, (position / args.S + 1) * args.S);
    for (int64_t offset = args.offset(position), count; position < run_end;
         position += count, offset += count * position_stride) {
      count = std::min(kTilePositions, run_end - position);
      if (all_ignored(args, position, count)) {
        skip_ignored_tile(args, position, count, offset, position_stride);
        continue;
      }
      // In place, a whole tile of a float gradient goes straight over its logits (they are in the x tile now): the
      // detour through the g tile cost a load and a store per vector, a tenth of the time.
      const bool direct = std::is_same_v<T, acc_t> && args.grad == args.logits && !backward && position_stride == 1 &&
                          count == kTilePositions;
      acc_t* const g = direct ? reinterpret_cast<acc_t*>(args.grad + offset) : g_tile;
      const int64_t g_stride = direct ? args.stride_c : kTilePositions;
      load_tile<V>(args.logits + offset, args.stride_c, position_stride, args.C, count, scratch.x.data());
      if (t) load_tile<V>(args.target_prob + offset, args.stride_c, position_stride, args.C, count, scratch.t.data());
      for (int64_t i = 0; i < count; i += W) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, count - i));
        const acc_t* x = scratch.x.data() + i;
        if (backward) {
          lanes_backward(args, position + i, lanes, x, t ? t + i : nullptr, g + i, result);
        } else {
          lanes_forward(args, position + i, lanes, x, t ? t + i : nullptr, g ? g + i : nullptr, g_stride, exps, sums,
                        result);
        }
      }
      if (g && !direct)
        store_tile<V>(g, args.C, count, args.grad + offset, args.stride_c, position_stride, args.grad != args.logits);
    }
  }
  sums.flush(result);
}
