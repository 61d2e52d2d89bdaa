"""The Triton backend as torch.library ops: fused_xent::triton_cross_entropy_{fwd, bwd, fwd_grad, fwd_grad_} and
fused_xent::triton_scale_unit_grad_.

Same arguments, outputs and semantics as the C++ ops in csrc/fused_xent.cpp. `torch.library.triton_op` lets
torch.compile(fullgraph=True) trace through the launchers to the kernels (the launchers call them through
`torch.library.wrap_triton`), and derives the fake kernels by running the launchers on fake tensors. Autograd:
triton_cross_entropy_fwd differentiates through triton_cross_entropy_bwd; triton_cross_entropy_fwd_grad scales the
gradient it already computed; the in-place ops have no autograd (triton_scale_unit_grad_ is that scaling done in
place, as the front end runs it: see csrc/cuda/xent_scale.cu).

Importing this module never fails: without Triton, unavailable_reason() says so and no op is registered.
"""


import torch

from ._ops import register_autograd
from ._triton_env import NO_DEVICE_FOR_TRITON

try:
    from . import triton_launchers

    _IMPORT_ERROR = None
except Exception as error:  # no triton (CPU-only wheels, macOS), or an install that fails to import
    triton_launchers = None
    _IMPORT_ERROR = error


def unavailable_reason() -> str | None:
    """None when the Triton backend can run here, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if triton_launchers.INTERPRET:
        return triton_launchers.INTERPRETER_PROBLEM
    return None if torch.cuda.is_available() else NO_DEVICE_FOR_TRITON


def check_device(device: torch.device) -> None:
    """Raises a clear error unless the kernels can run on tensors on `device`."""
    if triton_launchers is None:
        raise RuntimeError(f"fused_xent: the triton backend is not available: {unavailable_reason()}")
    triton_launchers.check_device(device)


if triton_launchers is not None:
    Tensor = torch.Tensor

    @torch.library.triton_op("fused_xent::triton_cross_entropy_fwd", mutates_args=())
    def triton_cross_entropy_fwd(
        logits: Tensor, target: Tensor, weight: Tensor | None, reduction: int, ignore_index: int,
        label_smoothing: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return triton_launchers.cross_entropy_fwd(logits, target, weight, reduction, ignore_index, label_smoothing)

    @torch.library.triton_op("fused_xent::triton_cross_entropy_bwd", mutates_args=())
    def triton_cross_entropy_bwd(
        grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor,
        total_weight: Tensor, reduction: int, ignore_index: int, label_smoothing: float,
    ) -> Tensor:
        return triton_launchers.cross_entropy_bwd(
            grad_loss, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing
        )

    @torch.library.triton_op("fused_xent::triton_cross_entropy_fwd_grad", mutates_args=())
    def triton_cross_entropy_fwd_grad(
        logits: Tensor, target: Tensor, weight: Tensor | None, reduction: int, ignore_index: int,
        label_smoothing: float,
    ) -> tuple[Tensor, Tensor]:
        return triton_launchers.cross_entropy_fwd_grad(logits, target, weight, reduction, ignore_index, label_smoothing)

    @torch.library.triton_op("fused_xent::triton_cross_entropy_fwd_grad_", mutates_args={"logits"})
    def triton_cross_entropy_fwd_grad_(
        logits: Tensor, target: Tensor, weight: Tensor | None, reduction: int, ignore_index: int,
        label_smoothing: float,
    ) -> Tensor:
        return triton_launchers.cross_entropy_fwd_grad_(
            logits, target, weight, reduction, ignore_index, label_smoothing
        )

    @torch.library.triton_op("fused_xent::triton_scale_unit_grad_", mutates_args={"grad"})
    def triton_scale_unit_grad_(grad: Tensor, grad_loss: Tensor, target: Tensor | None, ignore_index: int) -> None:
        triton_launchers.scale_unit_grad_(grad, grad_loss, target, ignore_index)

    register_autograd(prefix="triton_")
