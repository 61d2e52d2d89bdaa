"""`CrossEntropyLoss`: torch.nn.CrossEntropyLoss with the fused kernel behind it."""

import torch

from ._backends import BACKEND_ENV, check_backend_name
from ._grad_modes import check_grad_mode
from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (same constructor and forward), plus `backend` and `grad_mode`
    (see fused_xent.cross_entropy). Being a subclass, it is accepted wherever an nn.CrossEntropyLoss is."""

    def __init__(
        self,
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
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        if backend is not None:
            check_backend_name(backend)
        check_grad_mode(grad_mode)
        self.backend = backend
        self.grad_mode = grad_mode

    def forward(self, input, target):
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, backend=self.backend, grad_mode=self.grad_mode,
        )

    def extra_repr(self):
        # None reads FUSED_XENT_BACKEND at each call (auto when unset): not shown as a backend it may not be.
        backend = self.backend or f"{BACKEND_ENV} or auto"
        return f"backend={backend}, grad_mode={self.grad_mode}"
