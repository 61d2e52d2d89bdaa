// The row kernels (class stride 1), see xent_kernels.h. Included by xent_kernels.h inside the instruction set's
// namespace.

// Classes per chunk of a row: 8 KiB of float32, so the second read of a chunk hits L1.
constexpr int64_t kRowChunk = 2048;
// How far ahead of its reads a sweep over a row asks for the logits, into L2. The forward's max sweep of a chunk
// waits on memory and its exp sweep computes from L1; left to the hardware prefetchers, which stop at each 4 KiB
// page, memory would idle through the exp sweep. On the 2-core Xeon dev host (2026-12-02, benchmarks/RESULTS.md)
// the forward of 4096x32000 float32 went from 1.33x the time of x.sum() to about 1.0x (bench.py: 46.3 -> 32.7 ms),
// and the backward of bfloat16 from 92 to 52 ms; 16 to 64 KiB ahead timed alike.
constexpr int64_t kRowPrefetchBytes = 16 * 1024;

template <class T>
inline void prefetch_row_ahead(const T* logits) {
  __builtin_prefetch(logits + kRowPrefetchBytes / int64_t{sizeof(T)}, 0, 1);
}

// Shortest row whose fresh gradient is written with non-temporal stores (see row_forward).
constexpr int64_t kStreamedRowBytes = 16 * 1024;
// Classes whose loss terms a vector lane sums in one chain before adding them to the row's totals: a term of a class
// masked at -1e9 would otherwise swallow every later term of its lane (~C/16 of them, 4e-5 of the loss at 50K).
constexpr int64_t kRowSumClasses = 512;

template <class acc_t>
struct RowStatistics {
  acc_t max;        // of the row (-inf when every logit is -inf)
  acc_t reference;  // what sum_exp is relative to: max, or 0 while max is -inf
  acc_t sum_exp;
  acc_t log_sum;    // log(sum_exp): lse = reference + log_sum
  acc_t weighted_logits;         // sum_c w[c] (x[c] - reference) (class-index targets with smoothing)
  acc_t weighted_targets;        // sum_c w[c] t'[c] (probability targets)
  acc_t weighted_target_logits;  // sum_c w[c] t'[c] (x[c] - reference) (probability targets)
};

// One read of a row: its max, sum of exps and log, the dot products the loss needs, and, when exps is given, every
// exp(x - running max) with the running max of each chunk in chunk_max (so a later pass can rescale them).
template <class V, class T>
RowStatistics<typename V::value_type> row_statistics(const TypedArgs<V, T>& args, const T* x, const T* t,
                                                     typename V::value_type* exps, typename V::value_type* chunk_max) {
  using acc_t = typename V::value_type;
  using Scalar = ScalarVec<acc_t>;
  constexpr int W = V::kWidth;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const bool logit_dot = t == nullptr && args.smoothing;
  acc_t max = kNegInf, previous_ref = 0;
  ExpSum<Scalar> sum;
  // The loss sums are relative to the running reference (xent_math.h): moved when it rises, by their weights' sums.
  CompensatedSum<V> weighted_logits, weighted_target_logits;
  V weights_seen(0), weighted_targets(0);
  for (int64_t c0 = 0, chunk = 0; c0 < args.C; c0 += kRowChunk, ++chunk) {
    const int64_t len = std::min(kRowChunk, args.C - c0);
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
      // sum is 0 until a logit above -inf: a row's first chunk needs no rescaling exp.
      if (sum.total().v != 0) sum.rescale(std::exp(max - new_max));
      max = new_max;
    }
    if (chunk_max) chunk_max[chunk] = max;
    // While every logit so far is -inf, exps are taken relative to 0: exp(-inf - 0) = 0, not exp(-inf + inf) = NaN.
    const acc_t chunk_ref = max == kNegInf ? acc_t(0) : max;
    const V ref(chunk_ref);
    if (chunk_ref != previous_ref) {
      const V rise(previous_ref - chunk_ref);
      if (logit_dot) weighted_logits.add(weights_seen * rise);
      if (t) weighted_target_logits.add(weighted_targets * rise);
      previous_ref = chunk_ref;
    }
    ExpSum<V> chunk_sum;
    // This block's loss terms (see kRowSumClasses), relative to the chunk's reference like the row's totals.
    V block_logits(0), block_weights(0), block_targets(0), block_target_logits(0);
    auto flush_block = [&] {
      weighted_logits.add(block_logits);
      weights_seen = weights_seen + block_weights;
      weighted_targets = weighted_targets + block_targets;
      weighted_target_logits.add(block_target_logits);
      block_logits = block_weights = block_targets = block_target_logits = V(0);
    };
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
      chunk_sum.add(e);  // the small exps kept apart from the max's 1 (ExpSum)
      if (exps) V::store(exps + c0 + i, e);
      if (logit_dot) {
        V w(1);
        if (args.weight) {
          w = kTail ? V::load_partial(args.weight + c0 + i, tail, 0) : V::load(args.weight + c0 + i);
        } else if constexpr (kTail) {
          w = select(V::prefix(tail), V(1), V(0));
        }
        block_logits = fmadd(w, xv - ref, block_logits);  // zero weights past the row
        block_weights = block_weights + w;
      }
      if (t) {
        const V tv = kTail ? V::load_partial(t + c0 + i, tail, 0) : V::load(t + c0 + i);
        V wt = smoothed_probability(tv, V(args.label_smoothing), args.C);
        if (args.weight)
          wt = wt * (kTail ? V::load_partial(args.weight + c0 + i, tail, 0) : V::load(args.weight + c0 + i));
        if constexpr (kTail) wt = select(V::prefix(tail), wt, V(0));
        block_targets = block_targets + wt;
        block_target_logits = fmadd(wt, xv - ref, block_target_logits);
      }
    };
    for (int64_t i = 0; i < full; i += W) {
      prefetch_row_ahead(xc + i);
      step(i, std::false_type{});
      if ((logit_dot || t) && (i + W) % kRowSumClasses == 0) flush_block();
    }
    if (tail) step(full, std::true_type{});
    if (logit_dot || t) flush_block();
    sum.add(ExpSum<Scalar>{reduce_add(chunk_sum.ones), reduce_add(chunk_sum.rest)});
  }
  const acc_t reference = max == kNegInf ? acc_t(0) : max;
  return {max,
          reference,
          sum.total().v,
          sum.log_total().v,
          logit_dot ? reduce_add(weighted_logits.value()) : acc_t(0),
          t ? reduce_add(weighted_targets) : acc_t(0),
          t ? reduce_add(weighted_target_logits.value()) : acc_t(0)};
}

// Per-thread buffers of the row kernels.
template <class acc_t>
struct RowScratch {
  std::vector<acc_t> exps;       // C (+ one vector of slack) exps of the current row
  std::vector<acc_t> chunk_max;  // running max when each chunk's exps were taken
};

// Forward of one row: lse and loss, and with args.grad the gradient for the uniform upstream scale.
template <class V, class T>
void row_forward(const TypedArgs<V, T>& args, int64_t position, RowScratch<typename V::value_type>& scratch,
                 BlockResult& result) {
  using acc_t = typename V::value_type;
  using Scalar = ScalarVec<acc_t>;
  constexpr int W = V::kWidth;
  const int64_t offset = args.offset(position);
  const T* x = args.logits + offset;
  const T* t = args.target_prob ? args.target_prob + offset : nullptr;
  T* g = args.grad ? args.grad + offset : nullptr;

  int64_t y = -1;
  acc_t target_logit = 0, weight_of_target = 0;
  if (!t) {
    y = args.resolve_class(position, result);
    if (y >= 0) {
      target_logit = static_cast<acc_t>(x[y]);  // before g (maybe x itself) is written
      weight_of_target = args.weight_of(y);
    } else {  // ignored (or out of range: the op raises): the row is not read
      record_ignored(args, position, 1);
      if (g) fill_zero_row<V>(g, args.C);
      return;
    }
  }

  acc_t* exps = g ? scratch.exps.data() : nullptr;
  const RowStatistics<acc_t> st = row_statistics(args, x, t, exps, g ? scratch.chunk_max.data() : nullptr);
  if (args.lse) {
    args.lse[2 * position] = st.reference;
    args.lse[2 * position + 1] = st.log_sum;
  }
  acc_t loss = 0;
  IndexTargetCoeffs<Scalar> k{};
  if (t) {
    loss = prob_target_loss<Scalar>(st.log_sum, st.weighted_targets, st.weighted_target_logits).v;
  } else if (y >= 0) {
    k = index_target_coeffs<Scalar>(weight_of_target, args.label_smoothing, args.C);
    loss = index_target_loss_given_smoothing<Scalar>(args.smoothing, k, st.log_sum,
                                                     target_gap<Scalar>(st.reference, st.log_sum, target_logit),
                                                     args.weight_sum, st.weighted_logits)
               .v;
    result.weight_sum += weight_of_target;
  }
  result.loss_sum += loss;
  if (args.loss) args.loss[position] = loss;
  if (!g) return;

  // Gradient: p[c] = exps[c] * exp(chunk_max - max) / sum_exp, one factor per chunk.
  //   class index: g = prob_coef p - class_coef w[c] (- target_coef at y)      (xent_math.h, index_grad_coeffs)
  //   probabilities: g = scale (T p - w[c] t'[c])                               (xent_math.h, prob_target_grad)
  const acc_t scale = args.uniform_scale;
  // A gradient written over the logits hits the row still in L2; a fresh one is written past the caches, but only
  // in long rows: in short ones the lines that the row shares with its neighbours, written by ordinary stores, make
  // up much of the row, and mixing the two kinds of store to one line costs more than streaming saves (measured:
  // 40 classes 2.8x slower, 1000 classes 1.4x; 4096 classes 15% faster).
  const bool streaming =
      static_cast<const void*>(g) != static_cast<const void*>(x) && args.C * int64_t{sizeof(T)} >= kStreamedRowBytes;
  const IndexGradCoeffs<Scalar> gk = index_grad_coeffs<Scalar>(k, args.weight_sum, scale);
  const acc_t prob_coef = t ? scale * st.weighted_targets : gk.prob_coef.v;
  const bool class_term = !t && args.smoothing;
  auto chunk_factor = [&](int64_t chunk) {
    return prob_coef * std::exp(scratch.chunk_max[chunk] - st.max) / st.sum_exp;
  };
  for (int64_t c0 = 0, chunk = 0; c0 < args.C; c0 += kRowChunk, ++chunk) {
    const int64_t len = std::min(kRowChunk, args.C - c0);
    const V f(chunk_factor(chunk));
    for (int64_t i = 0; i < len; i += W) {
      const int lanes = static_cast<int>(std::min<int64_t>(W, len - i));
      V gv = V::load(exps + c0 + i) * f;
      if (class_term) {
        const V w = args.weight ? load_lanes<V>(args.weight + c0 + i, lanes) : V(1);
        gv = gv - gk.class_coef.v * w;
      } else if (t) {
        const V tv = load_lanes<V>(t + c0 + i, lanes);
        V wt = smoothed_probability(tv, V(args.label_smoothing), args.C);
        if (args.weight) wt = wt * load_lanes<V>(args.weight + c0 + i, lanes);
        gv = gv - V(scale) * wt;
      }
      store_lanes(g + c0 + i, gv, lanes, streaming);
    }
  }
  if (!t) {
    const acc_t p_y = exps[y] * chunk_factor(y / kRowChunk);
    g[y] = static_cast<T>(p_y - gk.class_coef.v * weight_of_target - gk.target_coef.v);
  }
}

// Backward of one row: g = dloss/dx * grad_loss from p = exp(x - lse.hi) exp(-lse.lo) (split_lse), the second
// factor folded into the coefficient of p.
template <class V, class T>
void row_backward(const TypedArgs<V, T>& args, int64_t position, BlockResult& result) {
  using acc_t = typename V::value_type;
  using Scalar = ScalarVec<acc_t>;
  constexpr int W = V::kWidth;
  const int64_t offset = args.offset(position);
  const T* x = args.logits + offset;
  const T* t = args.target_prob ? args.target_prob + offset : nullptr;
  T* g = args.grad + offset;
  const acc_t scale = args.grad_loss ? grad_scale<Scalar>(args.reduction, args.grad_loss[position], args.total_weight).v
                                     : args.uniform_scale;
  const SplitLse<Scalar> lse = split_lse<Scalar>(args.lse_in[2 * position], args.lse_in[2 * position + 1]);
  const acc_t lse_factor = std::exp(-lse.lo.v);
  const V lse_hi(lse.hi.v);

  auto for_each_vector = [&](auto&& body) {  // body(index, lanes)
    int64_t i = 0;
    for (; i + W <= args.C; i += W) body(i, W);
    if (i < args.C) body(i, static_cast<int>(args.C - i));
  };

  if (t) {
    auto smoothed_weighted = [&](int64_t i, int lanes) {
      V wt = smoothed_probability(load_lanes<V>(t + i, lanes), V(args.label_smoothing), args.C);
      return args.weight ? wt * load_lanes<V>(args.weight + i, lanes) : wt;
    };
    // T = sum_c w[c] t'[c], compensated: as accurate as the forward's blocked sum (a plain chain drifts by ~C ulps).
    CompensatedSum<V> weighted_targets;
    for_each_vector([&](int64_t i, int lanes) {
      weighted_targets.add(select(V::prefix(lanes), smoothed_weighted(i, lanes), V(0)));
    });
    const V prob_coef(scale * reduce_add(weighted_targets.value()) * lse_factor);
    for_each_vector([&](int64_t i, int lanes) {
      prefetch_row_ahead(x + i);
      const V p = vexp(load_lanes<V>(x + i, lanes) - lse_hi);
      store_lanes(g + i, prob_coef * p - V(scale) * smoothed_weighted(i, lanes), lanes);
    });
    return;
  }

  const int64_t y = args.resolve_class(position, result);
  if (y < 0) {
    fill_zero_row<V>(g, args.C);
    return;
  }
  const acc_t target_logit = static_cast<acc_t>(x[y]);
  const acc_t weight_of_target = args.weight_of(y);
  const IndexGradCoeffs<Scalar> gk = index_grad_coeffs<Scalar>(
      index_target_coeffs<Scalar>(weight_of_target, args.label_smoothing, args.C), args.weight_sum, scale);
  const acc_t prob_coef = gk.prob_coef.v * lse_factor;
  const V prob_coef_vec(prob_coef), class_coef(gk.class_coef.v);
  for_each_vector([&](int64_t i, int lanes) {
    prefetch_row_ahead(x + i);
    V gv = prob_coef_vec * vexp(load_lanes<V>(x + i, lanes) - lse_hi);
    if (args.smoothing) gv = gv - class_coef * (args.weight ? load_lanes<V>(args.weight + i, lanes) : V(1));
    store_lanes(g + i, gv, lanes);
  });
  const acc_t p_y_unscaled = std::exp(target_logit - lse.hi.v);
  g[y] = static_cast<T>(prob_coef * p_y_unscaled - gk.class_coef.v * weight_of_target - gk.target_coef.v);
}
