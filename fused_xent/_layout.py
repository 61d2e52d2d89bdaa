"""How kernels lay out the (N, C, S) logits they read: the Python twin of csrc/common/xent_problem.cpp, used by the
front end, the Triton launchers and the fake kernels (which must predict the compiled kernels' output strides)."""

import torch


def _dims_by_stride(t: torch.Tensor) -> list[tuple[int, int]]:
    """(stride, size) of each dimension of size > 1, by increasing stride. An insertion sort: torch.compile traces
    its comparisons over symbolic strides (dynamic shapes), where it cannot trace sorted()."""
    dims = []
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size != 1:
            at = len(dims)
            while at > 0 and dims[at - 1][0] > stride:
                at -= 1
            dims.insert(at, (stride, size))
    return dims


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one contiguous range in some order of the dimensions. An empty
    tensor is, whatever its strides, as for PyTorch's is_non_overlapping_and_dense (which the C++ ops ask)."""
    if t.numel() == 0:
        return True
    expected_stride = 1
    for stride, size in _dims_by_stride(t):
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


def may_overlap(t: torch.Tensor) -> bool:
    """True unless the elements provably lie at distinct addresses: each dimension, in order of stride, steps past
    the whole extent of the ones below it (a conservative test; expanded or as_strided views fail it)."""
    if t.numel() == 0:  # no elements; its strides may tie (e.g. (5, 1, 1) for (4, 5, 0))
        return False
    extent = 1
    for stride, size in _dims_by_stride(t):
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


def input_in_logits_memory(logits: torch.Tensor, weight, target) -> str | None:
    """"weight" or "target" when that input may share memory with the logits (may_share_memory), else None: what
    an in-place forward, which writes over the logits while it still reads both, must refuse."""
    for name, tensor in (("weight", weight), ("target", target)):
        if tensor is not None and may_share_memory(logits, tensor):
            return name
    return None


def may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may have an element in common: their address ranges intersect (a conservative test: views
    that interleave without a common element pass it too; memory reached through another storage, e.g. a NumPy
    view, is caught). False for tensors without memory of their own to compare: fake, meta, or a wrapper subclass
    (DTensor and the like), for which the in-place ops' own check (csrc/common/xent_problem.h) remains."""
    if not (_has_plain_memory(a) and _has_plain_memory(b)) or a.numel() == 0 or b.numel() == 0:
        return False
    a_begin, a_end = _address_range(a)
    b_begin, b_end = _address_range(b)
    return a_begin < b_end and b_begin < a_end


def _has_plain_memory(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) addresses of t's elements (strides are never negative in PyTorch)."""
    last = sum(stride * (size - 1) for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _contiguous(logits: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of (N, C, S) logits. With S == 1 it is made as a matrix: PyTorch copies a transposed matrix
    (column-major (N, C) logits) in blocks, 2.4x as fast as the same copy through the (N, C, 1) view."""
    if logits.shape[2] == 1:
        return logits.squeeze(2).contiguous().unsqueeze(2)
    return logits.contiguous()


def kernel_logits(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The logits as kernels read them, and whether that is the spatial layout (unit position stride) rather than
    rows (unit class stride). Only logits with neither unit stride, or with gaps, are copied (xent_problem.cpp
    copies them the same way)."""
    _, num_classes, positions = logits.shape
    if logits.is_contiguous():  # the usual case, decided without the stride walk of is_dense: called on every loss
        return logits, num_classes != 1 and positions > 1
    work = logits if is_dense(logits) else _contiguous(logits)
    if num_classes == 1 or work.stride(1) == 1:
        return work, False
    if positions > 1 and work.stride(2) == 1:
        return work, True
    return _contiguous(work), positions > 1

