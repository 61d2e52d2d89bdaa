"""`cross_entropy`: a drop-in for torch.nn.functional.cross_entropy backed by a fused kernel."""

import contextlib
import dataclasses

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad
from torch.nn import _reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _backends, reference
from ._autocast import autocast_arguments, autocast_enabled
from ._grad_modes import check_grad_mode, check_weight_grad, grad_mode_to_run
from ._layout import is_dense, kernel_logits
from ._ops import scale_unit_grad, unit_grad_scale
from ._validate import REDUCTIONS, check_values, has_no_values, prepare, start_value_check
from .reference import REDUCTION_MEAN, REDUCTION_NONE

_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}


def _scaled_log_probs(grad_loss, logits, lse, total_weight, reduction):
    """log_softmax(x) times the upstream gradient of each position's loss, as the loss scales it (mean: / N*S)."""
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


def _scaled_gradient_made_in_forward(ctx, grad: torch.Tensor, grad_loss: torch.Tensor, target: torch.Tensor):
    """d(loss)/d(logits) from the gradient an in_forward or inplace forward made for an upstream gradient of 1:
    that buffer scaled in place and handed to autograd without a copy (no second gradient-sized buffer, and none of
    the work for the usual grad_loss of exactly 1). On a GPU the backend's kernel tests grad_loss on the device, so
    the backward needs no host sync (Liger-Kernel's reads grad_loss back); where no kernel serves (the torch backend,
    logits with gaps written in place) a GPU buffer is always multiplied, and only the CPU's host tests grad_loss,
    for free.

    Out of place where autograd traces or batches the backward: under torch.compile and other tracing (make_fx,
    with fake or real tensors; AOTAutograd), and for upstream gradients batched by
    autograd.grad(is_grads_batched=True) (a vmap over the backward), which differ per entry. (Under torch.func
    transforms of the loss itself the reference ops run instead: see _loss_from_reference_ops.)"""
    ignore_index = ctx.options[1]
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


def _function_transform_active(*tensors) -> bool:
    """True under a torch.func transform (grad, vmap, jacrev, ...) or with forward-mode AD tangents on an input
    (also while torch.compile traces one). Tangents live only inside a forward-AD level (forward_ad.dual_level
    clears them on exit): outside one, the inputs are not unpacked (3 us a call)."""
    if torch._C._are_functorch_transforms_active():
        return True
    if not torch.compiler.is_compiling() and forward_ad._current_level < 0:  # dynamo never reads (guards) the level
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _vmap_active() -> bool:
    """True inside vmap, where values differ per batch entry and no Python branch may depend on them."""
    return any(level.key() == TransformType.Vmap for level in retrieve_all_functorch_interpreters())


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
            # while compiling: see grad_mode_to_run.)
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
            return (_scaled_gradient_made_in_forward(ctx, grad, grad_loss, target),) + (None,) * 8
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
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # probability targets only (see cross_entropy)
            scaled_log_probs = _scaled_log_probs(grad_loss, logits, lse, total_weight, reduction)
            if ctx.needs_input_grad[1]:
                grad_target = _target_grad(scaled_log_probs, weight, label_smoothing, target_dtype)
            if ctx.needs_input_grad[2]:
                grad_weight = _weight_grad(scaled_log_probs, target, label_smoothing, weight.dtype)
        return grad_logits, grad_target, grad_weight, None, None, None, None, None, None


def _functorch_unwrapped(tensor):
    """The plain tensor under every torch.func wrapper of `tensor` (vmap's batch dimensions included)."""
    while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def _loss_from_reference_ops(problem, loss_dtype):
    """The loss under a function transform, which needs rules (batching, forward derivatives) for every op it meets:
    the fused kernels have none, the reference implementation's PyTorch ops have them all. The value checks read
    their verdict on the host, which vmap does not allow of its batched tensors: under vmap they read the plain
    tensors beneath (every batch entry at once), so a bad class raises there as in PyTorch."""
    if torch.compiler.is_compiling():
        pass  # the value checks are off while torch.compile traces (start_value_check), and Dynamo cannot unwrap
    elif _vmap_active():
        beneath = dataclasses.replace(problem, target=_functorch_unwrapped(problem.target),
                                      weight=_functorch_unwrapped(problem.weight))
        try:
            check_values(beneath, check_targets=True)
        except IndexError as error:
            raise IndexError(f"{error}; under vmap, positions count the targets of all batch entries") from None
    else:
        check_values(problem, check_targets=True)
    if (problem.weight is not None and not problem.prob_target
            and forward_ad.unpack_dual(problem.weight).tangent is not None):
        # PyTorch's forward-mode derivative with respect to the weight of class indices counts the weight of its
        # smoothing term only, not that of its nll_loss, whose weight it treats as a constant (its reverse mode
        # refuses, as check_weight_grad does): PyTorch's own composition gives that bit for bit.
        loss = torch.nn.functional.cross_entropy(
            problem.logits, problem.target, problem.weight, ignore_index=problem.ignore_index,
            reduction=_REDUCTION_NAMES[problem.reduction], label_smoothing=problem.label_smoothing,
        )
    else:
        loss = reference.cross_entropy_fwd(
            problem.logits, problem.target, problem.weight, problem.reduction, problem.ignore_index,
            problem.label_smoothing,
        )[0]
    loss = reference.cast(loss, loss_dtype)
    return loss.view(problem.loss_shape) if problem.reduction == REDUCTION_NONE else loss


def _no_classes_as_pytorch(input, target, weight, ignore_index, reduction, label_smoothing):
    """PyTorch's answer for logits with no classes. Class indices over one spatial dim take its 2-D spatial kernel
    through a trailing dim of 1: its 1-D one reshapes (N, 0, d) with a -1 it cannot infer and fails ("size
    mismatch"), where every other rank gives the empty, 0 or NaN answer."""
    one_spatial_dim = input.dim() == 3 and not target.is_floating_point()
    if one_spatial_dim:
        input, target = input.unsqueeze(-1), target.unsqueeze(-1)
    loss = torch.nn.functional.cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    return loss.squeeze(-1) if one_spatial_dim and reduction == "none" else loss


def _unbatched_ignored_mean_as_pytorch(loss, input, problem):
    """PyTorch's CUDA kernel for one unbatched position gives a mean of 0 when its target is ignore_index, where its
    CPU kernel and every batched kernel give 0/0 = NaN (with label smoothing the smoothing term's 0/0 makes it NaN
    on CUDA too): the same here, on the device, without reading the target on the host."""
    if (input.dim() != 1 or not loss.is_cuda or problem.reduction != REDUCTION_MEAN or problem.label_smoothing != 0
            or problem.prob_target):
        return loss
    return torch.where(problem.target.reshape(()) == problem.ignore_index, torch.zeros_like(loss), loss)


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
    if has_torch_function_variadic(input, target, weight):  # tensor subclasses see this call, as for PyTorch's
        return handle_torch_function(
            cross_entropy, (input, target, weight), input, target, weight=weight, size_average=size_average,
            ignore_index=ignore_index, reduce=reduce, reduction=reduction, label_smoothing=label_smoothing,
            backend=backend, grad_mode=grad_mode,
        )
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    check_grad_mode(grad_mode)
    float32_logits = False
    if autocast_enabled(input):
        input, target, weight, float32_logits = autocast_arguments(input, target, weight, grad_mode)
    problem = prepare(input, target, weight, ignore_index, reduction, label_smoothing, float32_logits)
    loss_dtype = torch.float32 if float32_logits else problem.logits.dtype
    ops = _backends.resolve(backend, problem.logits.device)
    if problem.logits.shape[1] == 0:
        # No classes: no kernel work, and answers (empty, 0 or NaN) best left to PyTorch; but a class index, which
        # is out of bounds there, is refused first (PyTorch's CUDA kernel would stop the process at a device assert).
        grad_mode_to_run(grad_mode, input, weight, problem)  # its refusals hold here too
        check_values(problem, check_targets=True)
        return _no_classes_as_pytorch(input, target, weight, ignore_index, reduction, label_smoothing)
    if _function_transform_active(problem.logits, problem.target, problem.weight):
        check_weight_grad(weight, problem)
        return _unbatched_ignored_mean_as_pytorch(_loss_from_reference_ops(problem, loss_dtype), input, problem)
    value_check = start_value_check(problem, check_targets=not ops.checks_targets, backend=ops.name)
    grad_mode = grad_mode_to_run(grad_mode, input, weight, problem)  # its refusals first, as without classes
    if value_check is not None and (grad_mode == "inplace" or not ops.bad_targets_are_nan):
        # Read before a forward that writes over the logits, or whose kernels would index with a bad class.
        value_check.raise_if_failed()
        value_check = None
    logits = problem.logits
    if grad_mode == "recompute":
        # Logits the kernels cannot read as they are (a column-major (N, C), a view with gaps) are copied by each
        # op that reads them; copied here instead, the copy is what the backward reads, and it is made only once.
        logits = kernel_logits(logits)[0]
    loss = FusedCrossEntropyFunction.apply(
        logits, problem.target, problem.weight, problem.reduction, problem.ignore_index, problem.label_smoothing,
        ops.name, grad_mode, loss_dtype,
    )
    if value_check is not None:  # read while the kernels run (see ValueCheck)
        try:
            value_check.raise_if_failed()
        except BaseException:
            del loss  # a kept traceback holds this frame: not the graph and gradient buffer of a refused call
            raise
    if problem.reduction == REDUCTION_NONE:
        return loss.view(problem.loss_shape)
    return _unbatched_ignored_mean_as_pytorch(loss, input, problem)
