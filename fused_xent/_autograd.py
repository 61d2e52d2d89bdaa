"""FusedCrossEntropyFunction, the autograd Function behind cross_entropy: the fused ops' forward in each grad_mode,
and the backward of the logits (and, for probability targets, of the target and weight)."""

import contextlib

import torch

from . import _backends, reference
from ._grad_modes import check_grad_mode
from ._layout import is_dense
from ._ops import scale_unit_grad, unit_grad_scale
from ._validate import has_no_values
from .reference import REDUCTION_MEAN, REDUCTION_NONE


def _scaled_log_probs(grad_loss, logits, lse, total_weight, reduction):
    """log_softmax(x) times the upstream gradient of each position's loss, as the loss scales it (mean: divided by
    total_weight, which is N*S for the probability targets that call this)."""
    scale = grad_loss.to(lse.dtype)
    if reduction == REDUCTION_MEAN:
        scale = scale / total_weight
    if reduction == REDUCTION_NONE:
        scale = scale.unsqueeze(1)
    shift, log_sum = (part.unsqueeze(1) for part in lse.unbind(-1))  # lse in two parts: see reference.log_softmax
    return scale * ((logits.to(lse.dtype) - shift) - log_sum)


def _target_grad(scaled_log_probs, weight, label_smoothing, dtype):
    """d(loss)/d(target) for class-probability targets: -(1-eps) * w[c] * log_softmax(x)[c], scaled like the loss."""
    grad = -(1.0 - label_smoothing) * scaled_log_probs
    if weight is not None:
        grad = grad * weight.to(grad.dtype).view(1, -1, 1)
    return grad.to(dtype)


def _weight_grad(scaled_log_probs, target, label_smoothing, dtype):
    """d(loss)/d(weight) for class-probability targets: -sum over positions of t'[c] * log_softmax(x)[c], scaled."""
    num_classes = target.shape[1]
    smoothed = target.to(scaled_log_probs.dtype) * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -(smoothed * scaled_log_probs).sum((0, 2)).to(dtype)


def _scaled_gradient_made_in_forward(
    ctx, grad: torch.Tensor, grad_loss: torch.Tensor, target: torch.Tensor, ignore_index: int
):
    """d(loss)/d(logits) from the gradient an in_forward or inplace forward made for an upstream gradient of 1:
    that buffer scaled in place and handed to autograd without a copy (no second gradient-sized buffer, and none of
    the work for the usual grad_loss of exactly 1). On a GPU the backend's kernel tests grad_loss on the device, so
    the backward needs no host sync (Liger-Kernel's reads grad_loss back); where no kernel serves (the torch backend,
    logits with gaps written in place) a GPU buffer is always multiplied, and only the CPU's host tests grad_loss,
    for free.

    Out of place where autograd traces or batches the backward: under torch.compile and other tracing (make_fx,
    with fake or real tensors; AOTAutograd), and for upstream gradients batched by
    autograd.grad(is_grads_batched=True) (a vmap over the backward), which differ per entry. (Under torch.func
    transforms of the loss itself the reference ops run instead: see functional._loss_from_reference_ops.)"""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._functorch.is_legacy_batchedtensor(grad_loss) or has_no_values(grad_loss)
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None):
        return scale_unit_grad(grad, grad_loss, target, ignore_index)
    on_device = _backends.backend_ops(ctx.backend).scale_unit_grad_
    if on_device is not None and grad_loss.numel() == 1 and is_dense(grad):
        class_target = None if target.is_floating_point() else target
        on_device(grad, grad_loss.reshape(()).to(grad.dtype), class_target, ignore_index)
    elif grad_loss.numel() != 1 or grad_loss.device.type != "cpu" or grad_loss.item() != 1:
        grad.mul_(unit_grad_scale(grad_loss, target, ignore_index, grad.dtype))
    ctx.gradient_handed_out = True
    return grad


def _refuse_a_second_backward(ctx):
    """The first backward scaled the gradient buffer in place and handed it to autograd (which may have made it a
    leaf's .grad): a second one over the same graph (retain_graph=True) would scale it again. Said here rather than
    left to the saved tensor's version check, which saved-tensor hooks (save_on_cpu) bypass."""
    if getattr(ctx, "gradient_handed_out", False):
        raise RuntimeError(
            f"fused_xent: grad_mode={ctx.grad_mode!r} scales its gradient buffer in place and hands it to autograd "
            "without a copy in the first backward, so a graph runs backward once; to run backward more than once "
            "over one graph (retain_graph=True), use grad_mode='recompute'"
        )


def _below_autograd():
    """This Function is the autograd of the ops it calls: calling them below autograd skips the Python autograd
    kernel that torch.library registered on them (5 us a call), which would only find grad mode off and pass the call
    on. torch.compile traces the plain call."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _saved_tensors(ctx):
    """ctx.saved_tensors, with autograd's version-check failure told in the user's terms (its own message names
    the kernels' internal (N, C, S) view)."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        if ctx.grad_mode == "recompute":
            what = ("the logits, target or weight of this loss were modified in place after the loss was computed; "
                    "grad_mode='recompute' reads them again in backward (F.cross_entropy saves its log-probabilities "
                    "instead): modify a clone, or compute the loss after the in-place op")
        else:
            what = (f"the gradient that grad_mode={ctx.grad_mode!r} wrote in the forward"
                    f"{' over the logits' if ctx.grad_mode == 'inplace' else ''}, or the target, was modified in "
                    "place before backward: modify a clone, or use grad_mode='recompute'")
        raise RuntimeError(f"fused_xent: {what}") from error


class FusedCrossEntropyFunction(torch.autograd.Function):
    """Autograd for the fused kernels; inputs are the canonical views of fused_xent._validate.Problem.

    grad_mode "recompute" keeps only the per-position log-sum-exp (in two parts: see csrc/fused_xent.cpp) and
    recomputes the softmax in backward (one read of the logits each way); "in_forward" writes the gradient into a
    fresh buffer during the forward; "inplace" writes it over the logits, which must then not be used by anything
    else (autograd raises if they are saved by another op, because the logits' version counter moves).
    """

    @staticmethod
    def forward(ctx, logits, target, weight, reduction, ignore_index, label_smoothing, backend, grad_mode, loss_dtype):
        ops = _backends.backend_ops(backend)
        ctx.options = (reduction, ignore_index, label_smoothing)
        ctx.backend = backend
        ctx.grad_mode = grad_mode
        if grad_mode == "recompute":
            with _below_autograd():
                loss, lse, total_weight = ops.fwd(logits, target, weight, reduction, ignore_index, label_smoothing)
            ctx.save_for_backward(logits, target, weight, lse, total_weight)
        elif grad_mode == "in_forward":
            with _below_autograd():
                loss, grad = ops.fwd_grad(logits, target, weight, reduction, ignore_index, label_smoothing)
            ctx.save_for_backward(grad, target)
        elif grad_mode == "inplace":
            # Ops that reach their kernel past autograd do not bump the version counter; bump it so that any other
            # op that saved these logits fails loudly in backward instead of reading a gradient as logits. (Never
            # while compiling: see _grad_modes.grad_mode_to_run.)
            version = logits._version
            loss = ops.fwd_grad_(logits, target, weight, reduction, ignore_index, label_smoothing)
            if logits._version == version:
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(logits, target)
        else:
            check_grad_mode(grad_mode)
        return reference.cast(loss, loss_dtype)  # the ops return the loss as computed, in float32 or float64

    @staticmethod
    def backward(ctx, grad_loss):
        reduction, ignore_index, label_smoothing = ctx.options
        if ctx.grad_mode != "recompute":
            _refuse_a_second_backward(ctx)
            grad, target = _saved_tensors(ctx)
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"fused_xent: grad_mode={ctx.grad_mode!r} cannot be differentiated twice (create_graph=True): "
                    "use grad_mode='recompute'"
                )
            return (_scaled_gradient_made_in_forward(ctx, grad, grad_loss, target, ignore_index),) + (None,) * 8
        logits, target, weight, lse, total_weight = _saved_tensors(ctx)
        logits_dtype, target_dtype = logits.dtype, target.dtype
        ops = _backends.backend_ops(ctx.backend)
        if torch.is_grad_enabled():
            # create_graph=True (double backward, gradient penalties): build the gradients from differentiable
            # PyTorch ops instead of the kernel. The reference recomputes the softmax from the logits; the target's
            # gradient needs the log-sum-exp recomputed as well, so that it too carries a gradient. Half-precision
            # logits and probabilities (autocast) are read in the accumulation dtype once, so that the second-order
            # terms of the paths below meet in float32 and are rounded once, as through PyTorch's float32 copy.
            ops = _backends.backend_ops("torch")
            logits = logits.to(lse.dtype)
            if target.is_floating_point():
                target = target.to(lse.dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                lse = reference.log_softmax(logits)[1]
        grad_logits = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_logits = ops.bwd(
                grad_loss, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing
            )
            grad_logits = reference.cast(grad_logits, logits_dtype)
        # Probability targets only: class indices cannot require grad, and check_weight_grad refuses their weight's.
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            scaled_log_probs = _scaled_log_probs(grad_loss, logits, lse, total_weight, reduction)
            if ctx.needs_input_grad[1]:
                grad_target = _target_grad(scaled_log_probs, weight, label_smoothing, target_dtype)
            if ctx.needs_input_grad[2]:
                grad_weight = _weight_grad(scaled_log_probs, target, label_smoothing, weight.dtype)
        return grad_logits, grad_target, grad_weight, None, None, None, None, None, None
