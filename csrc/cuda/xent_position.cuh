// Per-position helpers shared by the row, split-row and spatial kernels: where a position lies, its target as
// the forward and backward read it, its loss and outputs, and the coefficients of its gradient row.
#pragma once

#include "cuda/xent_groups.cuh"

namespace fused_xent {
namespace cuda {

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
// range (coalesced along a unit position stride). Host-callable for tests/host/split_classes.cu.
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

}  // namespace cuda
}  // namespace fused_xent
