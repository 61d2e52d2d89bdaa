"""Autocast for cross_entropy: PyTorch's autocast runs cross entropy in float32, and the front end casts the
arguments as it would (autocast_arguments), except half-precision logits it can read as they are."""

import torch

from ._grad_modes import logits_need_grad

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _autocast_to_float32(tensor):
    """PyTorch's autocast runs cross entropy in float32: each float16/bfloat16 argument is cast, others are not."""
    if isinstance(tensor, torch.Tensor) and tensor.dtype in _HALF_DTYPES:
        return tensor.float()
    return tensor


def autocast_arguments(input, target, weight, grad_mode):
    """The arguments under autocast -> (input, target, weight, float32_logits). PyTorch casts each half-precision
    argument to float32. Half-precision logits, and a probability target of their dtype, are left as they are
    (float32_logits): every such value is exact in float32 and the kernels compute in float32, so the loss and
    gradient are those of the cast arguments, without the float32 copy of the logits and its float32 gradient
    (four times the memory of bfloat16 logits). Any other mix is cast as PyTorch casts it.

    Not for in_forward and inplace when the logits need a gradient: they would store the gradient for an upstream
    gradient of 1 in half precision and scale it in backward, where mixed precision's loss scale (GradScaler's
    65536, a loss divided by the accumulation steps) then scales a rounded gradient, in float16 one whose small
    entries have underflowed to 0. On the float32 copy they scale a float32 gradient, as PyTorch does."""
    weight = _autocast_to_float32(weight)
    gradient_made_in_forward = grad_mode != "recompute" and logits_need_grad(input)
    reads_logits_as_they_are = (
        isinstance(input, torch.Tensor) and input.dtype in _HALF_DTYPES and not gradient_made_in_forward
        and isinstance(target, torch.Tensor) and (not target.is_floating_point() or target.dtype == input.dtype)
        and (not isinstance(weight, torch.Tensor) or weight.dtype == torch.float32)
    )
    if reads_logits_as_they_are:
        return input, target, weight, True
    return _autocast_to_float32(input), _autocast_to_float32(target), weight, False


# Devices whose autocast state torch._C._is_any_autocast_enabled() reports (it leaves out some others, e.g. mps).
_AUTOCAST_DEVICES_ANY_REPORTS = ("cpu", "cuda")


def autocast_enabled(input) -> bool:
    """Whether autocast is on for input's device; on the CPU and CUDA asked of that device only when it is on for
    any (the usual answer, in one call). The meta device has no autocast state (asking raises); it is named rather
    than found with torch.amp.is_autocast_available, which torch.compile cannot trace in torch 2.11."""
    if not isinstance(input, torch.Tensor) or input.is_meta:
        return False
    device_type = input.device.type
    if device_type in _AUTOCAST_DEVICES_ANY_REPORTS and not torch._C._is_any_autocast_enabled():
        return False
    return torch.is_autocast_enabled(device_type)
