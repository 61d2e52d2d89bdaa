"""Builds csrc/cuda/ for the host against tests/host/emulated_cuda.h (each CUDA thread a fiber, __syncthreads and
warp shuffles real rendezvous, on an emulated 2-multiprocessor device) and names the problems that take each of
its launch plans there: for tests/test_cuda_emulated.py and tests/emulated_memcheck.py."""

from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "tests" / "host"
KERNEL_SOURCES = ["xent_kernel.cu", "xent_plan.cu", "xent_reduce.cu", "xent_rows.cu", "xent_rows_split.cu",
                  "xent_rows_cluster.cu", "xent_spatial.cu", "xent_checks.cu", "xent_scale.cu"]


def build(variant="", extra_flags=()):
    """Compiles (incrementally, under build/) and loads the emulated kernels; returns their ops,
    torch.ops.fused_xent_emulated. A variant (e.g. "asan", with its flags) builds apart and is loaded on its own
    in another process."""
    directory = ROOT / "build" / ("emulated_cuda" + (f"_{variant}" if variant else ""))
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(HOST / "emulated_ops.cpp"), str(ROOT / "csrc" / "common" / "xent_problem.cpp")]
    for name in KERNEL_SOURCES:  # the host compiler takes them as C++ through a one-line wrapper each
        wrapper = directory / f"{Path(name).stem}_host.cpp"
        text = f'#include "cuda/{name}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    flags = list(extra_flags)
    cpp_extension.load(
        "fused_xent_emulated_cuda" + (f"_{variant}" if variant else ""), sources, is_python_module=False,
        build_directory=str(directory), extra_include_paths=[str(HOST / "emulated"), str(ROOT / "csrc")],
        # Hidden symbols: the extension's own CUDA launchers, of the same names, must not stand in for these.
        extra_cflags=["-std=c++20", "-O1", "-fvisibility=hidden", "-DFUSED_XENT_HOST_EMULATION", *flags],
        extra_ldflags=flags, verbose=False,
    )
    return torch.ops.fused_xent_emulated


# (shape, layout): the kernel path each takes on the emulated 2-multiprocessor device.
CASES = [
    ((37, 10), "contiguous"),           # a thread per row (C <= 32): a warp's 32 rows stored together, then 5 alone
    ((70, 7), "offset"),                # ... rows that start mid-vector, so the staged rows take that phase
    ((9, 423), "contiguous"),           # a warp per row
    ((5, 2048), "offset"),              # a warp per row, rows that start mid-vector
    ((32, 2100), "contiguous"),         # a block per row (enough rows: not split)
    ((3, 12000), "contiguous"),         # rows split across blocks, combined in order
    ((2, 9000), "offset"),              # split rows (512-thread blocks) that start mid-vector
    ((2, 19, 8, 8), "contiguous"),      # NCHW, a thread per position (too few classes to cut)
    ((2, 600, 13), "contiguous"),       # NCHW with many classes and few positions: class ranges per thread
    ((2, 605, 13), "contiguous"),       # ... whose last range ends in a partial chunk of classes
    ((2, 23, 8, 8), "contiguous"),      # NCHW of 23 classes: 16-bit positions end in two chunks of the rest
    ((2, 300, 32, 32), "contiguous"),   # NCHW with enough positions for a thread each
    ((2, 19, 5, 7), "channels_last"),   # channels_last: rows of 19 classes, a thread per position
    ((2, 40, 3, 5), "channels_last"),   # channels_last rows of 40 classes: a warp per position
]
