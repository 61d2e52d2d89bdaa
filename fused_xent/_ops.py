"""Fake (meta) kernels and autograd for the compiled ops, so that they trace under torch.compile and pass
torch.library.opcheck. The ops are declared in csrc/fused_xent.cpp."""

import torch

from ._layout import kernel_logits
from .reference import REDUCTION_NONE, accumulation_dtype


def kernel_strides_like(logits: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the kernels lay out a gradient (see _layout.kernel_logits)."""
    return torch.empty_like(kernel_logits(logits)[0])


def empty_loss(logits: torch.Tensor, reduction: int) -> torch.Tensor:
    """The ops' loss: (N, S) or 0-d, in the accumulation dtype (see csrc/fused_xent.cpp)."""
    shape = (logits.shape[0], logits.shape[2]) if reduction == REDUCTION_NONE else ()
    return logits.new_empty(shape, dtype=accumulation_dtype(logits.dtype))


def fake_fwd(logits, target, weight, reduction, ignore_index, label_smoothing):
    acc = accumulation_dtype(logits.dtype)
    lse = logits.new_empty((logits.shape[0], logits.shape[2], 2), dtype=acc)
    return empty_loss(logits, reduction), lse, logits.new_empty((), dtype=acc)


def fake_bwd(grad_loss, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing):
    return kernel_strides_like(logits)


def fake_fwd_grad(logits, target, weight, reduction, ignore_index, label_smoothing):
    return empty_loss(logits, reduction), kernel_strides_like(logits)


def fake_fwd_grad_(logits, target, weight, reduction, ignore_index, label_smoothing):
    return empty_loss(logits, reduction)


def unit_grad_scale(grad_loss: torch.Tensor, target: torch.Tensor, ignore_index: int, dtype: torch.dtype):
    """The factor that takes the gradient computed for an upstream gradient of 1 to the one for grad_loss (0-d, or
    (N, S) for reduction none), broadcast against (N, C, S). An ignored position's factor is 0, so its gradient
    stays exactly 0 whatever its upstream gradient, as in PyTorch, where nothing flows into it: 0 * inf or 0 * NaN
    (an overflowed loss scale) would be NaN."""
    scale = grad_loss.to(dtype)
    if not target.is_floating_point():
        scale = torch.where(target != ignore_index, scale, 0)
    return scale.unsqueeze(1) if scale.dim() else scale


def scale_unit_grad(grad: torch.Tensor, grad_loss: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """d(loss)/d(logits) for an upstream gradient, from the gradient computed for an upstream gradient of 1, in a
    new tensor (see unit_grad_scale)."""
    return grad * unit_grad_scale(grad_loss, target, ignore_index, grad.dtype)


def register_autograd(prefix: str = ""):
    """Autograd for one family of ops: the compiled ones (no prefix) or the Triton ones ("triton_")."""
    name = f"fused_xent::{prefix}cross_entropy"
    bwd_op = getattr(torch.ops.fused_xent, f"{prefix}cross_entropy_bwd")

    def setup_fwd(ctx, inputs, output):
        logits, target, weight, reduction, ignore_index, label_smoothing = inputs
        _, lse, total_weight = output
        ctx.mark_non_differentiable(lse, total_weight)
        ctx.save_for_backward(logits, target, weight, lse, total_weight)
        ctx.options = (reduction, ignore_index, label_smoothing)

    def backward_fwd(ctx, grad_loss, grad_lse, grad_total_weight):
        logits, target, weight, lse, total_weight = ctx.saved_tensors
        grad = bwd_op(grad_loss, logits, target, weight, lse, total_weight, *ctx.options)
        return grad, None, None, None, None, None

    def setup_fwd_grad(ctx, inputs, output):
        logits, target, weight, reduction, ignore_index, label_smoothing = inputs
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(grad, target)
        ctx.ignore_index = ignore_index

    def backward_fwd_grad(ctx, grad_loss, grad_grad):
        # Never in place: backward may run more than once (retain_graph).
        grad, target = ctx.saved_tensors
        return scale_unit_grad(grad, grad_loss, target, ctx.ignore_index), None, None, None, None, None

    torch.library.register_autograd(f"{name}_fwd", backward_fwd, setup_context=setup_fwd)
    torch.library.register_autograd(f"{name}_fwd_grad", backward_fwd_grad, setup_context=setup_fwd_grad)


def register_compiled():
    """Fake kernels and autograd for the four compiled ops (call once, after fused_xent._C loaded)."""
    name = "fused_xent::cross_entropy"
    torch.library.register_fake(f"{name}_fwd", fake_fwd)
    torch.library.register_fake(f"{name}_bwd", fake_bwd)
    torch.library.register_fake(f"{name}_fwd_grad", fake_fwd_grad)
    torch.library.register_fake(f"{name}_fwd_grad_", fake_fwd_grad_)
    register_autograd()
