// The CPU kernels, written once over a vector type V (the instruction set's FloatVec for float32, float16 and
// bfloat16 logits, computing in float32; ScalarVec<double> for float64) and the storage type T of the logits.
//
// Two layouts (see common/xent_problem.h):
//  - rows (class stride 1: (N, C) and channels_last): one position at a time. Its C logits are read in chunks of
//    kRowChunk classes: the chunk's max (read from memory), then its exps relative to the running max (re-read from
//    L1); the running sum is rescaled when the max grows, so rows of any length are read from memory once.
//  - spatial (position stride 1: NCHW): V::kWidth consecutive positions at a time, one per lane, looping over the
//    classes: no transpose, and every exp fills a whole vector.
// Forward + grad keeps each exp (in the accumulation dtype, in a per-thread buffer) and writes the gradient from it
// while the row or lane block is still in cache: one exp per logit, one read of the logits, one write of the
// gradient, which may be the logits themselves (everything read from a row is read before its gradient is written).
// Backward recomputes p = exp(x - lse): one read, one write.
//
// Included by kernels_<isa>.cpp inside namespace fused_xent::cpu::<isa>, after that instruction set's FloatVec and
// ScalarVec. The shared per-position algebra (common/xent_math.h) is compiled for the instruction set there too, so
// it is only ever instantiated with these namespaced types (ScalarVec stands for a plain number in row code).

// Classes per chunk of a row: 8 KiB of float32, so the second read of a chunk hits L1.
constexpr int64_t kRowChunk = 2048;
// Positions per tile of the spatial kernels (a multiple of every vector width).
constexpr int64_t kTilePositions = 64;
// Most classes for which offsets into a tile (class * kTilePositions + lane) fit the int32 lanes of a gather.
constexpr int64_t kMaxGatherClasses = (int64_t{1} << 31) / kTilePositions - 1;
// Lane blocks whose losses are summed in vector precision before the sum moves to the block's double.
constexpr int kLaneBlocksPerFlush = 32;

// The kernel arguments with their types restored, and the constants of the problem.
template <class V, class T>
struct Typed {
  using acc_t = typename V::value_type;
  using Scalar = ScalarVec<acc_t>;

  const T* logits;
  const T* target_prob;
  const int64_t* target_index;
  T* grad;
  const acc_t* weight;
  T* loss;
  acc_t* lse;
  const acc_t* lse_in;
  const acc_t* grad_loss;
  int64_t C, S, stride_n, stride_c, stride_s;
  int64_t reduction, ignore_index;
  bool smoothing;
  acc_t label_smoothing, weight_sum, total_weight;
  acc_t uniform_scale;  // the upstream gradient scale of every position when there is no per-position grad_loss

  explicit Typed(const KernelArgs& a)
      : logits(static_cast<const T*>(a.logits)),
        target_prob(static_cast<const T*>(a.target_prob)),
        target_index(a.target_index),
        grad(static_cast<T*>(a.grad)),
        weight(static_cast<const acc_t*>(a.weight)),
        loss(static_cast<T*>(a.loss)),
        lse(static_cast<acc_t*>(a.lse)),
        lse_in(static_cast<const acc_t*>(a.lse_in)),
        grad_loss(static_cast<const acc_t*>(a.grad_loss)),
        C(a.C),
        S(a.S),
        stride_n(a.stride_n),
        stride_c(a.stride_c),
        stride_s(a.stride_s),
        reduction(a.reduction),
        ignore_index(a.ignore_index),
        smoothing(a.label_smoothing != 0),
        label_smoothing(static_cast<acc_t>(a.label_smoothing)),
        weight_sum(static_cast<acc_t>(a.weight_sum)),
        total_weight(static_cast<acc_t>(a.total_weight)),
        uniform_scale(
            grad_scale<Scalar>(a.reduction, static_cast<acc_t>(a.grad_loss_scalar), static_cast<acc_t>(a.total_weight)).v) {}

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

template <class V, class T>
void fill_zero_row(T* g, int64_t count) {
  constexpr int W = V::kWidth;
  int64_t i = 0;
  for (; i + W <= count; i += W) V::store(g + i, V(0));
  if (i < count) V::store_partial(g + i, V(0), static_cast<int>(count - i));
}

// ---------------------------------------------------------------------------------------------------- rows

template <class acc_t>
struct RowStatistics {
  acc_t max;      // of the row (-inf when every logit is -inf)
  acc_t sum_exp;  // relative to max (to 0 while max is -inf)
  acc_t lse;
  acc_t weighted_logits;         // sum_c w[c] x[c] (class-index targets with smoothing)
  acc_t weighted_targets;        // sum_c w[c] t'[c] (probability targets)
  acc_t weighted_target_logits;  // sum_c w[c] t'[c] x[c] (probability targets)
};

// One read of a row: its max, sum of exps and lse, the dot products the loss needs, and, when exps is given, every
// exp(x - running max) with the running max of each chunk in chunk_max (so a later pass can rescale them).
template <class V, class T>
RowStatistics<typename V::value_type> row_statistics(const Typed<V, T>& a, const T* x, const T* t,
                                                     typename V::value_type* exps, typename V::value_type* chunk_max) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const bool logit_dot = t == nullptr && a.smoothing;
  acc_t max = kNegInf, sum = 0;
  V weighted_logits(0), weighted_targets(0), weighted_target_logits(0);
  for (int64_t c0 = 0, chunk = 0; c0 < a.C; c0 += kRowChunk, ++chunk) {
    const int64_t len = std::min(kRowChunk, a.C - c0);
    const int64_t full = len - len % W;
    const int tail = static_cast<int>(len - full);
    const T* xc = x + c0;
    // Four independent max chains, so the loads are not serialized behind the max latency.
    V m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
    int64_t i = 0;
    for (; i + 4 * W <= full; i += 4 * W) {
      m0 = vmax(m0, V::load(xc + i));
      m1 = vmax(m1, V::load(xc + i + W));
      m2 = vmax(m2, V::load(xc + i + 2 * W));
      m3 = vmax(m3, V::load(xc + i + 3 * W));
    }
    for (; i < full; i += W) m0 = vmax(m0, V::load(xc + i));
    if (tail) m1 = vmax(m1, V::load_partial(xc + full, tail, kNegInf));
    const acc_t new_max = reduce_max(vmax(vmax(m0, m1), vmax(m2, m3)));
    if (new_max > max) {
      sum *= std::exp(max - new_max);
      max = new_max;
    }
    if (chunk_max) chunk_max[chunk] = max;
    // While every logit so far is -inf, exps are taken relative to 0: exp(-inf - 0) = 0, not exp(-inf + inf) = NaN.
    const V ref(max == kNegInf ? acc_t(0) : max);
    V chunk_sum(0);
    // One vector of the chunk; the tail reads zeros past the row, masked out of every sum.
    auto step = [&](int64_t i, auto is_tail) {
      constexpr bool kTail = decltype(is_tail)::value;
      V xv, e;
      if constexpr (kTail) {
        xv = V::load_partial(xc + i, tail, 0);
        e = select(V::prefix(tail), vexp(xv - ref), V(0));
      } else {
        xv = V::load(xc + i);
        e = vexp(xv - ref);
      }
      chunk_sum = chunk_sum + e;
      if (exps) V::store(exps + c0 + i, e);
      if (logit_dot) {
        if (a.weight) {
          const V w = kTail ? V::load_partial(a.weight + c0 + i, tail, 0) : V::load(a.weight + c0 + i);
          weighted_logits = fmadd(w, xv, weighted_logits);
        } else {
          weighted_logits = weighted_logits + xv;
        }
      }
      if (t) {
        const V tv = kTail ? V::load_partial(t + c0 + i, tail, 0) : V::load(t + c0 + i);
        V wt = smoothed_probability(tv, V(a.label_smoothing), a.C);
        if (a.weight) wt = wt * (kTail ? V::load_partial(a.weight + c0 + i, tail, 0) : V::load(a.weight + c0 + i));
        if constexpr (kTail) wt = select(V::prefix(tail), wt, V(0));
        weighted_targets = weighted_targets + wt;
        weighted_target_logits = fmadd(wt, xv, weighted_target_logits);
      }
    };
    for (int64_t i = 0; i < full; i += W) step(i, std::false_type{});
    if (tail) step(full, std::true_type{});
    sum += reduce_add(chunk_sum);
  }
  return {max,
          sum,
          max + std::log(sum),
          reduce_add(weighted_logits),
          reduce_add(weighted_targets),
          reduce_add(weighted_target_logits)};
}

// Per-thread buffers of the row kernels.
template <class acc_t>
struct RowScratch {
  std::vector<acc_t> exps;       // C (+ one vector of slack) exps of the current row
  std::vector<acc_t> chunk_max;  // running max when each chunk's exps were taken
};

// Forward of one row: lse and loss, and with a.grad the gradient for the uniform upstream scale.
template <class V, class T>
void row_forward(const Typed<V, T>& a, int64_t position, RowScratch<typename V::value_type>& scratch,
                 BlockResult& result) {
  using acc_t = typename V::value_type;
  using Scalar = ScalarVec<acc_t>;
  constexpr int W = V::kWidth;
  const int64_t offset = a.offset(position);
  const T* x = a.logits + offset;
  const T* t = a.target_prob ? a.target_prob + offset : nullptr;
  T* g = a.grad ? a.grad + offset : nullptr;

  int64_t y = -1;
  acc_t target_logit = 0, weight_of_target = 0;
  if (!t) {
    y = a.resolve_class(position, result);
    if (y >= 0) {
      target_logit = static_cast<acc_t>(x[y]);  // before g (maybe x itself) is written
      weight_of_target = a.weight_of(y);
    } else if (!a.lse) {  // ignored, and no lse to report: nothing to compute
      if (g) fill_zero_row<V>(g, a.C);
      if (a.loss) a.loss[position] = static_cast<T>(0);
      return;
    }
  }

  acc_t* exps = g ? scratch.exps.data() : nullptr;
  const RowStatistics<acc_t> st = row_statistics(a, x, t, exps, g ? scratch.chunk_max.data() : nullptr);
  if (a.lse) a.lse[position] = st.lse;
  acc_t loss = 0;
  IndexTargetCoeffs<Scalar> k{};
  if (t) {
    loss = prob_target_loss<Scalar>(st.lse, st.weighted_targets, st.weighted_target_logits).v;
  } else if (y >= 0) {
    k = index_target_coeffs<Scalar>(weight_of_target, a.label_smoothing, a.C);
    loss = index_target_loss_given_smoothing<Scalar>(a.smoothing, k, st.lse, target_logit, a.weight_sum,
                                                     st.weighted_logits)
               .v;
    result.weight_sum += weight_of_target;
  }
  result.loss_sum += loss;
  if (a.loss) a.loss[position] = static_cast<T>(loss);
  if (!g) return;

  // Gradient: p[c] = exps[c] * exp(chunk_max - max) / sum_exp, one factor per chunk.
  //   class index: g = prob_coef p - class_coef w[c] (- target_coef at y)      (xent_math.h, index_grad_coeffs)
  //   probabilities: g = scale (T p - w[c] t'[c])                               (xent_math.h, prob_target_grad)
  const acc_t scale = a.uniform_scale;
  // A gradient written over the logits hits the row still in L2; a fresh one is written past the caches.
  const bool streaming = static_cast<const void*>(g) != static_cast<const void*>(x);
  const IndexGradCoeffs<Scalar> gk = index_grad_coeffs<Scalar>(k, a.weight_sum, scale);
  const acc_t prob_coef = t ? scale * st.weighted_targets : gk.prob_coef.v;
  const bool class_term = !t && a.smoothing;
  auto chunk_factor = [&](int64_t chunk) {
    return prob_coef * std::exp(scratch.chunk_max[chunk] - st.max) / st.sum_exp;
  };
  for (int64_t c0 = 0, chunk = 0; c0 < a.C; c0 += kRowChunk, ++chunk) {
    const int64_t len = std::min(kRowChunk, a.C - c0);
    const V f(chunk_factor(chunk));
    for (int64_t i = 0; i < len; i += W) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, len - i));
      V gv = V::load(exps + c0 + i) * f;
      if (class_term) {
        const V w = !a.weight ? V(1) : lanes == W ? V::load(a.weight + c0 + i) : V::load_partial(a.weight + c0 + i, lanes, 0);
        gv = gv - gk.class_coef.v * w;
      } else if (t) {
        const V tv = lanes == W ? V::load(t + c0 + i) : V::load_partial(t + c0 + i, lanes, 0);
        V wt = smoothed_probability(tv, V(a.label_smoothing), a.C);
        if (a.weight) wt = wt * (lanes == W ? V::load(a.weight + c0 + i) : V::load_partial(a.weight + c0 + i, lanes, 0));
        gv = gv - V(scale) * wt;
      }
      if (lanes == W) {
        store_vector(g + c0 + i, gv, streaming);
      } else {
        V::store_partial(g + c0 + i, gv, lanes);
      }
    }
  }
  if (!t) {
    const acc_t p_y = exps[y] * chunk_factor(y / kRowChunk);
    g[y] = static_cast<T>(p_y - gk.class_coef.v * weight_of_target - gk.target_coef.v);
  }
}

// Backward of one row: g = dloss/dx * grad_loss from p = exp(x - lse).
template <class V, class T>
void row_backward(const Typed<V, T>& a, int64_t position, BlockResult& result) {
  using acc_t = typename V::value_type;
  using Scalar = ScalarVec<acc_t>;
  constexpr int W = V::kWidth;
  const int64_t offset = a.offset(position);
  const T* x = a.logits + offset;
  const T* t = a.target_prob ? a.target_prob + offset : nullptr;
  T* g = a.grad + offset;
  const acc_t scale =
      a.grad_loss ? grad_scale<Scalar>(a.reduction, a.grad_loss[position], a.total_weight).v : a.uniform_scale;
  const V lse(a.lse_in[position]);

  auto for_each_vector = [&](auto&& body) {  // body(index, lanes)
    int64_t i = 0;
    for (; i + W <= a.C; i += W) body(i, W);
    if (i < a.C) body(i, static_cast<int>(a.C - i));
  };
  auto load = [](const auto* p, int lanes) { return lanes == W ? V::load(p) : V::load_partial(p, lanes, 0); };
  auto store = [](T* p, V v, int lanes) {
    if (lanes == W) {
      V::store(p, v);
    } else {
      V::store_partial(p, v, lanes);
    }
  };

  if (t) {
    auto smoothed_weighted = [&](int64_t i, int lanes) {
      V wt = smoothed_probability(load(t + i, lanes), V(a.label_smoothing), a.C);
      return a.weight ? wt * load(a.weight + i, lanes) : wt;
    };
    V weighted_targets(0);
    for_each_vector([&](int64_t i, int lanes) {
      weighted_targets = weighted_targets + select(V::prefix(lanes), smoothed_weighted(i, lanes), V(0));
    });
    const V prob_coef(scale * reduce_add(weighted_targets));
    for_each_vector([&](int64_t i, int lanes) {
      const V p = vexp(load(x + i, lanes) - lse);
      store(g + i, prob_coef * p - V(scale) * smoothed_weighted(i, lanes), lanes);
    });
    return;
  }

  const int64_t y = a.resolve_class(position, result);
  if (y < 0) {
    fill_zero_row<V>(g, a.C);
    return;
  }
  const acc_t target_logit = static_cast<acc_t>(x[y]);
  const acc_t weight_of_target = a.weight_of(y);
  const IndexGradCoeffs<Scalar> gk = index_grad_coeffs<Scalar>(
      index_target_coeffs<Scalar>(weight_of_target, a.label_smoothing, a.C), a.weight_sum, scale);
  const V prob_coef(gk.prob_coef.v), class_coef(gk.class_coef.v);
  for_each_vector([&](int64_t i, int lanes) {
    V gv = prob_coef * vexp(load(x + i, lanes) - lse);
    if (a.smoothing) gv = gv - class_coef * (a.weight ? load(a.weight + i, lanes) : V(1));
    store(g + i, gv, lanes);
  });
  const acc_t p_y = std::exp(target_logit - a.lse_in[position]);
  g[y] = static_cast<T>(gk.prob_coef.v * p_y - gk.class_coef.v * weight_of_target - gk.target_coef.v);
}

// ------------------------------------------------------------------------------------------------- spatial
//
// A tile of kTilePositions consecutive positions is first copied, in the accumulation dtype, to a small buffer
// with the classes kTilePositions apart. In NCHW tensors the classes are H*W apart, usually a multiple of 4 KiB:
// the C lines of a lane block then fall in one cache set, of which L1 and L2 hold only 8 ways, so a second read of
// the logits from the tensor (or prefetching them) would miss. The buffer is read instead, and its padding makes
// partial tiles at the end of a batch entry ordinary vectors. The gradient is built in a buffer alike and copied
// out.

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

template <class V, class T>
LaneTargets<V> lane_targets(const Typed<V, T>& a, int64_t position, int lanes, const typename V::value_type* x,
                            BlockResult& result) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  LaneTargets<V> targets;
  if (lanes == W && a.C <= kMaxGatherClasses &&
      V::Lanes::load_classes(a.target_index + position, a.ignore_index, a.C, targets.cls)) {
    targets.valid = targets.cls.valid();
    targets.weight = a.weight ? V::gather(a.weight, targets.cls, targets.valid) : select(targets.valid, V(1), V(0));
    targets.logit = V::gather(x, targets.cls.offsets(kTilePositions), targets.valid);
    return targets;
  }
  // A partial lane block, or a class out of range (to be reported).
  alignas(64) int32_t cls[W];
  alignas(64) acc_t weight[W];
  alignas(64) acc_t logit[W];
  for (int i = 0; i < W; ++i) {
    const int64_t y = i < lanes ? a.resolve_class(position + i, result) : -1;
    cls[i] = static_cast<int32_t>(y);
    weight[i] = y >= 0 ? a.weight_of(y) : acc_t(0);
    logit[i] = y >= 0 ? x[y * kTilePositions + i] : acc_t(0);
  }
  targets.cls = V::Lanes::load(cls);
  targets.valid = targets.cls.valid();
  targets.weight = V::load(weight);
  targets.logit = V::load(logit);
  return targets;
}

// Stores the first `lanes` lanes of v.
template <class V, class Out>
void store_lanes(Out* out, V v, int lanes) {
  if (lanes == V::kWidth) {
    V::store(out, v);
  } else {
    V::store_partial(out, v, lanes);
  }
}

// Forward of the `lanes` positions from `position` on, whose class c logits are x[c * kTilePositions] in the tile
// buffer (likewise t and g).
template <class V, class T>
void lanes_forward(const Typed<V, T>& a, int64_t position, int lanes, const typename V::value_type* x,
                   const typename V::value_type* t, typename V::value_type* g, typename V::value_type* exps,
                   LaneSums<V>& sums, BlockResult& result) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr int64_t stride = kTilePositions;
  const int64_t C = a.C;
  LaneTargets<V> targets{};
  if (!t) targets = lane_targets(a, position, lanes, x, result);

  V max(kNegInf);
  for (int64_t c = 0; c < C; ++c) max = vmax(max, V::load(x + c * stride));
  // Lanes whose logits are all -inf take exps relative to 0 (exp(-inf) = 0) instead of exp(-inf + inf) = NaN.
  const V ref = select(equal(max, V(kNegInf)), V(0), max);

  V sum(0), weighted_logits(0), weighted_targets(0), weighted_target_logits(0);
  for (int64_t c = 0; c < C; ++c) {
    const V xv = V::load(x + c * stride);
    const V e = vexp(xv - ref);
    sum = sum + e;
    if (exps) V::store(exps + c * W, e);
    if (t) {
      const V wt = smoothed_probability(V::load(t + c * stride), V(a.label_smoothing), C) * a.weight_vec(c);
      weighted_targets = weighted_targets + wt;
      weighted_target_logits = fmadd(wt, xv, weighted_target_logits);
    } else if (a.smoothing) {
      weighted_logits = fmadd(a.weight_vec(c), xv, weighted_logits);
    }
  }
  const V lse = max + vlog(sum);
  if (a.lse) store_lanes(a.lse + position, lse, lanes);

  const IndexTargetCoeffs<V> k = index_target_coeffs(targets.weight, V(a.label_smoothing), C);
  V loss;
  if (t) {
    loss = select(V::prefix(lanes), prob_target_loss(lse, weighted_targets, weighted_target_logits), V(0));
  } else {
    loss = index_target_loss_given_smoothing(a.smoothing, k, lse, targets.logit, V(a.weight_sum), weighted_logits);
    loss = select(targets.valid, loss, V(0));
  }
  sums.add(loss, targets.weight, result);
  if (a.loss) store_lanes(a.loss + position, loss, lanes);
  if (!g) return;

  // Gradient from the kept exps, p = e / sum (see row_forward for the two formulas).
  const V scale(a.uniform_scale);
  if (t) {
    const V prob_coef = scale * weighted_targets / sum;
    for (int64_t c = 0; c < C; ++c) {
      const V wt = smoothed_probability(V::load(t + c * stride), V(a.label_smoothing), C) * a.weight_vec(c);
      V::store(g + c * stride, V::load(exps + c * W) * prob_coef - scale * wt);
    }
    return;
  }
  const IndexGradCoeffs<V> gk = index_grad_coeffs(k, V(a.weight_sum), scale);
  const V prob_coef = gk.prob_coef / sum;
  for (int64_t c = 0; c < C; ++c) {
    V gv = V::load(exps + c * W) * prob_coef;
    if (a.smoothing) gv = gv - gk.class_coef * a.weight_vec(c);
    gv = select(targets.cls.equals(static_cast<int32_t>(c)), gv - gk.target_coef, gv);
    V::store(g + c * stride, select(targets.valid, gv, V(0)));
  }
}

// Backward of a lane block (arguments as lanes_forward).
template <class V, class T>
void lanes_backward(const Typed<V, T>& a, int64_t position, int lanes, const typename V::value_type* x,
                    const typename V::value_type* t, typename V::value_type* g, BlockResult& result) {
  constexpr int W = V::kWidth;
  constexpr int64_t stride = kTilePositions;
  const int64_t C = a.C;
  auto load_lanes = [&](const auto* p) { return lanes == W ? V::load(p) : V::load_partial(p, lanes, 0); };
  const V lse = load_lanes(a.lse_in + position);
  const V scale = a.grad_loss ? grad_scale(a.reduction, load_lanes(a.grad_loss + position), V(a.total_weight))
                              : V(a.uniform_scale);
  if (t) {
    auto smoothed_weighted = [&](int64_t c) {
      return smoothed_probability(V::load(t + c * stride), V(a.label_smoothing), C) * a.weight_vec(c);
    };
    V weighted_targets(0);
    for (int64_t c = 0; c < C; ++c) weighted_targets = weighted_targets + smoothed_weighted(c);
    const V prob_coef = scale * weighted_targets;
    for (int64_t c = 0; c < C; ++c) {
      const V p = vexp(V::load(x + c * stride) - lse);
      V::store(g + c * stride, prob_coef * p - scale * smoothed_weighted(c));
    }
    return;
  }
  const LaneTargets<V> targets = lane_targets(a, position, lanes, x, result);
  const IndexGradCoeffs<V> gk = index_grad_coeffs(
      index_target_coeffs(targets.weight, V(a.label_smoothing), C), V(a.weight_sum), scale);
  for (int64_t c = 0; c < C; ++c) {
    V gv = gk.prob_coef * vexp(V::load(x + c * stride) - lse);
    if (a.smoothing) gv = gv - gk.class_coef * a.weight_vec(c);
    gv = select(targets.cls.equals(static_cast<int32_t>(c)), gv - gk.target_coef, gv);
    V::store(g + c * stride, select(targets.valid, gv, V(0)));
  }
}

// Per-thread buffers of the spatial kernels: one tile of logits, targets and gradient, and a lane block's exps.
template <class acc_t>
struct SpatialScratch {
  std::vector<acc_t> x, t, g, exps;
};

// Copies `count` positions of each class from a tensor (classes class_stride apart) to a tile buffer, converting
// to the accumulation dtype and padding with zeros to whole vectors; or back (without padding).
template <class V, class T>
void load_tile(const T* from, int64_t class_stride, int64_t C, int64_t count, typename V::value_type* tile) {
  constexpr int W = V::kWidth;
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t c = 0; c < C; ++c) {
    // The hardware prefetchers do not follow C streams that alias in the cache; ask for the tile after next.
    // (Low temporal locality: the lines only have to reach the outer caches, the conflicts are in L1 and L2.)
    for (int64_t i = 0; i < kTilePositions; i += kLine) {
      __builtin_prefetch(from + c * class_stride + 2 * kTilePositions + i, 0, 1);
    }
    for (int64_t i = 0; i < count; i += W) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, count - i));
      const V v = lanes == W ? V::load(from + c * class_stride + i) : V::load_partial(from + c * class_stride + i, lanes, 0);
      V::store(tile + c * kTilePositions + i, v);
    }
  }
}

// With `streaming` (a fresh gradient, whose lines are not cached), whole aligned vectors are written past the
// caches; a gradient written over the logits is not: their lines may still be cached.
template <class V, class T>
void store_tile(const typename V::value_type* tile, int64_t C, int64_t count, T* to, int64_t class_stride,
                bool streaming) {
  constexpr int W = V::kWidth;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < count; i += W) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, count - i));
      const V v = V::load(tile + c * kTilePositions + i);
      if (lanes == W) {
        store_vector(to + c * class_stride + i, v, streaming);
      } else {
        V::store_partial(to + c * class_stride + i, v, lanes);
      }
    }
  }
}

template <class V, class T>
void spatial_block(const Typed<V, T>& a, int64_t first, int64_t last, SpatialScratch<typename V::value_type>& scratch,
                   BlockResult& result) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  const bool backward = a.lse_in != nullptr;
  acc_t* exps = a.grad && !backward ? scratch.exps.data() : nullptr;
  acc_t* g = a.grad ? scratch.g.data() : nullptr;
  const acc_t* t = a.target_prob ? scratch.t.data() : nullptr;
  LaneSums<V> sums;
  for (int64_t position = first; position < last;) {
    // Positions of one batch entry are consecutive in memory (position stride 1); a tile never straddles two.
    const int64_t run_end = std::min(last, (position / a.S + 1) * a.S);
    for (int64_t offset = a.offset(position), count; position < run_end; position += count, offset += count) {
      count = std::min(kTilePositions, run_end - position);
      load_tile<V>(a.logits + offset, a.stride_c, a.C, count, scratch.x.data());
      if (t) load_tile<V>(a.target_prob + offset, a.stride_c, a.C, count, scratch.t.data());
      for (int64_t i = 0; i < count; i += W) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, count - i));
        const acc_t* x = scratch.x.data() + i;
        if (backward) {
          lanes_backward(a, position + i, lanes, x, t ? t + i : nullptr, g + i, result);
        } else {
          lanes_forward(a, position + i, lanes, x, t ? t + i : nullptr, g ? g + i : nullptr, exps, sums, result);
        }
      }
      if (g) store_tile<V>(g, a.C, count, a.grad + offset, a.stride_c, a.grad != a.logits);
    }
  }
  sums.flush(result);
}

// -------------------------------------------------------------------------------------------------- driver

// Processes blocks claimed one at a time from next_block until none is left. Blocks are claimed dynamically, so a
// thread that the OS preempts does not hold up the others; each block's result lands in its own slot.
template <class V, class T>
void run_blocks(const KernelArgs& args, std::atomic<int64_t>& next_block) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  const Typed<V, T> a(args);
  const bool backward = args.lse_in != nullptr;
  const int64_t positions = args.N * args.S;
  RowScratch<acc_t> rows;
  SpatialScratch<acc_t> spatial;
  if (args.layout == Layout::kRows) {
    if (args.grad && !backward) {
      rows.exps.resize(args.C + W);
      rows.chunk_max.resize((args.C + kRowChunk - 1) / kRowChunk);
    }
  } else {
    spatial.x.resize(args.C * kTilePositions);
    if (args.target_prob) spatial.t.resize(args.C * kTilePositions);
    if (args.grad) spatial.g.resize(args.C * kTilePositions);
    if (args.grad && !backward) spatial.exps.resize(args.C * W);
  }
  for (int64_t b; (b = next_block.fetch_add(1, std::memory_order_relaxed)) < args.num_blocks;) {
    BlockResult result;
    const int64_t first = b * args.positions_per_block;
    const int64_t last = std::min(positions, first + args.positions_per_block);
    if (args.layout == Layout::kRows) {
      for (int64_t position = first; position < last; ++position) {
        if (backward) {
          row_backward(a, position, result);
        } else {
          row_forward(a, position, rows, result);
        }
      }
    } else {
      spatial_block(a, first, last, spatial, result);
    }
    args.blocks[b] = result;
  }
  V::stream_fence();
}

template <class V, class T>
void run_typed(const KernelArgs& args) {
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), args.num_blocks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { run_blocks<V, T>(args, next_block); });
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
