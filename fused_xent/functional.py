"""`cross_entropy`: a drop-in for torch.nn.functional.cross_entropy backed by a fused kernel."""

import torch
from torch.nn import _reduction

from . import _backends
from ._ops import scale_unit_grad
from ._validate import check_values, prepare
from .reference import REDUCTION_MEAN, REDUCTION_NONE

GRAD_MODES = ("recompute", "in_forward", "inplace")


def _target_grad(grad_loss, logits, lse, total_weight, weight, reduction, label_smoothing):
    """d(loss)/d(target) for class-probability targets: -(1-eps) * w[c] * log_softmax(x)[c], scaled like the loss."""
    scale = grad_loss.to(lse.dtype)
    if reduction == REDUCTION_MEAN:
        scale = scale / total_weight
    if reduction == REDUCTION_NONE:
        scale = scale.unsqueeze(1)
    log_probs = logits.to(lse.dtype) - lse.unsqueeze(1)
    grad = -(1.0 - label_smoothing) * scale * log_probs
    if weight is not None:
        grad = grad * weight.to(lse.dtype).view(1, -1, 1)
    return grad.to(logits.dtype)


def _autocast_to_float32(input) -> bool:
    return (
        isinstance(input, torch.Tensor) and input.dtype in (torch.float16, torch.bfloat16)
        and torch.is_autocast_enabled(input.device.type)
    )


def _unit_grad_is_exact(grad_loss: torch.Tensor) -> bool:
    """True when grad_loss is the scalar 1 (loss.backward()): the gradient made in the forward is then the answer
    as it is. On a GPU this reads one value back (a host sync, as Liger-Kernel's backward does), far cheaper than
    the read and write of the whole gradient it saves. Not inside torch.compile or CUDA graph capture, where a sync
    is not allowed: there the gradient is always rescaled."""
    if grad_loss.numel() != 1 or grad_loss.device.type not in ("cpu", "cuda") or torch.compiler.is_compiling():
        return False
    if grad_loss.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(grad_loss == 1)


class FusedCrossEntropyFunction(torch.autograd.Function):
    """Autograd for the fused kernels; inputs are the canonical views of fused_xent._validate.Problem.

    grad_mode "recompute" keeps only the per-position log-sum-exp and recomputes the softmax in backward (one read
    of the logits each way); "in_forward" writes the gradient into a fresh buffer during the forward;
    "inplace" writes it over the logits, which must then not be used by anything else (autograd raises if they are
    saved by another op, because the logits' version counter moves).
    """

    @staticmethod
    def forward(ctx, logits, target, weight, reduction, ignore_index, label_smoothing, backend, grad_mode):
        ops = _backends.backend_ops(backend)
        ctx.options = (reduction, ignore_index, label_smoothing)
        ctx.backend = backend
        ctx.grad_mode = grad_mode
        if grad_mode == "recompute":
            loss, lse, total_weight = ops.fwd(logits, target, weight, reduction, ignore_index, label_smoothing)
            ctx.save_for_backward(logits, target, weight, lse, total_weight)
        elif grad_mode == "in_forward":
            loss, grad = ops.fwd_grad(logits, target, weight, reduction, ignore_index, label_smoothing)
            ctx.save_for_backward(grad)
        else:
            version = logits._version
            loss = ops.fwd_grad_(logits, target, weight, reduction, ignore_index, label_smoothing)
            if logits._version == version:
                # Ops that reach their kernel past autograd do not bump the counter; do it so any other op that
                # saved these logits fails loudly in backward instead of reading a gradient as logits.
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        reduction, ignore_index, label_smoothing = ctx.options
        if ctx.grad_mode != "recompute":
            (grad,) = ctx.saved_tensors
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"fused_xent: grad_mode={ctx.grad_mode!r} cannot be differentiated twice (create_graph=True): "
                    "use grad_mode='recompute'"
                )
            if ctx.needs_input_grad[1]:
                raise RuntimeError(
                    f"fused_xent: grad_mode={ctx.grad_mode!r} gives no gradient for the target; use "
                    "grad_mode='recompute' to differentiate through probability targets"
                )
            if _unit_grad_is_exact(grad_loss):
                return grad, None, None, None, None, None, None, None
            return scale_unit_grad(grad, grad_loss, reduction), None, None, None, None, None, None, None
        logits, target, weight, lse, total_weight = ctx.saved_tensors
        ops = _backends.backend_ops(ctx.backend)
        if torch.is_grad_enabled():
            # create_graph=True (double backward, gradient penalties): build the gradient from differentiable
            # PyTorch ops instead of the kernel, with the log-sum-exp recomputed so it carries its own gradient.
            ops = _backends.backend_ops("torch")
            lse = torch.logsumexp(logits.to(lse.dtype), dim=1)
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = ops.bwd(
                grad_loss, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing
            )
        if ctx.needs_input_grad[1]:
            grad_target = _target_grad(grad_loss, logits, lse, total_weight, weight, reduction, label_smoothing)
        return grad_logits, grad_target, None, None, None, None, None, None


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    backend=None,
    grad_mode="recompute",
):
    """Same arguments and result as torch.nn.functional.cross_entropy, computed by a fused kernel.

    backend: "auto" (default, or the FUSED_XENT_BACKEND environment variable), "cuda", "triton", "cpu" or "torch".
    grad_mode: "recompute" (default), "in_forward" (gradient computed during the forward into a new buffer) or
        "inplace" (gradient written over `input`, which must not be read afterwards; saves memory and time).
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"fused_xent.cross_entropy: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if _autocast_to_float32(input):
        # PyTorch's autocast runs cross entropy in float32 (inputs cast, float32 result); do the same.
        input = input.float()
        weight = None if weight is None else weight.float()
        target = target.float() if isinstance(target, torch.Tensor) and target.is_floating_point() else target
    problem = prepare(input, target, weight, ignore_index, reduction, label_smoothing)
    ops = _backends.resolve(backend, problem.logits.device)
    check_values(problem, check_targets=not ops.checks_targets)
    if grad_mode == "inplace" and problem.logits.untyped_storage().data_ptr() != input.untyped_storage().data_ptr():
        raise ValueError(
            "fused_xent.cross_entropy: grad_mode='inplace' needs logits that can be viewed as (N, C, S) without a "
            "copy (and of the dtype of the target, for probability targets)"
        )
    loss = FusedCrossEntropyFunction.apply(
        problem.logits, problem.target, problem.weight, problem.reduction, problem.ignore_index,
        problem.label_smoothing, ops.name, grad_mode,
    )
    return loss.view(problem.loss_shape) if problem.reduction == REDUCTION_NONE else loss
