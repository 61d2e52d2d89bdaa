// The schemas of the four cross-entropy ops, of the value check and of the in-place scaling of a gradient (what each
// argument and output holds: csrc/fused_xent.cpp), shared with the host emulation of the CUDA kernels
// (tests/host/emulated_ops.cpp), which defines them in a library of its own.
#pragma once

namespace fused_xent {

inline constexpr const char* kForwardSchema =
    "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int reduction, int ignore_index, "
    "float label_smoothing) -> (Tensor loss, Tensor lse, Tensor total_weight)";
inline constexpr const char* kBackwardSchema =
    "cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
    "Tensor total_weight, int reduction, int ignore_index, float label_smoothing) -> Tensor";
inline constexpr const char* kForwardGradSchema =
    "cross_entropy_fwd_grad(Tensor logits, Tensor target, Tensor? weight, int reduction, int ignore_index, "
    "float label_smoothing) -> (Tensor loss, Tensor grad)";
inline constexpr const char* kForwardGradInplaceSchema =
    "cross_entropy_fwd_grad_(Tensor(a!) logits, Tensor target, Tensor? weight, int reduction, "
    "int ignore_index, float label_smoothing) -> Tensor loss";
// The front end's value check on a GPU (csrc/cuda/xent_checks.cu): flags [a class index out of range, a NaN weight],
// int64 in pinned host memory, written by a copy queued behind the check's kernel.
inline constexpr const char* kValueCheckSchema =
    "value_check(Tensor? target, Tensor? weight, int ignore_index, int num_classes) -> Tensor";
// The backward of cross_entropy_fwd_grad on a GPU (csrc/cuda/xent_scale.cu): grad *= grad_loss in place, unless
// grad_loss is exactly 1, decided on the device; an ignored position (class-index target) stays exactly 0.
inline constexpr const char* kScaleUnitGradSchema =
    "scale_unit_grad_(Tensor(a!) grad, Tensor grad_loss, Tensor? target, int ignore_index) -> ()";

}  // namespace fused_xent
