"""Every op of the CPU kernel on each of its kernel paths, in four dtypes, in a build with AddressSanitizer: a read
or write outside a tensor or a scratch buffer (a vector past the end of a row, of a staging tile, of a class chunk)
ends the process with ASan's report. Run by tests/test_cpu_ops.py once per SIMD level, with libasan preloaded:

    LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 ATEN_CPU_CAPABILITY=avx2 \
        python tests/cpu_memcheck.py

It loads its own build of the ops (torch.ops.fused_xent), not the package, which would load the uninstrumented one.
"""

import itertools
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent

# (shape, layout): the CPU kernel's paths (csrc/cpu/xent_kernels.h), each also at a start off a vector boundary.
CASES = [
    ((37, 10), "contiguous"),        # short rows, transposed through tiles both ways
    ((9, 50), "contiguous"),         # short rows in the forward, long-row backward
    ((5, 2500), "contiguous"),       # long rows: online softmax over 2048-class chunks and a tail
    ((2, 19, 8, 8), "contiguous"),   # NCHW: vectors of positions through the staging tile
    ((2, 19, 5, 7), "channels_last"),
    ((4, 300, 3), "contiguous"),     # long lanes: S < 64, lane blocks that span batch entries (several runs)
    ((3, 700, 37), "contiguous"),    # long lanes, a partial last lane block
    ((1, 9000, 20), "contiguous"),   # long lanes for more than 8192 classes
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def build():
    sources = [ROOT / "csrc" / "fused_xent.cpp", *(ROOT / "csrc" / "common").glob("*.cpp"),
               *(ROOT / "csrc" / "cpu").glob("*.cpp")]
    directory = ROOT / "build" / "cpu_asan"
    directory.mkdir(parents=True, exist_ok=True)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    cpp_extension.load(
        "fused_xent_cpu_asan", sorted(map(str, sources)), is_python_module=False, build_directory=str(directory),
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1", "-std=c++20", "-fvisibility=hidden", "-fopenmp", *sanitize],
        extra_ldflags=["-fopenmp", *sanitize], verbose=False,
    )
    return torch.ops.fused_xent


def make_logits(shape, layout, dtype, offset):
    """Logits of `shape` in `layout`, starting `offset` elements into their storage."""
    count = torch.Size(shape).numel()
    flat = (torch.randn(count + offset) * 4).to(dtype)[offset:]
    if layout == "channels_last":
        return flat.view(shape[0], *shape[2:], shape[1]).permute(0, 3, 1, 2)
    return flat.view(shape)


def main():
    ops = build()
    torch.manual_seed(0)
    calls = 0
    for (shape, layout), dtype, offset in itertools.product(CASES, DTYPES, (0, 1)):
        logits = make_logits(shape, layout, dtype, offset)
        x = logits.flatten(2) if logits.dim() > 2 else logits.unsqueeze(-1)
        N, C, S = x.shape
        classes = torch.randint(0, C, (N, S))
        classes.view(-1)[1::3] = -100
        probabilities = torch.softmax(torch.randn(x.shape), 1).to(dtype)
        weight = (torch.rand(C) + 0.5).to(dtype)
        for target, (w, reduction, smoothing) in itertools.product(
                (classes, probabilities), ((None, 0, 0.0), (weight, 1, 0.1), (None, 2, 0.2))):
            loss, lse, total_weight = ops.cross_entropy_fwd(x, target, w, reduction, -100, smoothing)
            upstream = torch.rand(loss.shape, dtype=loss.dtype) + 0.5
            ops.cross_entropy_bwd(upstream, x, target, w, lse, total_weight, reduction, -100, smoothing)
            ops.cross_entropy_fwd_grad(x, target, w, reduction, -100, smoothing)
            in_place = make_logits(shape, layout, dtype, offset)
            ops.cross_entropy_fwd_grad_(in_place.flatten(2) if in_place.dim() > 2 else in_place.unsqueeze(-1),
                                        target, w, reduction, -100, smoothing)
            calls += 4
    print(f"ok {calls}")


if __name__ == "__main__":
    main()
