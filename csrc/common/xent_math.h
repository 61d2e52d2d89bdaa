// Per-position cross-entropy math shared by the CPU and CUDA kernels (and mirrored by the Triton kernels;
// fused_xent/reference.py restates the semantics independently, from PyTorch's definition). Kernels compute the row
// statistics (max, sum of exp, lse, and the dot products below) in their own vectorized way; the algebra that turns
// them into a loss and a gradient lives here, once.
//
// Notation for one position: x the C logits, lse = log(sum(exp(x))), p = exp(x - lse), w the class weights
// (all 1 without weight), W = sum(w), eps = label_smoothing.
//
// Class-index target y (not ignored):
//   loss = (1-eps) * w[y] * (lse - x[y]) + (eps/C) * (W * lse - sum_c w[c] x[c])
//   dloss/dx[c] = (1-eps) * w[y] * (p[c] - [c == y]) + (eps/C) * (W * p[c] - w[c])
// Probability target t, with t' = (1-eps) * t + eps/C and T = sum_c w[c] t'[c]:
//   loss = T * lse - sum_c w[c] t'[c] x[c]
//   dloss/dx[c] = T * p[c] - w[c] t'[c]
// The smoothing term is skipped when eps == 0 so that -inf logits give +inf (like PyTorch), not inf * 0 = NaN.
// lse - x[y] is taken as (m - x[y]) + log(sum_c exp(x[c] - m)), m the row max (target_gap): lse itself is rounded to
// the spacing of floats around it (~1e-3 at logits of 1e4), which would all land in the loss, as it does not in
// PyTorch's log_softmax. For the same reason the other sums are taken relative to the max m (the reference):
// W * lse - sum_c w[c] x[c] = W * log_sum - sum_c w[c] (x[c] - m), whose two parts are both >= 0, so the logits'
// common offset (and a masked class at -1e9) never enters a difference (likewise with T for probability targets).
// Kernels that meet the max as they go move their sum when it rises: sum a (x - m') = sum a (x - m) + A (m - m'),
// A = sum a so far.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define XENT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define XENT_HOST_DEVICE inline
#endif

namespace fused_xent {

enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// lse - x[y] of a position, from the reference its exps were taken against (its max; 0 when every logit is -inf)
// and log_sum = log(sum_c exp(x[c] - reference)).
template <typename acc_t>
XENT_HOST_DEVICE acc_t target_gap(acc_t reference, acc_t log_sum, acc_t target_logit) {
  return (reference - target_logit) + log_sum;
}

// The loss of a class-index position is target_coef * (lse - x[y]) + smooth_coef * (W * lse - sum_c w[c] x[c]).
template <typename acc_t>
struct IndexTargetCoeffs {
  acc_t target_coef;  // (1 - eps) * w[y]
  acc_t smooth_coef;  // eps / C
};

template <typename acc_t>
XENT_HOST_DEVICE IndexTargetCoeffs<acc_t> index_target_coeffs(acc_t weight_of_target, acc_t label_smoothing,
                                                              int64_t num_classes) {
  return {(acc_t(1) - label_smoothing) * weight_of_target, label_smoothing / acc_t(num_classes)};
}

// Same as index_target_loss below, for callers that know whether smoothing is on for the whole problem
// (label_smoothing != 0): SIMD code, whose acc_t is a vector of positions that cannot be compared to 0 in an `if`.
template <typename acc_t>
XENT_HOST_DEVICE acc_t index_target_loss_given_smoothing(bool smoothing, IndexTargetCoeffs<acc_t> k,
                                                         acc_t log_sum, acc_t target_gap, acc_t weight_sum,
                                                         acc_t relative_weighted_logit_sum) {
  acc_t loss = k.target_coef * target_gap;
  if (smoothing) loss = loss + k.smooth_coef * (weight_sum * log_sum - relative_weighted_logit_sum);
  return loss;
}

// target_gap = lse - x[y] (see target_gap); log_sum = lse - m and relative_weighted_logit_sum = sum_c w[c] (x[c] - m)
// for the position's reference m (see above), only read when smoothing is on.
template <typename acc_t>
XENT_HOST_DEVICE acc_t index_target_loss(IndexTargetCoeffs<acc_t> k, acc_t log_sum, acc_t target_gap,
                                         acc_t weight_sum, acc_t relative_weighted_logit_sum) {
  return index_target_loss_given_smoothing(k.smooth_coef != acc_t(0), k, log_sum, target_gap, weight_sum,
                                           relative_weighted_logit_sum);
}

// dloss/dx[c] = prob_coef * p[c] - class_coef * w[c] - [c == y] * target_coef, each coefficient already multiplied
// by scale (the upstream gradient, divided by the mean's denominator for reduction mean): constant along a row.
template <typename acc_t>
struct IndexGradCoeffs {
  acc_t prob_coef;    // scale * ((1-eps) w[y] + (eps/C) W)
  acc_t class_coef;   // scale * eps/C, multiplies w[c] (1 without weights)
  acc_t target_coef;  // scale * (1-eps) w[y], subtracted at c == y
};

template <typename acc_t>
XENT_HOST_DEVICE IndexGradCoeffs<acc_t> index_grad_coeffs(IndexTargetCoeffs<acc_t> k, acc_t weight_sum, acc_t scale) {
  return {scale * (k.target_coef + k.smooth_coef * weight_sum), scale * k.smooth_coef, scale * k.target_coef};
}

// t'[c] = (1-eps) t[c] + eps/C.
template <typename acc_t>
XENT_HOST_DEVICE acc_t smoothed_probability(acc_t target_prob, acc_t label_smoothing, int64_t num_classes) {
  return (acc_t(1) - label_smoothing) * target_prob + label_smoothing / acc_t(num_classes);
}

// Probability targets: loss = T * lse - sum_c w[c] t'[c] x[c], with T = sum_c w[c] t'[c], from log_sum = lse - m and
// sum_c w[c] t'[c] (x[c] - m) for the position's reference m (see above).
template <typename acc_t>
XENT_HOST_DEVICE acc_t prob_target_loss(acc_t log_sum, acc_t weighted_target_sum,
                                        acc_t relative_weighted_target_logit_sum) {
  return weighted_target_sum * log_sum - relative_weighted_target_logit_sum;
}

// Probability targets: dloss/dx[c] = scale * (T * p[c] - w[c] t'[c]).
template <typename acc_t>
XENT_HOST_DEVICE acc_t prob_target_grad(acc_t scale, acc_t weighted_target_sum, acc_t prob, acc_t weighted_target) {
  return scale * (weighted_target_sum * prob - weighted_target);
}

// The saved statistics of a position, (reference, log_sum), as the recomputing backward takes them. Their float sum
// lse is rounded by up to |lse| 2^-24 (~1e-3 at logits of 1e4), and p = exp(x - lse) would carry that error into
// every probability, and into a near-certain target's p - 1 entirely. Instead lse = hi + lo exactly (Knuth's
// two-sum, no cancellation for any magnitudes), p[c] = exp(x[c] - hi) * exp(-lo): x - hi is a difference of two
// floats, rounded relative to itself, and exp(-lo), one per position, goes into the coefficient of p.
// |lo| <= min(log_sum, spacing of hi / 2). Non-finite rows give a NaN lo, where p is NaN already.
template <typename acc_t>
struct SplitLse {
  acc_t hi, lo;
};

template <typename acc_t>
XENT_HOST_DEVICE SplitLse<acc_t> split_lse(acc_t reference, acc_t log_sum) {
  const acc_t hi = reference + log_sum;
  const acc_t reference_part = hi - log_sum;
  const acc_t log_sum_part = hi - reference_part;
  return {hi, (reference - reference_part) + (log_sum - log_sum_part)};
}

// Upstream-gradient scale shared by a whole position: grad_loss[i] for none, grad_loss / total_weight for mean.
template <typename acc_t>
XENT_HOST_DEVICE acc_t grad_scale(int64_t reduction, acc_t grad_loss, acc_t total_weight) {
  return reduction == kReductionMean ? grad_loss / total_weight : grad_loss;
}

}  // namespace fused_xent
