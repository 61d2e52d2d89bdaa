// The CPU implementations of the fused_xent ops: argument handling, outputs, the cheap pass over class-index
// targets, and the final in-order reduction of the kernels' per-block results. The kernels themselves are in
// xent_kernels.h, compiled once per instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "common/ceil_div.h"
#include "common/xent_math.h"
#include "common/xent_problem.h"
#include "cpu/denormal_mode.h"
#include "cpu/gradient_memory.h"
#include "cpu/kernel_args.h"
#include "cpu/kernel_plan.h"

namespace fused_xent::cpu {
namespace {

// Logits per kernel block: enough work to hide a block's fixed costs, few enough blocks' worth per thread to
// balance. Blocks, not threads, fix the summation order, so results do not depend on the number of threads.
constexpr int64_t kLogitsPerBlock = int64_t{1} << 16;
// Positions per block of the pass over class-index targets.
constexpr int64_t kTargetsPerBlock = int64_t{1} << 15;

// W = sum(weight) where the kernels read it (Problem::uses_weight_sum), else C, read by nothing. Summed serially:
// ATen's sum splits a long vector across threads, and its last bits would follow the thread count.
double smoothing_weight_sum(const Problem& p) {
  if (!p.uses_weight_sum()) return static_cast<double>(p.C);
  double sum = 0;
  AT_DISPATCH_FLOATING_TYPES(p.weight.scalar_type(), "fused_xent_weight_sum", [&] {
    const scalar_t* weight = p.weight.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < p.C; ++c) sum += static_cast<double>(weight[c]);
  });
  return sum;
}

int64_t positions_per_block(const Problem& problem) {
  const int64_t positions = std::max<int64_t>(1, kLogitsPerBlock / problem.C);
  if (!may_use_lane_kernels(problem.layout, problem.C)) return positions;
  // Blocks of the lane kernels hold whole tiles, those of long lanes only whole vectors: a tile of 32000 classes
  // holds 30 times a block's logits, and (N, C, T) problems of a few hundred positions would get a few blocks.
  const int64_t multiple =
      uses_long_lanes(problem.layout, problem.C, problem.S) ? kMaxVectorWidth : kTilePositions;
  return ceil_div(positions, multiple) * multiple;
}

// Raises for the first out-of-range class index any block reported.
void check_targets(const Problem& problem, const std::vector<BlockResult>& blocks) {
  for (const BlockResult& block : blocks) {
    if (block.first_bad_position < 0) continue;
    const int64_t position = block.first_bad_position;
    TORCH_CHECK_INDEX(false, "fused_xent.cross_entropy: target ", problem.target.const_data_ptr<int64_t>()[position],
                      " at position ", position, " is out of range for ", problem.C, " classes (valid: 0..",
                      problem.C - 1, ", or ignore_index=", problem.ignore_index, ")");
  }
}

// The mean's denominator. Class-index targets: the sum of weight[target] over positions that are not ignored, in
// one cheap pass over the targets that also rejects out-of-range classes before any logit is read or written.
double total_weight(const Problem& problem) {
  if (problem.prob_target) return static_cast<double>(problem.positions());
  const at::Tensor weight = problem.weight.defined() ? problem.weight.to(at::kDouble) : at::Tensor();
  const double* w = weight.defined() ? weight.const_data_ptr<double>() : nullptr;
  const int64_t* target = problem.target.const_data_ptr<int64_t>();
  const int64_t positions = problem.positions();
  std::vector<BlockResult> blocks(ceil_div(positions, kTargetsPerBlock));
  const unsigned caller_denormal_mode = denormal_mode();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first_block, int64_t last_block) {
    const DenormalModeGuard same_subnormals_as_the_caller(caller_denormal_mode);
    for (int64_t b = first_block; b < last_block; ++b) {
      BlockResult& result = blocks[b];
      const int64_t last = std::min(positions, (b + 1) * kTargetsPerBlock);
      for (int64_t position = b * kTargetsPerBlock; position < last; ++position) {
        const int64_t y = target[position];
        if (y == problem.ignore_index) continue;
        if (y < 0 || y >= problem.C) {
          if (result.first_bad_position < 0) result.first_bad_position = position;
          continue;
        }
        result.weight_sum += w ? w[y] : 1.0;
      }
    }
  });
  check_targets(problem, blocks);
  double sum = 0;
  for (const BlockResult& block : blocks) sum += block.weight_sum;
  return sum;
}

struct Launch {
  KernelArgs args{};
  std::vector<BlockResult> blocks;

  explicit Launch(const Problem& p) {
    // The lane kernels, which serve every NCHW layout, hold class indices in 32-bit lanes (xent_spatial.h).
    TORCH_CHECK_NOT_IMPLEMENTED(
        p.layout != Layout::kSpatial || p.prob_target || p.C <= std::numeric_limits<int32_t>::max(),
        "fused_xent: the CPU kernel takes class indices for at most 2^31 - 1 classes when the classes are not ",
        "adjacent in memory (NCHW), got ", p.C, " classes: make them adjacent (x.movedim(1, -1).contiguous()",
        ".movedim(-1, 1)), or use backend='torch'");
    args.dtype = p.logits.scalar_type();
    args.layout = p.layout;
    args.N = p.N;
    args.C = p.C;
    args.S = p.S;
    args.stride_n = p.logits.stride(0);
    args.stride_c = p.logits.stride(1);
    args.stride_s = p.logits.stride(2);
    args.logits = p.logits.const_data_ptr();
    args.target_index = p.prob_target ? nullptr : p.target.const_data_ptr<int64_t>();
    args.target_prob = p.prob_target ? p.target.const_data_ptr() : nullptr;
    args.weight = p.weight.defined() ? p.weight.const_data_ptr() : nullptr;
    args.weight_sum = smoothing_weight_sum(p);
    args.reduction = p.reduction;
    args.ignore_index = p.ignore_index;
    args.label_smoothing = p.label_smoothing;
    args.positions_per_block = positions_per_block(p);
    blocks.resize(ceil_div(p.positions(), args.positions_per_block));
    args.num_blocks = static_cast<int64_t>(blocks.size());
    args.blocks = blocks.data();
  }

  // Runs the kernel, raises for bad class indices, and returns the sum of the per-position losses.
  double run(const Problem& problem) {
    run_kernel(args);
    check_targets(problem, blocks);
    double loss_sum = 0;
    for (const BlockResult& block : blocks) loss_sum += block.loss_sum;
    return loss_sum;
  }

  double target_weight_sum() const {  // the mean's denominator: sum of w[y] over the counted positions
    double sum = 0;
    for (const BlockResult& block : blocks) sum += block.weight_sum;
    return sum;
  }
};

// A sum accumulated in double, rounded to the accumulation dtype: past float32's range it is inf, as the sums of
// PyTorch and of the other backends are (a double beyond the range would make fill_ raise instead).
double in_acc_dtype(const Problem& problem, double value) {
  return problem.acc_dtype() == at::kFloat ? static_cast<double>(static_cast<float>(value)) : value;
}

// Writes the reduced loss (mean or sum) into the 0-d output; reduction none was written per position. The mean is
// that of the rounded sums, divided as PyTorch divides (0/0 NaN, ±inf over negative weights that cancel), but NaN
// over zero target weight with label smoothing, where PyTorch's NLL quotient is 0/0 when each counted target
// weighs 0 (fused_xent/reference.py's _mean_of).
void write_reduced_loss(const Problem& problem, at::Tensor& loss, double loss_sum, double total_weight) {
  if (problem.reduction == kReductionNone) return;
  const double sum = in_acc_dtype(problem, loss_sum);
  if (problem.reduction == kReductionSum) {
    loss.fill_(sum);
  } else {
    const double denominator = in_acc_dtype(problem, total_weight);
    const bool nan_over_zero = denominator == 0 && problem.label_smoothing > 0;
    loss.fill_(nan_over_zero ? std::numeric_limits<double>::quiet_NaN() : in_acc_dtype(problem, sum / denominator));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 int64_t reduction, int64_t ignore_index,
                                                                 double label_smoothing) {
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  at::Tensor loss = empty_loss(problem);
  at::Tensor lse = at::empty({problem.N, problem.S, 2}, problem.acc_options());
  Launch launch(problem);
  launch.args.lse = lse.data_ptr();
  launch.args.loss = reduction == kReductionNone ? loss.data_ptr() : nullptr;
  const double loss_sum = launch.run(problem);
  const double total = problem.prob_target ? static_cast<double>(problem.positions()) : launch.target_weight_sum();
  write_reduced_loss(problem, loss, loss_sum, total);
  return {loss, lse, at::scalar_tensor(in_acc_dtype(problem, total), problem.acc_options())};
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                             const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index,
                             double label_smoothing) {
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  check_backward_args(problem, grad_loss, lse, total_weight);
  const at::Tensor lse_acc = lse.to(problem.acc_dtype()).contiguous();
  at::Tensor grad_loss_acc;
  Launch launch(problem);
  if (reduction == kReductionNone) {
    grad_loss_acc = grad_loss.to(problem.acc_dtype()).contiguous();
    launch.args.grad_loss = grad_loss_acc.const_data_ptr();
  } else {
    launch.args.grad_loss_scalar = grad_loss.item<double>();
  }
  at::Tensor grad = new_gradient(problem);
  launch.args.grad = grad.data_ptr();
  launch.args.lse_in = lse_acc.const_data_ptr();
  launch.args.total_weight = total_weight.item<double>();
  launch.run(problem);
  return grad;
}

// Forward writing the gradient (for grad_loss = 1) into `grad`, which may be problem.logits itself.
at::Tensor forward_with_grad(const Problem& problem, at::Tensor& grad) {
  at::Tensor loss = empty_loss(problem);
  const double total = total_weight(problem);  // first: rejects bad targets before anything is written
  Launch launch(problem);
  launch.args.grad = grad.data_ptr();
  launch.args.loss = problem.reduction == kReductionNone ? loss.data_ptr() : nullptr;
  launch.args.grad_loss_scalar = 1.0;
  launch.args.total_weight = total;
  write_reduced_loss(problem, loss, launch.run(problem), total);
  return loss;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_grad(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight, int64_t reduction,
                                                          int64_t ignore_index, double label_smoothing) {
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  at::Tensor grad = new_gradient(problem);
  at::Tensor loss = forward_with_grad(problem, grad);
  return {loss, grad};
}

at::Tensor cross_entropy_fwd_grad_(at::Tensor& logits, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                                   double label_smoothing) {
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  check_inputs_apart_from_logits(problem);
  at::Tensor grad = problem.logits;
  at::Tensor loss = forward_with_grad(problem, grad);
  copy_back(logits, grad);  // make_problem copies logits it cannot read in place (e.g. column-major)
  return loss;
}

}  // namespace
}  // namespace fused_xent::cpu

TORCH_LIBRARY_IMPL(fused_xent, CPU, m) {
  m.impl("cross_entropy_fwd", &fused_xent::cpu::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &fused_xent::cpu::cross_entropy_bwd);
  m.impl("cross_entropy_fwd_grad", &fused_xent::cpu::cross_entropy_fwd_grad);
  m.impl("cross_entropy_fwd_grad_", &fused_xent::cpu::cross_entropy_fwd_grad_);
}
