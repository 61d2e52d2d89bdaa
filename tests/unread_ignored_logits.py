"""Runs the ops of a kernel library on logits whose ignored positions lie on pages that cannot be read
(PROT_NONE): a kernel that reads them dies of SIGSEGV. Prints "ok" when every op finished with zero gradients for
those positions. Run as a child process, by tests/test_cpu_ops.py, tests/test_cuda_emulated.py and
tests/test_triton.py:

    python tests/unread_ignored_logits.py LIBRARY.so NAMESPACE     (NAMESPACE: fused_xent, fused_xent_emulated)
    TRITON_INTERPRET=1 python tests/unread_ignored_logits.py triton   (the Triton ops, interpreted: its loads
                                                                        touch only the lanes their mask keeps)

The same for the op that scales a gradient made in the forward by its upstream gradient (CUDA emulation and
Triton): with an upstream gradient of 1, it must leave the whole gradient unread and unwritten.

The problems take each kernel path of the CPU kernel and of the CUDA kernels' host emulation (2 multiprocessors):
rows (CPU row kernel; CUDA warp, block and split rows), NCHW (CPU tiles; a CUDA thread per position) and NCHW with
few positions and many classes (CPU long lanes; CUDA class ranges per thread); in Triton, rows, NCHW and split
NCHW.
"""

import ctypes
import mmap
import sys

import numpy as np
import torch

if sys.argv[1] == "triton":
    import fused_xent._triton_ops  # noqa: F401  (registers fused_xent::triton_cross_entropy_*)

    OP_PREFIX, ops = "triton_", torch.ops.fused_xent
else:
    torch.ops.load_library(sys.argv[1])
    OP_PREFIX, ops = "", getattr(torch.ops, sys.argv[2])
fwd, bwd, fwd_grad = (getattr(ops, OP_PREFIX + name) for name in ("cross_entropy_fwd", "cross_entropy_bwd",
                                                                 "cross_entropy_fwd_grad"))
libc = ctypes.CDLL(None)
PAGE = mmap.PAGESIZE
FLOATS_PER_PAGE = PAGE // 4


def logits_with_unreadable_pages(shape, unreadable_pages):
    """float32 logits on fresh pages, of which those listed are then made unreadable; and the mapping."""
    count = int(np.prod(shape))
    memory = mmap.mmap(-1, (count * 4 + PAGE - 1) // PAGE * PAGE)
    x = torch.from_numpy(np.frombuffer(memory, dtype=np.float32, count=count)).view(shape)
    x.copy_(torch.randn(shape) * 3)
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    for page in unreadable_pages:
        assert libc.mprotect(ctypes.c_void_p(base + page * PAGE), ctypes.c_size_t(PAGE), 0) == 0
    return x, memory


def run_ops(x, y):
    for smoothing in (0.0, 0.1):
        loss, lse, total_weight = fwd(x, y, None, 1, -100, smoothing)
        grad = bwd(torch.tensor(1.0), x, y, None, lse, total_weight, 1, -100, smoothing)
        _, fused_grad = fwd_grad(x, y, None, 0, -100, smoothing)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(fused_grad).all()
        ignored = y == -100
        assert grad.permute(0, 2, 1)[ignored].eq(0).all() and fused_grad.permute(0, 2, 1)[ignored].eq(0).all()


def rows(count, pages_per_row, ignored_rows):
    """(count, C) rows of whole pages, the ignored ones unreadable."""
    classes = pages_per_row * FLOATS_PER_PAGE
    x, memory = logits_with_unreadable_pages(
        (count, classes, 1), [row * pages_per_row + k for row in ignored_rows for k in range(pages_per_row)])
    y = torch.randint(0, classes, (count, 1))
    y[ignored_rows] = -100
    run_ops(x, y)


def main():
    rows(6, 1, [1, 3, 4])  # CPU rows; a CUDA warp per row
    rows(24, 3, [0, 5, 6, 23])  # a CUDA block per row
    rows(3, 12, [1])  # CUDA rows split across blocks

    # NCHW, 19 classes of two pages of positions each: the first page of positions of every class unreadable, its
    # positions all ignored (whole CPU tiles), the second read.
    x, _memory = logits_with_unreadable_pages((1, 19, 2 * FLOATS_PER_PAGE), [2 * c for c in range(19)])
    y = torch.randint(0, 19, (1, 2 * FLOATS_PER_PAGE))
    y[:, :FLOATS_PER_PAGE] = -100
    run_ops(x, y)

    # NCHW with 16 positions and over 256 classes (CPU long lanes, a lane block per batch entry or two; CUDA class
    # ranges), each entry on pages of its own: entries 0 and 2 ignored and unreadable, entry 1 read.
    classes = max(512, FLOATS_PER_PAGE // 16)
    pages_per_entry = classes * 16 // FLOATS_PER_PAGE
    x, _memory = logits_with_unreadable_pages(
        (3, classes, 16), [*range(pages_per_entry), *range(2 * pages_per_entry, 3 * pages_per_entry)])
    y = torch.randint(0, classes, (3, 16))
    y[[0, 2]] = -100
    run_ops(x, y)

    if OP_PREFIX or sys.argv[2] != "fused_xent":  # the compiled library serves it on CUDA only
        scale_unit_grad_ = getattr(ops, OP_PREFIX + "scale_unit_grad_")
        grad, _memory = logits_with_unreadable_pages((4, 3 * FLOATS_PER_PAGE, 1), [])
        y = torch.randint(0, grad.shape[1], (4, 1))
        scale_unit_grad_(grad, torch.tensor(0.5), y, -100)  # these pages are readable: the op does write
        assert libc.mprotect(ctypes.c_void_p(grad.data_ptr()), ctypes.c_size_t(grad.numel() * 4), 0) == 0
        scale_unit_grad_(grad, torch.tensor(1.0), y, -100)
    print("ok")


if __name__ == "__main__":
    main()
