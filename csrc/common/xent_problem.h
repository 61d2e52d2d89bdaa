// Host-side argument checks and canonical layouts shared by every compiled backend, so that the CPU and CUDA
// kernels see the same, already validated problem.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace fused_xent {

// How the C logits of one position lie in memory.
enum class Layout {
  kRows,     // class stride 1: (N, C) rows and channels_last; a position starts at n*stride(0) + s*stride(2)
  kSpatial,  // position stride 1 (NCHW): consecutive positions are adjacent, classes are stride(1) apart
};

struct Problem {
  at::Tensor logits;  // (N, C, S), Layout below
  at::Tensor target;  // (N, S) int64 contiguous, or (N, C, S) probabilities with the strides of logits
  at::Tensor weight;  // (C,) contiguous in the accumulation dtype, or undefined
  bool prob_target;
  Layout layout;
  int64_t N, C, S;
  int64_t reduction;
  int64_t ignore_index;
  double label_smoothing;

  int64_t positions() const { return N * S; }
  // Accumulation dtype of every statistic: float64 for float64 logits, else float32.
  at::ScalarType acc_dtype() const;
  // The options of the statistics' tensors (loss, lse, total_weight, partials): acc_dtype on the logits' device.
  at::TensorOptions acc_options() const;
  // Whether the kernels read W = sum(weight): only the label-smoothing term of class-index targets does, and without
  // a weight W is C. Not summed otherwise: inverse-frequency weights are inf for a class that never occurs, which
  // PyTorch never reads without smoothing, and 0 * W would be NaN.
  bool uses_weight_sum() const { return weight.defined() && !prob_target && label_smoothing != 0.0; }
};

// Validates the op arguments (dims, dtypes, devices, reduction, smoothing) and brings logits, target and weight to
// the layouts above, copying only logits that are not dense (e.g. a slice of a wider tensor) or have neither unit
// class stride nor unit position stride.
Problem make_problem(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                     int64_t reduction, int64_t ignore_index, double label_smoothing);

// The backward's other arguments: grad_loss, lse and total_weight on the device of the logits, grad_loss of the
// loss's shape ((N, S) for reduction none, one element otherwise), lse (N, S, 2) as cross_entropy_fwd returns it, and
// total_weight of one element.
void check_backward_args(const Problem& problem, const at::Tensor& grad_loss, const at::Tensor& lse,
                         const at::Tensor& total_weight);

// An uninitialized tensor of the shape and strides of problem.logits, for the gradient.
at::Tensor empty_like_logits(const Problem& problem);

// The loss output: (N, S) for reduction none, 0-d otherwise, in the accumulation dtype (see csrc/fused_xent.cpp).
at::Tensor empty_loss(const Problem& problem);

// The in-place ops write the gradient over problem.logits while they still read the weight and the target, so
// neither may share memory with it: refused when their address ranges intersect (a conservative test, which also
// sees memory reached through another storage, such as a NumPy view). The Python front end checks first; this also
// holds for calls it does not see, such as the op inside a graph that torch.compile built.
void check_inputs_apart_from_logits(const Problem& problem);

// The in-place ops' gradient, written into make_problem's copy of the logits, copied back into the caller's logits
// (a no-op when the kernel wrote them directly).
void copy_back(at::Tensor& logits, const at::Tensor& grad);

}  // namespace fused_xent
