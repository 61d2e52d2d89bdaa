"""The data-dependent checks of a call: class indices in range and no NaN in the weight, computed on the logits'
device and read back as late as the kernels allow (FUSED_XENT_CHECK_VALUES=0 turns them off). The argument checks that
need no values are in _validate.py."""

import math
import os

import torch

from . import _backends
from ._validate import InvalidArgumentError, Problem, has_no_values

CHECK_VALUES_ENV = "FUSED_XENT_CHECK_VALUES"
_SWITCH_VALUES = {"": True, "1": True, "true": True, "on": True, "yes": True, "0": False, "false": False,
                  "off": False, "no": False}


def value_checks_enabled() -> bool:
    """FUSED_XENT_CHECK_VALUES: on unless set to 0 / false / off / no (empty is on); a value that says neither is
    refused."""
    setting = os.environ.get(CHECK_VALUES_ENV, "1")
    enabled = _SWITCH_VALUES.get(setting.strip().lower())
    if enabled is None:
        raise ValueError(f"fused_xent: {CHECK_VALUES_ENV}={setting!r} is neither on (1) nor off (0)")
    return enabled


# The check as one kernel of the compiled extension (csrc/cuda/xent_checks.cu), by the backend whose calls it serves:
# on a GPU one launch and one copy instead of a handful of ops, each of which cost 14-17 us of host time on the H200
# machine of 2026-11-30 (benchmarks/RESULTS.md). It returns the verdict itself, flags [a bad class index, a NaN
# weight]. Only calls of the CUDA backend take it: they run the extension's kernels on that GPU anyway, where a call
# of the Triton or PyTorch backend may be on a GPU the extension was not built for.
# A CUDA build registers it with the loss ops (csrc/cuda/xent_checks.cu beside xent_kernel.cu).
VALUE_CHECK_KERNELS = {"cuda": torch.ops.fused_xent.value_check} if _backends.HAS_CUDA_KERNEL else {}


# nn.Parameter is a plain tensor to the dispatcher (no __torch_function__ or __torch_dispatch__ of its own): class
# weights held as a frozen Parameter, or learned ones of probability targets, take the one-kernel check too.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(tensor) -> bool:
    """A tensor the compiled check may read directly: no subclass (fake tensors, DTensor) but nn.Parameter, no
    torch.func wrapper."""
    return tensor is None or (type(tensor) in _PLAIN_TYPES
                              and not torch._C._functorch.is_functorch_wrapped_tensor(tensor))


class ValueCheck:
    """The data-dependent checks of one call, computed on the logits' device: class indices in range (unless the
    kernel checks them itself) and no NaN weights. raise_if_failed() reads the verdict and raises what it found.

    The device finds whether any class index is out of range (ignore_index aside) and whether the weight has a NaN:
    one kernel of the extension for calls of the CUDA backend (VALUE_CHECK_KERNELS), otherwise a handful of small ops
    giving the least and greatest class index (ignore_index counted as class 0) for the host to judge. On a GPU the
    result is copied to pinned host memory behind an event, so a caller may queue the loss kernels first and read it
    while the kernels run: the host then waits only for the check itself, and the GPU, busy with the kernels, does
    not wait for the host (reading it at once would leave the GPU idle while the host goes on to launch the kernels).
    Only kernels that meet a bad class index without reading or writing out of bounds (NaN instead) may be queued
    ahead of the verdict, and none that writes over an input. Where a check finds a bad class index, the host looks
    for the first one (a sync, on the error path only) to name it.
    """

    def __init__(self, problem: Problem, check_targets: bool, backend: str | None = None):
        self._problem = problem
        target = problem.target
        self._check_targets = check_targets and not problem.prob_target and target.numel() > 0
        self._flags = self._summary = self._ready = None
        checked_target = target if self._check_targets else None
        if checked_target is None and problem.weight is None:
            return
        kernel = VALUE_CHECK_KERNELS.get(backend)
        if kernel is not None and _plain(checked_target) and _plain(problem.weight):
            self._flags = kernel(checked_target, problem.weight, problem.ignore_index, problem.logits.shape[1])
        else:
            summary = []
            if self._check_targets:
                # Ignored positions count as class 0, which is in range whenever any class is (C = 0 is judged
                # exactly).
                summary += target.masked_fill(target == problem.ignore_index, 0).aminmax()
            if problem.weight is not None:
                summary.append(torch.isnan(problem.weight).any().long())
            self._summary = torch.stack(summary)
            if self._summary.is_cuda:
                self._summary = torch.empty(self._summary.shape, dtype=self._summary.dtype,
                                            pin_memory=True).copy_(self._summary, non_blocking=True)
        if problem.logits.is_cuda:
            # On the stream the copy to pinned memory ran on: the logits' device's, which need not be the current
            # device.
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(problem.logits.device))

    def _verdict(self) -> tuple[bool, bool]:
        """(a class index may be out of range, the weight has a NaN)."""
        if self._ready is not None:
            self._ready.synchronize()
        if self._flags is not None:
            bad_target, nan_weight = self._flags.tolist()
            return bool(bad_target), bool(nan_weight)
        summary = self._summary.tolist()
        nan_weight = self._problem.weight is not None and bool(summary[-1])
        num_classes = self._problem.logits.shape[1]
        return self._check_targets and not (summary[0] >= 0 and summary[1] < num_classes), nan_weight

    def raise_if_failed(self):
        if self._flags is None and self._summary is None:
            return
        bad_target, nan_weight = self._verdict()
        problem = self._problem
        if nan_weight:
            # A weight batched by vmap (its plain tensor, see functional.py) has more dimensions: no class to name.
            nan_classes = torch.isnan(problem.weight).nonzero()
            where = f" (first at class {int(nan_classes[0])})" if problem.weight.dim() == 1 else ""
            raise InvalidArgumentError(
                f"fused_xent.cross_entropy: weight contains NaN{where}: the loss would be NaN wherever that class is a "
                "target, and everywhere under label smoothing; check how the weights are computed, e.g. a division "
                "by a zero class count"
            )
        if not bad_target:
            return
        num_classes = problem.logits.shape[1]
        target = problem.target.flatten()
        invalid = ((target < 0) | (target >= num_classes)) & (target != problem.ignore_index)
        if not bool(invalid.any()):
            return  # no classes (C = 0), and every target ignored
        position = int(invalid.nonzero()[0])
        where = _where(position, problem.loss_shape, target.numel())
        found = f"target {int(target[position])}{where} is out of range"
        if num_classes == 0:
            raise IndexError(
                f"fused_xent.cross_entropy: {found}: the input has no classes (C = 0), so every target must be "
                f"ignore_index={problem.ignore_index}"
            )
        raise IndexError(
            f"fused_xent.cross_entropy: {found} for {num_classes} classes (valid: 0..{num_classes - 1}, or "
            f"ignore_index={problem.ignore_index})"
        )


def _where(position: int, target_shape: tuple, numel: int) -> str:
    """Where a flat position of the target is, as the user indexes it: " at position 3" in a 1-D target,
    " at position (1, 40, 7)" in a spatial one, nothing in an unbatched one. Targets read beneath vmap (more entries
    than one call's shape) keep the flat position."""
    if len(target_shape) == 0 and numel == 1:
        return ""
    if len(target_shape) <= 1 or math.prod(target_shape) != numel:
        return f" at position {position}"
    index = []
    for size in reversed(target_shape):
        position, coordinate = divmod(position, size)
        index.append(coordinate)
    return f" at position {tuple(reversed(index))}"


def start_value_check(problem: Problem, check_targets: bool, backend: str | None = None) -> ValueCheck | None:
    """The checks of ValueCheck, started; None when they are off. They cost a pass over the targets and one host
    synchronisation on GPUs; FUSED_XENT_CHECK_VALUES=0 skips them, and they are skipped under torch.compile and while
    a CUDA graph is being captured (where a synchronisation is not allowed); the kernels still never index out of
    bounds there (NaN instead). They are skipped as well for tensors without values: meta tensors, and the fake
    tensors of tracing outside torch.compile (make_fx, FakeTensorMode, AOTAutograd), which no more than a compiled
    graph can read back. `backend`: the backend that serves the call, when the check may use its kernels."""
    if not value_checks_enabled() or torch.compiler.is_compiling() or has_no_values(problem.logits):
        return None
    if problem.logits.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return ValueCheck(problem, check_targets, backend)


def check_values(problem: Problem, check_targets: bool):
    """start_value_check, and its verdict at once."""
    check = start_value_check(problem, check_targets)
    if check is not None:
        check.raise_if_failed()
