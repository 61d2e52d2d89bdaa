// CUDA implementations of the fused_xent ops (declared in csrc/fused_xent.cpp): argument handling, the order of
// launches, and registration. Which kernel serves a problem, and in what shape, is planned in xent_plan.cu. The
// kernels are in xent_rows.cu, xent_rows_split.cu, xent_rows_cluster.cu, xent_spatial.cu and xent_reduce.cu; the
// front end's value check, an op of its own, is in xent_checks.cu, and the in-place scaling of a gradient made in the
// forward (scale_unit_grad_) in xent_scale.cu.
//
// No op synchronizes with the host. Class indices outside [0, C) (other than ignore_index) are the front end's to
// reject; the kernels turn them into NaN losses and gradients instead of faulting (see xent_device.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "common/xent_math.h"
#include "common/xent_problem.h"
#include "cuda/xent_launch.h"
#include "cuda/xent_plan.h"

namespace fused_xent {
namespace cuda {
namespace {

uintptr_t address_phase(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) & 15; }

// The parameter block with the inputs filled in; outputs are left null for the caller.
template <typename scalar_t>
XentParams<scalar_t> input_params(const Problem& problem, const at::Tensor& weight_sum, const at::Tensor& grad) {
  using acc_t = acc_type<scalar_t>;
  XentParams<scalar_t> params{};
  params.logits = problem.logits.data_ptr<scalar_t>();
  params.grad = grad.defined() ? grad.data_ptr<scalar_t>() : nullptr;
  params.target_index = problem.prob_target ? nullptr : problem.target.data_ptr<int64_t>();
  params.target_prob = problem.prob_target ? problem.target.data_ptr<scalar_t>() : nullptr;
  params.weight = problem.weight.defined() ? problem.weight.data_ptr<acc_t>() : nullptr;
  params.weight_sum = weight_sum.defined() ? weight_sum.data_ptr<acc_t>() : nullptr;
  params.N = problem.N;
  params.C = problem.C;
  params.S = problem.S;
  params.stride_n = problem.logits.stride(0);
  params.stride_c = problem.logits.stride(1);
  params.stride_s = problem.logits.stride(2);
  params.ignore_index = problem.ignore_index;
  params.reduction = problem.reduction;
  params.label_smoothing = static_cast<acc_t>(problem.label_smoothing);
  // Row kernels load 16-byte vectors when the arrays they read share their address modulo 16 (they share strides),
  // so one scalar head per row reaches a 16-byte boundary in all of them at once. The gradient is written with
  // vectors too when it has that phase as well, else one element at a time (logits that start mid-vector, such as
  // x[1:] with rows of an odd byte size, against a fresh gradient that starts at phase 0).
  const uintptr_t phase = address_phase(params.logits);
  params.vectorize =
      problem.layout == Layout::kRows && (!params.target_prob || address_phase(params.target_prob) == phase);
  params.grad_in_phase = !params.grad || address_phase(params.grad) == phase;
  return params;
}

// W = sum(weight) where the kernels read it (Problem::uses_weight_sum); undefined otherwise: kernels then use C.
at::Tensor weight_sum_if_needed(const Problem& problem) {
  return problem.uses_weight_sum() ? problem.weight.sum() : at::Tensor();
}

// The parameter block of a split forward's last pass, which takes the gradient from the lse its combine wrote, as a
// backward does, and writes nothing else.
template <typename scalar_t>
XentParams<scalar_t> lse_to_gradient(XentParams<scalar_t> params) {
  params.lse_in = params.lse;
  params.lse = nullptr;
  params.loss_rows = nullptr;
  params.loss_partials = nullptr;
  params.weight_partials = nullptr;
  return params;
}

// *total_weight = the sum of weight[target] over the positions not ignored, in one cheap pass over the class indices.
template <typename acc_t>
void sum_target_weights(const Problem& problem, const int64_t* target, const acc_t* weight, acc_t* total_weight,
                        const GpuCapacity& gpu, cudaStream_t stream) {
  const int64_t positions = problem.positions();
  const LaunchShape shape = plan_per_position(positions, kPerPositionThreads, gpu);
  at::Tensor weight_partials = at::empty({shape.grid}, problem.acc_options());
  launch_target_weight<acc_t>(target, positions, problem.ignore_index, problem.C, weight,
                              weight_partials.data_ptr<acc_t>(), shape, stream);
  launch_finalize<acc_t>(nullptr, weight_partials.data_ptr<acc_t>(), shape.grid, total_weight, nullptr,
                         problem.reduction, problem.label_smoothing > 0, stream);
}

struct ForwardResult {
  at::Tensor loss, lse, total_weight;
};

// The forward of every variant. grad defined: also write the gradient for grad_loss = 1 (it may be problem.logits).
// want_lse: lse is an output.
ForwardResult run_forward(const Problem& problem, const at::Tensor& grad, bool want_lse) {
  const bool fused = grad.defined();
  const int64_t positions = problem.positions();
  const at::TensorOptions acc_options = problem.acc_options();
  ForwardResult out;
  out.loss = empty_loss(problem);
  out.lse = want_lse ? at::empty({problem.N, problem.S, 2}, acc_options) : at::Tensor();
  out.total_weight = at::empty({}, acc_options);
  if (positions == 0) {  // launch nothing: empty sum 0, empty mean NaN
    out.total_weight.zero_();
    if (problem.reduction == kReductionMean) out.loss.fill_(std::numeric_limits<double>::quiet_NaN());
    if (problem.reduction == kReductionSum) out.loss.zero_();
    return out;
  }

  const GpuCapacity gpu = gpu_capacity(problem.logits.device().index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor weight_sum = weight_sum_if_needed(problem);
  // total_weight is an output of the plain forward and the gradient's denominator for a fused mean.
  const bool need_total_weight = !fused || problem.reduction == kReductionMean;
  if (problem.prob_target) out.total_weight.fill_(static_cast<double>(positions));

  const at::ScalarType dtype = problem.logits.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_xent_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    XentParams<scalar_t> params = input_params<scalar_t>(problem, weight_sum, grad);
    acc_t* total_weight = out.total_weight.data_ptr<acc_t>();
    params.total_weight = total_weight;
    params.lse = want_lse ? out.lse.data_ptr<acc_t>() : nullptr;
    params.loss_rows = problem.reduction == kReductionNone ? out.loss.data_ptr<acc_t>() : nullptr;
    acc_t* reduced_loss = problem.reduction == kReductionNone ? nullptr : out.loss.data_ptr<acc_t>();

    // Runs `launch`, a kernel of `grid` blocks, with params pointing at fresh per-block partials of the loss (unless
    // reduction none) and, with_weights, of the target weights (the kernel then sums total_weight); then the block
    // that reduces them in order.
    at::Tensor partials;
    auto launch_and_reduce = [&](int64_t grid, bool with_weights, auto&& launch) {
      partials = at::empty({2, grid}, acc_options);
      params.loss_partials = problem.reduction == kReductionNone ? nullptr : partials.data_ptr<acc_t>();
      params.weight_partials = with_weights ? partials.data_ptr<acc_t>() + grid : nullptr;
      launch();
      if (params.loss_partials || params.weight_partials) {
        launch_finalize<acc_t>(params.loss_partials, params.weight_partials, grid, total_weight, reduced_loss,
                               problem.reduction, problem.label_smoothing > 0, stream);
      }
    };

    // Unsplit forward: one kernel takes each position whole (loss, lse, partials, and the gradient when fused). A
    // fused mean over class indices needs total_weight before its gradient: sum_target_weights first, and the kernel
    // sums no weights (that of probability targets, the number of positions, is filled in above).
    auto unsplit_forward = [&](int64_t grid, auto&& launch) {
      const bool weights_first = fused && problem.reduction == kReductionMean && !problem.prob_target;
      if (weights_first) sum_target_weights(problem, params.target_index, params.weight, total_weight, gpu, stream);
      launch_and_reduce(grid, need_total_weight && !problem.prob_target && !weights_first, launch);
    };

    // Split forward (class-index targets): statistics per split, combine per position (lse, loss, partials),
    // reduce, then the gradient from the lse as a backward takes it.
    auto split_forward = [&](const LaunchShape& shape, auto&& launch_stats, auto&& launch_grad) {
      at::Tensor split_stats =
          at::empty({positions * shape.splits * int64_t(sizeof(RowStats<acc_t>) / sizeof(acc_t))}, acc_options);
      auto* split_stats_ptr = reinterpret_cast<RowStats<acc_t>*>(split_stats.data_ptr<acc_t>());
      launch_stats(params, shape, split_stats_ptr, stream);

      at::Tensor gradient_lse;
      if (fused) {
        gradient_lse = at::empty({positions, 2}, acc_options);
        params.lse = gradient_lse.data_ptr<acc_t>();
      }
      const LaunchShape combine = plan_per_position(positions, kPerPositionThreads, gpu);
      launch_and_reduce(combine.grid, need_total_weight, [&] {
        launch_split_combine<scalar_t>(params, combine, shape.splits, split_stats_ptr, stream);
      });

      if (fused) launch_grad(lse_to_gradient(params));
    };

    if (thread_per_position(problem)) {
      const LaunchShape shape = plan_spatial(problem, gpu);
      if (shape.splits > 1) {
        split_forward(shape, launch_spatial_split_stats<scalar_t>, [&](const XentParams<scalar_t>& grad_params) {
          launch_spatial_grad<scalar_t>(grad_params, shape, stream);
        });
      } else {
        unsplit_forward(shape.grid, [&] { launch_spatial_forward<scalar_t>(params, shape, stream); });
      }
      return;
    }

    if (!problem.prob_target) {
      const LaunchShape shape = plan_cluster_forward<scalar_t>(problem, params, gpu);
      if (shape.grid > 0) {
        unsplit_forward(shape.grid, [&] { launch_rows_cluster<scalar_t>(params, shape, stream); });
        return;
      }
    }

    RowsPlan plan = plan_rows(problem, gpu);
    if (plan.shape.splits > 1) {
      split_forward(plan.shape, launch_rows_split_stats<scalar_t>, [&](const XentParams<scalar_t>& grad_params) {
        launch_rows_grad<scalar_t>(grad_params, /*warp_per_row=*/false, plan.shape, stream);
      });
    } else {
      if (fused && !problem.prob_target && !plan.warp_per_row) plan_l2_resident_rows(problem, plan.shape);
      unsplit_forward(plan.shape.grid,
                      [&] { launch_rows_forward<scalar_t>(params, plan.warp_per_row, plan.shape, stream); });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits,
                                                                      const at::Tensor& target,
                                                                      const c10::optional<at::Tensor>& weight,
                                                                      int64_t reduction, int64_t ignore_index,
                                                                      double label_smoothing) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  ForwardResult out = run_forward(problem, at::Tensor(), /*want_lse=*/true);
  return {out.loss, out.lse, out.total_weight};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_grad_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                               const c10::optional<at::Tensor>& weight,
                                                               int64_t reduction, int64_t ignore_index,
                                                               double label_smoothing) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  at::Tensor grad = empty_like_logits(problem);
  ForwardResult out = run_forward(problem, grad, /*want_lse=*/false);
  return {out.loss, grad};
}

at::Tensor cross_entropy_fwd_grad_inplace_cuda(at::Tensor& logits, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& weight, int64_t reduction,
                                               int64_t ignore_index, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  check_inputs_apart_from_logits(problem);
  // The kernels read everything a position needs (including x[target]) before overwriting it.
  ForwardResult out = run_forward(problem, problem.logits, /*want_lse=*/false);
  copy_back(logits, problem.logits);  // make_problem copies logits it cannot stride through
  return out.loss;
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                                  const at::Tensor& total_weight, int64_t reduction, int64_t ignore_index,
                                  double label_smoothing) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Problem problem = make_problem(logits, target, weight, reduction, ignore_index, label_smoothing);
  const int64_t positions = problem.positions();
  check_backward_args(problem, grad_loss, lse, total_weight);

  at::Tensor grad = empty_like_logits(problem);
  if (positions == 0) return grad;

  const auto acc_dtype = problem.acc_dtype();
  // grad_loss may be an expanded view (e.g. from loss.sum()); strides let the kernel read it without a copy.
  at::Tensor upstream = grad_loss.to(problem.acc_dtype());
  upstream = reduction == kReductionNone ? upstream.reshape({problem.N, problem.S}) : upstream.reshape({});
  const int64_t upstream_stride_n = reduction == kReductionNone ? upstream.stride(0) : 0;
  const int64_t upstream_stride_s = reduction == kReductionNone ? upstream.stride(1) : 0;
  const at::Tensor lse_acc = lse.to(acc_dtype).contiguous();
  const at::Tensor total_weight_acc = total_weight.to(acc_dtype).reshape({});
  const at::Tensor weight_sum = weight_sum_if_needed(problem);
  const GpuCapacity gpu = gpu_capacity(problem.logits.device().index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::ScalarType dtype = problem.logits.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_xent_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    XentParams<scalar_t> params = input_params<scalar_t>(problem, weight_sum, grad);
    params.lse_in = lse_acc.data_ptr<acc_t>();
    params.total_weight = total_weight_acc.data_ptr<acc_t>();
    params.grad_loss = upstream.data_ptr<acc_t>();
    params.grad_loss_stride_n = upstream_stride_n;
    params.grad_loss_stride_s = upstream_stride_s;
    if (thread_per_position(problem)) {
      launch_spatial_grad<scalar_t>(params, plan_spatial(problem, gpu), stream);
    } else {
      const RowsPlan plan = plan_rows(problem, gpu);
      launch_rows_grad<scalar_t>(params, plan.warp_per_row, plan.shape, stream);
    }
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace fused_xent

TORCH_LIBRARY_IMPL(FUSED_XENT_CUDA_LIBRARY, FUSED_XENT_CUDA_KEY, m) {
  m.impl("cross_entropy_fwd", &fused_xent::cuda::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &fused_xent::cuda::cross_entropy_bwd_cuda);
  m.impl("cross_entropy_fwd_grad", &fused_xent::cuda::cross_entropy_fwd_grad_cuda);
  m.impl("cross_entropy_fwd_grad_", &fused_xent::cuda::cross_entropy_fwd_grad_inplace_cuda);
}
