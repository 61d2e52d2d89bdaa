"""The CUDA kernels (csrc/cuda/) run on the host, without a GPU: built with the host compiler against
tests/host/emulated_cuda.h, which runs each launch's blocks one after another and each CUDA thread as a host thread
(real barriers, real warp shuffles). Every kernel path the launcher plans (a thread, a warp or a block per row,
rows split across blocks, NCHW positions with and without class ranges) is checked against F.cross_entropy in
float64, through the same four ops as the CPU kernel. The emulated device has 2 multiprocessors, so small problems
take the plans for few positions on a big GPU. Out of reach here: the sm_90 cluster kernel, timing, registers.
"""

from pathlib import Path

import pytest
import torch
from op_checks import as_ncs, check_all_ops, reference
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "tests" / "host"
# The cluster kernel needs sm_90 hardware (tests/host/emulated_ops.cpp stands in for it).
KERNEL_SOURCES = ["xent_kernel.cu", "xent_reduce.cu", "xent_rows.cu", "xent_rows_split.cu", "xent_spatial.cu"]


@pytest.fixture(scope="module")
def ops():
    build = ROOT / "build" / "emulated_cuda"
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(HOST / "emulated_ops.cpp"), str(ROOT / "csrc" / "common" / "xent_problem.cpp")]
    for name in KERNEL_SOURCES:  # the host compiler takes them as C++ through a one-line wrapper each
        wrapper = build / f"{Path(name).stem}_host.cpp"
        text = f'#include "cuda/{name}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    cpp_extension.load(
        "fused_xent_emulated_cuda", sources, is_python_module=False, build_directory=str(build),
        extra_include_paths=[str(HOST / "emulated"), str(ROOT / "csrc")],
        # Hidden symbols: the extension's own CUDA launchers, of the same names, must not stand in for these.
        extra_cflags=["-std=c++20", "-O1", "-fvisibility=hidden", "-DFUSED_XENT_HOST_EMULATION"],
        verbose=False,
    )
    return torch.ops.fused_xent_emulated


# (shape, layout): the kernel path each takes on the emulated 2-multiprocessor device.
CASES = [
    ((37, 10), "contiguous"),           # a thread per row (C <= 32)
    ((9, 423), "contiguous"),           # a warp per row
    ((5, 2048), "offset"),              # a warp per row, rows that start mid-vector
    ((32, 2100), "contiguous"),         # a block per row (enough rows: not split)
    ((3, 12000), "contiguous"),         # rows split across blocks, combined in order
    ((2, 9000), "offset"),              # split rows (512-thread blocks) that start mid-vector
    ((2, 19, 8, 8), "contiguous"),      # NCHW, a thread per position (too few classes to cut)
    ((2, 600, 13), "contiguous"),       # NCHW with many classes and few positions: class ranges per thread
    ((2, 300, 32, 32), "contiguous"),   # NCHW with enough positions for a thread each
    ((2, 19, 5, 7), "channels_last"),   # channels_last: rows of 19 classes, a thread per position
    ((2, 40, 3, 5), "channels_last"),   # channels_last rows of 40 classes: a warp per position
]


def make_logits(shape, layout, dtype):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "offset":  # one element past an allocation's 16-byte alignment
        return torch.empty(x.numel() + 1, dtype=dtype)[1:].view(shape).copy_(x)
    return x


def index_target(shape, ignore_index):
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    y.view(-1)[::7] = ignore_index
    return y


def case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + ("" if layout == "contiguous" else f"-{layout}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_class_index_targets(ops, case, dtype):
    torch.manual_seed(0)
    shape, layout = case
    x = make_logits(shape, layout, dtype)
    weight = torch.rand(shape[1]) + 0.5
    for reduction, weighted, smoothing in (("mean", True, 0.0), ("none", False, 0.1), ("sum", True, 0.2)):
        check_all_ops(ops, x, index_target(shape, -100), weight if weighted else None, reduction, -100, smoothing)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_probability_targets(ops, case):
    torch.manual_seed(1)
    shape, layout = case
    x = make_logits(shape, layout, torch.float32)
    y = torch.softmax(torch.randn(shape) * 2, 1)
    check_all_ops(ops, x, y, torch.rand(shape[1]) + 0.5, "mean", -100, 0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_float64_and_float16(ops, dtype):
    torch.manual_seed(2)
    for shape in ((9, 423), (3, 12000), (2, 600, 13)):
        x = make_logits(shape, "contiguous", dtype)
        check_all_ops(ops, x, index_target(shape, 1), torch.rand(shape[1]) + 0.5, "mean", 1, 0.1)


def test_probability_targets_over_32000_classes(ops):
    """One thread sums all 32000 classes of an NCHW position with probability targets: the sums keep float32
    precision (they are taken in blocks of 256 merged into the running statistics)."""
    torch.manual_seed(3)
    shape = (2, 32000, 3)
    x = make_logits(shape, "contiguous", torch.float32)
    check_all_ops(ops, x, torch.softmax(torch.randn(shape) * 3, 1), torch.rand(32000) + 0.5, "none", -100, 0.2)


@pytest.mark.parametrize("shape", [(37, 10), (9, 423), (3, 12000), (2, 600, 13), (2, 300, 32, 32)], ids=str)
def test_out_of_range_targets_give_nan(ops, shape):
    """Without the front end's check, a class index outside [0, C) gives NaN for its position and leaves the others
    alone, on every path."""
    torch.manual_seed(4)
    x, y = as_ncs(make_logits(shape, "contiguous", torch.float32), index_target(shape, -100))
    y[0, 0] = shape[1]
    loss = ops.cross_entropy_fwd(x, y, None, 0, -100, 0.0)[0]
    assert loss[0, 0].isnan() and not loss.view(-1)[1:].isnan().any()
    grad = ops.cross_entropy_fwd_grad(x, y, None, 0, -100, 0.0)[1]
    assert grad[0, :, 0].isnan().all() and not grad[1:].isnan().any()


def test_plans_change_with_the_multiprocessor_count_results_do_not(ops, monkeypatch):
    """20 rows of 9000 classes: a block per row on 1 or 2 multiprocessors, split in two on 4."""
    x = make_logits((20, 9000), "contiguous", torch.float32).unsqueeze(-1)
    y = torch.randint(0, 9000, (20, 1))
    losses = {}
    for sms in ("1", "4"):
        monkeypatch.setenv("FUSED_XENT_EMULATED_SMS", sms)
        losses[sms] = ops.cross_entropy_fwd(x, y, None, 0, -100, 0.0)[0]
    torch.testing.assert_close(losses["4"], losses["1"], rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape", [(16, 1000), (3, 12000), (4, 300, 37), (2, 3000, 5)], ids=str)
def test_loss_sums_at_offset_logits_and_with_a_masked_class(ops, shape):
    """Label smoothing and probability targets at logits near 1.2e4, and with class 0 masked at -1e9: the kernels
    sum relative to each position's max, merging ranges as the max rises, so float32 precision holds (the bounds
    of test_cuda.py's GPU test of the same)."""
    generator = torch.Generator().manual_seed(9)
    offset = torch.randn(shape, generator=generator) * 2 + 1.2e4
    masked = torch.randn(shape, generator=generator)
    masked[:, 0] = -1e9
    weight = torch.rand(shape[1], generator=generator) + 0.5
    probabilities = torch.softmax(torch.randn(shape, generator=generator) * 3, 1)
    for x, rtol in ((offset, 2e-6), (masked, 1e-5)):
        classes = torch.randint(1, shape[1], (shape[0], *shape[2:]), generator=generator)
        for target, smoothing in ((probabilities, 0.2), (classes, 0.3)):
            expected, _ = reference(x, target, weight, "none", -100, smoothing)
            x3, y3 = as_ncs(x, target)
            loss = ops.cross_entropy_fwd(x3, y3, weight, 0, -100, smoothing)[0]
            torch.testing.assert_close(loss.double(), expected.reshape(loss.shape), rtol=rtol, atol=0)
