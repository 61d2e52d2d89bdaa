"""Argument checks and the canonical (N, C, S) views every backend consumes.

PyTorch's own messages for these mistakes are often cryptic ("only batches of spatial targets supported (3D
tensors) but got targets of dimension: 4"); each error here says what was wrong and how to fix it.
"""

import math
import numbers
import operator
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from .reference import REDUCTION_MEAN, REDUCTION_NONE, REDUCTION_SUM

REDUCTIONS = {"none": REDUCTION_NONE, "mean": REDUCTION_MEAN, "sum": REDUCTION_SUM}
LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass
class Problem:
    """Validated arguments, with logits as (N, C, S) and target as (N, S) or (N, C, S)."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    reduction: int
    ignore_index: int
    label_smoothing: float
    loss_shape: tuple  # shape of the unreduced loss: input's shape without the class dim
    logits_are_input: bool  # logits is a view of the input (no copy), so a kernel can write through it

    @property
    def prob_target(self) -> bool:
        return self.target.is_floating_point()


def _shape(t) -> str:
    return str(tuple(t.shape))


class InvalidArgumentError(ValueError, RuntimeError):
    """An argument F.cross_entropy cannot take. A ValueError, and a RuntimeError as PyTorch raises for most of these
    mistakes, so that code written against either catches it."""


InvalidArgumentError.__module__ = "fused_xent"


def _fail(message: str):
    raise InvalidArgumentError(f"fused_xent.cross_entropy: {message}")


def _type_fail(message: str):
    """An argument of the wrong type: TypeError, as PyTorch's argument parser raises."""
    raise TypeError(f"fused_xent.cross_entropy: {message}")


def _check_strided(tensor, name):
    """The kernels read strided memory; PyTorch's own loss refuses sparse logits and weights, and densifies nothing."""
    if tensor.layout != torch.strided:
        hint = "" if tensor.is_nested else f": pass {name}.to_dense()"
        _fail(f"{name} must be a dense tensor, got layout {tensor.layout}{hint}")


def _check_input(input):
    if not isinstance(input, torch.Tensor):
        _type_fail(f"input must be a torch.Tensor of logits, got {type(input).__name__}")
    _check_strided(input, "input")
    if input.dtype not in LOGIT_DTYPES:
        _fail(
            f"input (logits) must be float32, float64, float16 or bfloat16, got {input.dtype}: convert it, e.g. "
            "input.float()"
        )
    if input.dim() == 0:
        _fail("input must have a class dimension: (C,), (N, C) or (N, C, d1, ..., dk), got a 0-d tensor")


def _index_option(ignore_index):
    """ignore_index given as other than a plain int: what PyTorch's argument parser takes as one, else TypeError."""
    if isinstance(ignore_index, torch.Tensor) and ignore_index.numel() == 1 and not ignore_index.is_floating_point():
        ignore_index = ignore_index.item()
    if not isinstance(ignore_index, bool):
        try:
            return operator.index(ignore_index)  # int subclasses, numpy integers and 0-d integer arrays
        except TypeError:
            pass
    raise TypeError(f"fused_xent.cross_entropy: ignore_index must be an int, got {ignore_index!r}")


def _smoothing_option(label_smoothing):
    """label_smoothing given as other than a plain float: a real number (a 0-d tensor read as one), else an error."""
    if isinstance(label_smoothing, torch.Tensor) and label_smoothing.dim() == 0:
        if label_smoothing.requires_grad:  # PyTorch's argument parser refuses it too; its gradient would be lost
            raise TypeError(
                "fused_xent.cross_entropy: label_smoothing must be a float, got a tensor that requires grad (no "
                "gradient flows to it): pass float(label_smoothing)"
            )
        label_smoothing = label_smoothing.item()
    if not isinstance(label_smoothing, numbers.Real):
        _type_fail(f"label_smoothing must be a float in [0.0, 1.0], got {label_smoothing!r}")
    return label_smoothing


def _options(reduction, ignore_index, label_smoothing) -> tuple[int, int, float]:
    """(reduction code, ignore_index, label_smoothing) as the ops take them; what PyTorch accepts, accepted here.
    A plain int and float, the usual call, skip the conversions and their ABC isinstance checks (3 us)."""
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated, please use reduction='mean' instead", stacklevel=4)
        reduction = "mean"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        _fail(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if type(ignore_index) is not int:
        ignore_index = _index_option(ignore_index)
    if not -(2**63) <= ignore_index < 2**63:
        _fail(f"ignore_index must fit in int64 (class indices are int64), got {ignore_index}")
    if type(label_smoothing) is not float:
        label_smoothing = _smoothing_option(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        _fail(f"label_smoothing must be a float in [0.0, 1.0], got {label_smoothing!r}")
    return REDUCTIONS[reduction], int(ignore_index), float(label_smoothing)


def _check_weight(weight, input, logits_dtype, num_classes, prob_target):
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        _type_fail(f"weight must be a 1-D tensor with one entry per class, got {type(weight).__name__}")
    _check_strided(weight, "weight")
    if weight.is_complex():
        _fail(f"weight must be real, got {weight.dtype}")
    # PyTorch's loss of class indices over spatial positions counts a weight's entries, not its shape, so that e.g.
    # a (1, C) weight serves there as its C entries; its other inputs want a 1-D weight.
    read_flat = input.dim() > 2 and not prob_target and weight.dim() != 1
    if weight.numel() != num_classes or (weight.dim() != 1 and not read_flat):
        _fail(f"weight must be a 1-D tensor with one entry per class ({num_classes}), got shape {_shape(weight)}")
    if weight.device != input.device:
        _fail(f"weight is on {weight.device} but input is on {input.device}: move it with weight.to(input.device)")
    if weight.dtype != logits_dtype and not prob_target:
        _fail(
            f"weight dtype {weight.dtype} differs from input dtype {logits_dtype} (PyTorch requires them to match): "
            "pass weight.to(input.dtype)"
        )


def _check_class_target(target, input):
    shape = tuple(input.shape)  # slicing a tuple costs a fraction of slicing a torch.Size, on every call
    expected = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if target.dtype not in (torch.int64, torch.uint8):
        if target.is_floating_point():
            _fail(
                f"a floating-point target is read as class probabilities and must have the input's shape "
                f"{_shape(input)}, got {_shape(target)}; for class indices of shape {tuple(expected)} use "
                "target.long()"
            )
        _fail(f"class-index target must be int64 (or uint8), got {target.dtype}: use target.long()")
    if tuple(target.shape) == expected:
        return
    squeezable = (
        input.dim() > 2 and target.dim() == input.dim() and target.shape[1] == 1
        and target.shape[:1] + target.shape[2:] == expected
    )
    if squeezable:
        _fail(
            f"target has shape {_shape(target)} but class indices for input {_shape(input)} need shape "
            f"{tuple(expected)} (no class dimension): use target.squeeze(1)"
        )
    if input.dim() == 1:
        _fail(f"unbatched input {_shape(input)} needs a 0-d class-index target (or one of shape (1,)), got shape "
              f"{_shape(target)}")
    if input.dim() > 2 and tuple(target.shape) == shape[:-1]:
        # Token logits of shape (N, T, C), as a language model's head makes them: PyTorch wants the classes second.
        _fail(
            f"target shape {_shape(target)} does not match input shape {_shape(input)}: class indices need shape "
            f"{tuple(expected)}, the input without its dim 1 (the classes). If the classes are the input's last dim, "
            "pass input.flatten(0, -2) with target.flatten() (rows of classes), or input.movedim(-1, 1)"
        )
    _fail(
        f"target shape {_shape(target)} does not match input shape {_shape(input)}: class indices need shape "
        f"{tuple(expected)}; class probabilities need a floating-point target of shape {_shape(input)}"
    )


def _check_prob_target(target, input, ignore_index):
    if not target.is_floating_point():
        _fail(
            f"target has the input's shape {_shape(input)}, so it is read as class probabilities and must be "
            f"floating point, got {target.dtype}; class indices have no class dimension"
        )
    if ignore_index >= 0:
        _fail(
            f"ignore_index={ignore_index} is not supported with class-probability targets (as in PyTorch): leave it "
            "at its default; to leave positions out, take reduction='none' and mask the per-position losses yourself"
        )


def has_no_values(t: torch.Tensor) -> bool:
    # A plain tensor, the usual case, skips is_fake's walk through wrapper subclasses.
    return t.is_meta or (type(t) is not torch.Tensor and is_fake(t))


def _flattens_to_a_view(input) -> bool:
    """Whether reshaping input to (N, C, S) is a view: the spatial dims (those of size > 1) must nest."""
    if input.dim() <= 3:  # at most one spatial dim
        return True
    spatial = [(size, stride) for size, stride in zip(input.shape[2:], input.stride()[2:], strict=True) if size != 1]
    return all(outer_stride == inner_size * inner_stride
               for (_, outer_stride), (inner_size, inner_stride) in zip(spatial, spatial[1:], strict=False))


def prepare(input, target, weight, ignore_index, reduction, label_smoothing, float32_logits=False) -> Problem:
    """float32_logits: half-precision logits stand for their float32 values (autocast: see _autocast.py), so the
    weight is checked against float32, and a float32 weight joins no dtype promotion (the kernels read weights in
    float32 whatever their dtype)."""
    _check_input(input)
    reduction, ignore_index, label_smoothing = _options(reduction, ignore_index, label_smoothing)
    original_input = input
    if not isinstance(target, torch.Tensor):
        _type_fail(f"target must be a torch.Tensor, got {type(target).__name__}")
    _check_strided(target, "target")
    if target.device != input.device:
        _fail(f"target is on {target.device} but input is on {input.device}: move it with target.to(input.device)")
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    prob_target = target.shape == input.shape
    _check_weight(weight, input, torch.float32 if float32_logits else input.dtype, num_classes, prob_target)
    if weight is not None and weight.dim() != 1:
        weight = weight.reshape(num_classes)

    if prob_target:
        _check_prob_target(target, input, ignore_index)
        # PyTorch multiplies probabilities, weights and log-probabilities with type promotion; the kernels want one
        # dtype, so promote up front (a no-op in the usual case of matching dtypes).
        common = torch.promote_types(input.dtype, target.dtype)
        if weight is not None and not float32_logits:
            common = torch.promote_types(common, weight.dtype)
            weight = weight.to(common)
        input, target = input.to(common), target.to(common)
    else:
        if input.dim() == 1 and target.shape == (1,):
            target = target.view(())  # PyTorch accepts it for an unbatched input
        _check_class_target(target, input)
        target = target.long()

    flattens_to_a_view = _flattens_to_a_view(input)
    logits_are_input = input is original_input and flattens_to_a_view
    shape = tuple(input.shape)
    batch = 1 if len(shape) == 1 else shape[0]
    positions = math.prod(shape[2:])
    # view where it is one: half the host time of reshape on a tensor that requires grad.
    logits = (input.view if flattens_to_a_view else input.reshape)(batch, num_classes, positions)
    if target.is_floating_point():
        target = target.reshape(batch, num_classes, positions)
    else:
        target = target.reshape(batch, positions)
    loss_shape = shape[:class_dim] + shape[class_dim + 1:]
    return Problem(logits, target, weight, reduction, ignore_index, label_smoothing, loss_shape, logits_are_input)
