"""grad_mode policy: which grad_mode a call runs, and the calls that each mode, or any gradient, refuses."""

import torch

from ._layout import input_in_logits_memory, may_overlap
from ._validate import InvalidArgumentError

GRAD_MODES = ("recompute", "in_forward", "inplace")


def check_grad_mode(grad_mode):
    if grad_mode not in GRAD_MODES:
        raise InvalidArgumentError(
            f"fused_xent.cross_entropy: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}"
        )


def logits_need_grad(input) -> bool:
    """Whether this call will compute a gradient for the logits (otherwise every grad_mode runs as "recompute")."""
    return torch.is_grad_enabled() and input.requires_grad


def is_leaf_that_requires_grad(tensor) -> bool:
    """A leaf that requires grad, or a view of one: what PyTorch's in-place ops refuse to write to."""
    if not tensor.requires_grad:
        return False
    # A view of a leaf: one that requires grad, or one that needs none, whose view was made a leaf before this view
    # of it was taken (base[:].requires_grad_()[:]). A view of an op's output has a non-leaf base.
    return tensor.is_leaf or (tensor._base is not None and tensor._base.is_leaf)


def _view_refuses_writes(tensor) -> bool:
    """A view that PyTorch's in-place ops refuse to write through, because autograd could not rebase its history:
    one of several outputs of one op, or made under no_grad, in inference mode or inside a custom Function."""
    if torch.compiler.is_compiling() or not tensor._is_view():
        return False
    return torch._C._autograd._get_creation_meta(tensor) != torch._C._autograd.CreationMeta.DEFAULT


def check_weight_grad(weight, problem):
    """PyTorch refuses a gradient for the weight of class-index targets, under torch.func transforms too."""
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad and not problem.prob_target:
        raise RuntimeError(
            "fused_xent.cross_entropy: the loss of class-index targets is not differentiable with respect to weight "
            "(as in PyTorch): pass weight.detach() (probability targets do give weight a gradient)"
        )


def _check_inplace_allowed(input, problem):
    """Every refusal of grad_mode='inplace', which writes the gradient through the kernels' (N, C, S) view of the
    input itself: where PyTorch's in-place ops would refuse the write, and where it would need a copy of the logits
    or overwrite what the forward still reads."""
    if _view_refuses_writes(input):
        raise InvalidArgumentError(
            "fused_xent.cross_entropy: grad_mode='inplace' would write the gradient through a view that PyTorch's "
            "in-place ops refuse to modify (one of several views returned by one op, such as chunk, split or "
            "unbind; a view made under no_grad or inference_mode; a view made inside a custom autograd Function, "
            "as a module's full backward hook makes): autograd could not account for the write. Use "
            "grad_mode='in_forward', or pass the logits before they are split"
        )
    if is_leaf_that_requires_grad(input):
        raise InvalidArgumentError(
            "fused_xent.cross_entropy: grad_mode='inplace' would write the gradient over a leaf tensor that "
            "requires grad (a Parameter, a tensor made with requires_grad=True, or a view of one), as PyTorch's "
            "in-place ops refuse to: its .grad would be the tensor itself, and an optimizer would step from that. "
            "Pass the output of an operation (e.g. the logits of an LM head), or use grad_mode='in_forward'"
        )
    prefix = "fused_xent.cross_entropy: grad_mode='inplace' writes the gradient over the logits, "
    if problem.logits.dtype != input.dtype:
        raise InvalidArgumentError(
            f"{prefix}but these are computed in {problem.logits.dtype}, the dtype that {input.dtype} logits promote to "
            "with the probability target and weight: pass the target (and weight) as "
            f"target.to({input.dtype}), or use grad_mode='in_forward'"
        )
    if not problem.logits_are_input:
        raise InvalidArgumentError(
            f"{prefix}which must then be viewable as (N, C, S) without a copy; these {tuple(input.shape)} logits of "
            f"strides {input.stride()} are not (their spatial dims do not nest): pass input.contiguous(), or use "
            "grad_mode='in_forward'"
        )
    if may_overlap(problem.logits):
        raise InvalidArgumentError(
            f"{prefix}whose elements overlap here (strides {input.stride()}, e.g. from expand): pass input.clone(), "
            "or use grad_mode='in_forward'"
        )
    # Here in the user's terms (the in-place ops check again); traced tensors have no memory to compare.
    shared = None
    if not torch.compiler.is_compiling():
        shared = input_in_logits_memory(problem.logits, problem.weight, problem.target)
    if shared is not None:
        raise InvalidArgumentError(
            f"fused_xent.cross_entropy: grad_mode='inplace' writes the gradient over the logits while it still reads "
            f"the {shared}, whose memory range intersects theirs (it could be overwritten before it is read): pass "
            f"{shared}.clone(), or use grad_mode='in_forward'"
        )


def grad_mode_to_run(grad_mode, input, weight, problem) -> str:
    """grad_mode as the call will run it, after the checks of the gradients asked for: "recompute" when no gradient
    is wanted (evaluation, no_grad), where there is nothing to write and the logits must stay intact."""
    check_weight_grad(weight, problem)
    if not logits_need_grad(input) or grad_mode == "recompute":
        return "recompute"
    # Refused here rather than in backward, where an inplace forward would already have overwritten the logits.
    if problem.target.requires_grad or (weight is not None and weight.requires_grad):
        raise InvalidArgumentError(
            f"fused_xent.cross_entropy: grad_mode={grad_mode!r} gives no gradient for the target or the weight, "
            "which require grad here: use grad_mode='recompute' to differentiate through probability targets and "
            "their weights (or pass target.detach() and weight.detach())"
        )
    if grad_mode != "inplace":
        return grad_mode
    _check_inplace_allowed(input, problem)
    if torch.compiler.is_compiling():
        # A compiled graph hides the write from other ops that saved the logits (no version counter moves inside
        # it), which would then compute their gradients from the gradient: write it into a new buffer instead.
        return "in_forward"
    return "inplace"
