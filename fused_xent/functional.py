"""`cross_entropy`: a drop-in for torch.nn.functional.cross_entropy backed by a fused kernel."""

import dataclasses

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad
from torch.nn import _reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _backends, reference
from ._autocast import autocast_arguments, autocast_enabled
from ._autograd import FusedCrossEntropyFunction
from ._grad_modes import check_grad_mode, check_weight_grad, grad_mode_to_run
from ._layout import kernel_logits
from ._validate import REDUCTIONS, prepare
from ._value_check import ValueCheck, check_values, start_value_check
from .reference import REDUCTION_MEAN, REDUCTION_NONE

_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}


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
    try:
        loss = FusedCrossEntropyFunction.apply(
            logits, problem.target, problem.weight, problem.reduction, problem.ignore_index, problem.label_smoothing,
            ops.name, grad_mode, loss_dtype,
        )
    except IndexError:
        if ops.checks_targets:  # its kernel names a position of its (N, S) view: the check names the user's index
            ValueCheck(problem, check_targets=True).raise_if_failed()
        raise
    if value_check is not None:  # read while the kernels run (see ValueCheck)
        try:
            value_check.raise_if_failed()
        except BaseException:
            del loss  # a kept traceback holds this frame: not the graph and gradient buffer of a refused call
            raise
    if problem.reduction == REDUCTION_NONE:
        return loss.view(problem.loss_shape)
    return _unbatched_ignored_mean_as_pytorch(loss, input, problem)
