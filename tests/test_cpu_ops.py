"""The CPU kernels of fused_xent, called directly through torch.ops against F.cross_entropy (computed in float64).

These tests load only the compiled extension (fused_xent/_C*.so), not the Python package around it.
"""

import functools
import glob
import os
import subprocess
import sys

import pytest
import torch
from helpers import run_under_address_sanitizer
from op_checks import REDUCTIONS, check_all_ops, check_in_place_call_counts_its_write, reference
from tolerances import assert_close, assert_grad_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBS = glob.glob(os.path.join(ROOT, "fused_xent", "_C*.so")) + glob.glob(os.path.join(ROOT, "fused_xent", "_C*.pyd"))
if not _LIBS:
    pytest.skip("fused_xent._C is not built", allow_module_level=True)
torch.ops.load_library(_LIBS[0])
ops = torch.ops.fused_xent

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# NCHW with more than 256 classes and S < 64, or more than 8192 classes, takes them in chunks
# (xent_spatial_long.h): one partial lane block spanning three batch entries, lane blocks across entry boundaries
# with a short last chunk, a last chunk of one class, whole tiles of positions with many classes, and kernel blocks
# of 16 positions (ops.cpp, positions_per_block) that start inside a batch entry.
SHAPES = [(4, 1), (5, 2), (7, 423), (3, 32000), (3, 5, 3), (2, 19, 7, 9), (2, 3, 4, 5, 6), (3, 4, 70), (423,),
          (3, 300, 5), (2, 700, 37), (2, 257, 3, 3), (1, 8200, 65), (7, 5000, 3)]


def make_logits(shape, dtype, layout):
    if layout == "channels_last":
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    else:
        x = torch.randn(shape)
    return (3 * x).to(dtype)


def make_index_target(shape, ignore_index):
    C = shape[1] if len(shape) > 1 else shape[0]
    target_shape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    y = torch.randint(0, C, target_shape)
    if y.numel() > 2:
        y.view(-1)[1] = ignore_index
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_index_targets(dtype, shape, reduction, weighted, smoothing):
    torch.manual_seed(0)
    # ignore_index inside the class range exercises its precedence over the class.
    ignore_index = 0 if shape[0] % 2 else -100
    C = shape[1] if len(shape) > 1 else shape[0]
    weight = torch.rand(C) + 0.5 if weighted else None
    x = make_logits(shape, dtype, "contiguous")
    check_all_ops(ops, x, make_index_target(shape, ignore_index), weight, reduction, ignore_index, smoothing)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_probability_targets(dtype, shape, reduction, weighted, smoothing):
    torch.manual_seed(1)
    C = shape[1] if len(shape) > 1 else shape[0]
    weight = torch.rand(C) + 0.5 if weighted else None
    x = make_logits(shape, dtype, "contiguous")
    y = torch.softmax(torch.randn(shape), dim=1 if len(shape) > 1 else 0).to(dtype)
    check_all_ops(ops, x, y, weight, reduction, -100, smoothing)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["index", "prob"])
def test_layouts(dtype, layout, probabilities):
    torch.manual_seed(2)
    shape = (3, 19, 5, 21)
    x = make_logits(shape, dtype, layout)
    if probabilities:
        y = torch.softmax(torch.randn(shape), dim=1).to(dtype)
        if layout == "channels_last":
            y = y.contiguous(memory_format=torch.channels_last)
    else:
        y = make_index_target(shape, -100)
    for reduction in REDUCTIONS:
        check_all_ops(ops, x, y, torch.rand(19) + 0.5, reduction, -100, 0.05)
    check_all_ops(ops, x, y, torch.rand(19) + 0.5, "mean", -100, 0.05, weight_dtype=torch.float32)  # as autocast


def test_python_density_test_agrees_with_pytorchs():
    """fused_xent._layout.is_dense, the Python twin of the C++ ops' is_non_overlapping_and_dense (fake kernels and
    the Triton launchers decide copies and output strides with it): the same answer, empty tensors included."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false as pytorchs

    from fused_xent._layout import is_dense

    base = torch.empty(4, 6, 5)
    views = [base, base.permute(2, 0, 1), base[:, ::2], base[:, :3], base.transpose(1, 2)[:1], base[:, :1, :1],
             torch.empty(3, 4, 0), torch.empty(4, 0, 3)[:, :, ::2], torch.empty(2, 8, 3)[:, :0],
             torch.empty(3, 4, 0).permute(0, 2, 1), torch.empty(5, 1).expand(5, 3)]
    for view in views:
        assert is_dense(view) == pytorchs(view), (tuple(view.shape), view.stride())


# Short rows run the lane kernels on tiles transposed in W x W blocks (uses_lane_kernels in csrc/cpu/kernel_plan.h:
# the forward up to 64 classes, the backward up to 16): both sides of each threshold, class counts that end in a
# partial block of 16 and of 8, partial tiles (200 rows = 3 tiles of 64 + 8), and channels_last rows, whose
# positions are C apart within a batch entry (9 * 15 = 135 positions: a partial tile at each entry's end).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [3, 16, 17, 37, 64, 65])
@pytest.mark.parametrize("layout", ["rows", "channels_last"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["index", "prob"])
def test_short_rows(dtype, C, layout, probabilities):
    torch.manual_seed(4)
    shape = (200, C) if layout == "rows" else (2, C, 9, 15)
    x = make_logits(shape, dtype, "channels_last" if layout == "channels_last" else "contiguous")
    if probabilities:
        y = torch.softmax(torch.randn(shape), dim=1).to(dtype)
        if layout == "channels_last":
            y = y.contiguous(memory_format=torch.channels_last)
    else:
        y = make_index_target(shape, -100)
    for reduction in REDUCTIONS:
        check_all_ops(ops, x, y, torch.rand(C) + 0.5, reduction, -100, 0.05)


# Positions taken a tile (64) or a lane block (one vector) at a time: runs of ignored positions cover whole ones,
# which are not read, beside partial ones. Short rows (rows and channels_last), NCHW tiles, and long lanes (NCHW with
# many classes and few positions), whose lane blocks span batch entries.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, layout", [((300, 7), "contiguous"), ((2, 19, 9, 20), "contiguous"),
                                           ((2, 19, 9, 20), "channels_last"), ((3, 700, 37), "contiguous"),
                                           ((5, 300, 7), "contiguous")], ids=str)
def test_ignored_runs_are_skipped(dtype, shape, layout):
    torch.manual_seed(6)
    x = make_logits(shape, dtype, layout)
    y = make_index_target(shape, -100)
    flat = y.view(-1)
    flat[:150] = -100  # whole tiles and lane blocks of the first batch entries
    flat[-40:] = -100  # the last lane blocks, and part of the last tile
    for reduction, smoothing in (("mean", 0.0), ("none", 0.1), ("sum", 0.1)):
        check_all_ops(ops, x, y, torch.rand(shape[1]) + 0.5, reduction, -100, smoothing)


def test_channels_last_is_not_copied():
    """The in-place op writes the gradient through a (N, C, H*W) view of channels_last logits (class stride 1): had
    the kernel copied them to NCHW, the logits would be left as they were."""
    x = torch.randn(2, 7, 4, 5).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (2, 4, 5))
    expected_loss, expected_grad = reference(x, y, None, "mean", -100, 0.1)
    x3 = x.flatten(2)
    assert x3.data_ptr() == x.data_ptr() and x3.stride(1) == 1
    loss = ops.cross_entropy_fwd_grad_(x3, y.flatten(1), None, 1, -100, 0.1)
    assert_close(loss, expected_loss, torch.float32)
    assert_grad_close(x, expected_grad, torch.float32)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch():
    x = torch.randn(0, 5, 1)
    y = torch.zeros(0, 1, dtype=torch.long)
    for reduction, expected in [(0, None), (1, float("nan")), (2, 0.0)]:
        loss, lse, total_weight = ops.cross_entropy_fwd(x, y, None, reduction, -100, 0.0)
        assert lse.shape == (0, 1, 2) and total_weight.item() == 0
        if expected is None:
            assert loss.shape == (0, 1)
        else:
            torch.testing.assert_close(loss, torch.tensor(expected), equal_nan=True)
        loss, grad = ops.cross_entropy_fwd_grad(x, y, None, reduction, -100, 0.0)
        assert grad.shape == x.shape


@pytest.mark.parametrize("layout", ["rows", "short_rows", "spatial"])
def test_extreme_logits(layout):
    C = 24 if layout == "short_rows" else 40
    x = torch.randn(6, C, 33) * 3
    x[0, :, :] = 1e4 * torch.randn(C, 33)  # large: needs the max subtracted
    x[1, :20, :] = float("-inf")  # masked classes
    x[2, :, :] = float("-inf")  # every class masked: NaN like PyTorch
    x[3, 5, :] = float("nan")
    x[4, :, :] = -1e4 * torch.rand(C, 33)
    y = torch.randint(20, C, (6, 33))
    y[5, :4] = 3
    x[5, 3, :4] = float("-inf")  # the target itself is -inf: loss +inf like PyTorch
    if layout != "spatial":
        x = x[:, :, :1].contiguous()
        y = y[:, :1].contiguous()
    else:
        x = x.contiguous()
    for reduction in ["none", "sum"]:
        ref_loss, ref_grad = reference(x, y, None, reduction, -100, 0.0)
        loss, lse, total_weight = ops.cross_entropy_fwd(x, y, None, REDUCTIONS[reduction], -100, 0.0)
        torch.testing.assert_close(loss.double(), ref_loss.reshape(loss.shape), rtol=1e-5, atol=1e-4, equal_nan=True)
        _, grad = ops.cross_entropy_fwd_grad(x, y, None, REDUCTIONS[reduction], -100, 0.0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6, equal_nan=True)
        grad_b = ops.cross_entropy_bwd(torch.ones_like(loss), x, y, None, lse, total_weight, REDUCTIONS[reduction],
                                       -100, 0.0)
        torch.testing.assert_close(grad_b.double(), ref_grad, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isinf(ops.cross_entropy_fwd(x[5:], y[5:], None, 0, -100, 0.0)[0][0, 0])


def test_all_ignored_mean_is_nan():
    x = torch.randn(4, 10, 1)
    y = torch.full((4, 1), -100)
    loss, _, total_weight = ops.cross_entropy_fwd(x, y, None, 1, -100, 0.0)
    assert torch.isnan(loss) and total_weight.item() == 0
    loss, grad = ops.cross_entropy_fwd_grad(x, y, None, 1, -100, 0.0)
    assert torch.isnan(loss) and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("shape", [(5, 40, 1), (5, 7, 1), (2, 7, 40)], ids=["rows", "short_rows", "spatial"])
@pytest.mark.parametrize("bad", ["C", -1, -101])
def test_out_of_range_target_raises_before_writing(shape, bad):
    C = shape[1]
    bad = C if bad == "C" else bad
    x = torch.randn(shape)
    y = torch.randint(0, C, (shape[0], shape[2]))
    y.view(-1)[3] = bad
    message = (f"fused_xent.cross_entropy: target {bad} at position 3 is out of range for {C} classes "
               f"\\(valid: 0..{C - 1}, or ignore_index=-100\\)")
    with pytest.raises(IndexError, match=message):
        ops.cross_entropy_fwd(x, y, None, 1, -100, 0.0)
    with pytest.raises(IndexError, match=message):
        ops.cross_entropy_fwd_grad(x, y, None, 0, -100, 0.0)
    before = x.clone()
    with pytest.raises(IndexError, match=message):
        ops.cross_entropy_fwd_grad_(x, y, None, 2, -100, 0.0)
    assert torch.equal(x, before)


def test_huge_class_count():
    x = torch.randn(3, 256 * 1024, 1)
    x[1, 100_000:, 0] += 5  # the max grows in a later chunk of the row
    y = torch.tensor([[5], [200_000], [-100]])
    check_all_ops(ops, x[:, :, 0], y[:, 0], None, "mean", -100, 0.1)


@pytest.mark.parametrize("shape", [(300, 1000, 1), (30000, 10, 1), (4, 19, 3000)],
                         ids=["rows", "short_rows", "spatial"])
def test_deterministic_across_runs_and_threads(shape):
    torch.manual_seed(3)
    x = torch.randn(shape)
    y = torch.randint(0, shape[1], (shape[0], shape[2]))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in [1, 2, 3, 1, 2]:
            torch.set_num_threads(n)
            loss, lse, total_weight = ops.cross_entropy_fwd(x, y, None, 1, -100, 0.1)
            loss2, grad = ops.cross_entropy_fwd_grad(x, y, None, 2, -100, 0.1)
            results.append((loss, lse, total_weight, loss2, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(300, 1000, 1), (30000, 10, 1), (4, 19, 3000)],
                         ids=["rows", "short_rows", "spatial"])
def test_flushed_subnormals_on_every_thread(shape):
    """torch.set_flush_denormal sets the calling thread's mode only; every worker of a call computes in it too, so
    the results stay those of one thread (any worker may take any block: a block computed in another mode would
    make them change from run to run)."""
    torch.manual_seed(4)
    x = torch.rand(shape) * -100  # probabilities down to e^-100: gradients below float32's smallest normal
    y = torch.randint(0, shape[1], (shape[0], shape[2]))
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    results = []
    try:
        for n in [1, 2, 2, 2]:
            torch.set_num_threads(n)
            results.append(ops.cross_entropy_fwd_grad(x, y, None, 2, -100, 0.0)[1])
            results.append(ops.cross_entropy_bwd(torch.tensor(1.0), x, y, None, *ops.cross_entropy_fwd(
                x, y, None, 2, -100, 0.0)[1:], 2, -100, 0.0))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    for grad in results:
        subnormal = (grad != 0) & (grad.abs() < torch.finfo(torch.float32).tiny)
        assert not subnormal.any(), f"{int(subnormal.sum())} subnormal gradient entries were not flushed"
    for i in range(2, len(results)):  # forward+gradient and backward, alternately
        assert torch.equal(results[i], results[i % 2])


SIMD_LEVELS = ("default", "avx2", "avx512")


@functools.cache
def levels_this_cpu_runs():
    """SIMD_LEVELS up to the widest this CPU has, as ATen finds it without ATEN_CPU_CAPABILITY. ATen does not cap
    that variable to the CPU: asked for AVX-512 on an AMD EPYC without it (this project's dev machine of 2026-11-30),
    torch's own kernels died of SIGILL. So no test asks a process for a level the CPU lacks."""
    env = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"}
    widest = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            env=env, capture_output=True, text=True, check=True).stdout.strip().lower()
    return SIMD_LEVELS[: SIMD_LEVELS.index(widest) + 1] if widest in SIMD_LEVELS else SIMD_LEVELS[:1]


def skip_unless_this_cpu_runs(level):
    if level not in levels_this_cpu_runs():
        pytest.skip(f"this CPU has no {level} (torch's own kernels would stop at an illegal instruction)")


def test_every_simd_level_agrees(tmp_path):
    """ATEN_CPU_CAPABILITY sets the instruction set exactly as for ATen, and every level this CPU runs gives the same
    loss, lse and gradients within rounding, and rounds 16-bit gradients as torch does. The inputs are made here:
    torch's own random generators also depend on ATEN_CPU_CAPABILITY."""
    torch.manual_seed(0)
    inputs = {}
    # Short rows and channels_last (N, C, S) run lanes on transposed tiles where vectors are wider than one lane,
    # rows in the scalar build: the levels compute them differently.
    shapes = [("rows", (64, 1000, 1)), ("short-rows", (200, 13, 1)), ("short-rows-forward", (200, 37, 1)),
              ("channels-last", (2, 37, 45)), ("spatial", (2, 19, 333)), ("spatial-long", (3, 700, 37))]
    for name, shape in shapes:
        for dtype in DTYPES:
            target = torch.randint(0, shape[1], (shape[0], shape[2]))
            grad_loss = torch.rand(shape[0], shape[2]).to(dtype)
            x = torch.randn(shape) * 3
            if name == "channels-last":
                x = x.transpose(1, 2).contiguous().transpose(1, 2)
            inputs[name, str(dtype)] = (x.to(dtype), target, grad_loss)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
import sys, torch
torch.ops.load_library({_LIBS[0]!r})
ops = torch.ops.fused_xent
out = {{"capability": ops.cpu_capability()}}
for key, (x, y, grad_loss) in torch.load(sys.argv[1]).items():
    loss, lse, total_weight = ops.cross_entropy_fwd(x, y, None, 0, -100, 0.1)
    grad = ops.cross_entropy_bwd(grad_loss, x, y, None, lse, total_weight, 0, -100, 0.1)
    _, fused_grad = ops.cross_entropy_fwd_grad(x, y, None, 1, -100, 0.1)
    misrounded = 0
    if x.dtype in (torch.float16, torch.bfloat16):
        # The same values in float32 give the same float32 gradient, which torch rounds to nearest even.
        wide = x.float()
        _, wide_lse, wide_total = ops.cross_entropy_fwd(wide, y, None, 0, -100, 0.1)
        wide_grad = ops.cross_entropy_bwd(grad_loss.float(), wide, y, None, wide_lse, wide_total, 0, -100, 0.1)
        misrounded += int((grad != wide_grad.to(x.dtype)).sum())
        misrounded += int((fused_grad != ops.cross_entropy_fwd_grad(wide, y, None, 1, -100, 0.1)[1].to(x.dtype)).sum())
    out[key] = (loss, lse, grad, fused_grad, misrounded)
torch.save(out, sys.argv[2])
"""

    def run(capability):
        env = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"}
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        path = tmp_path / f"{capability}.pt"
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(path)], env=env, check=True)
        return torch.load(path)

    levels = levels_this_cpu_runs()
    assert run(None)["capability"] == levels[-1]
    results = {level: run(level) for level in levels}
    for level in levels:
        assert results[level]["capability"] == level
    # float16 and bfloat16 gradients are rounded once, to nearest even, at every level: bit for bit what torch makes
    # of the float32 gradient (truncation stays within the tolerances below, for half of all entries).
    misrounded = {(level, key): results[level][key][4] for level in levels for key in inputs}
    assert not any(misrounded.values()), {where: count for where, count in misrounded.items() if count}
    baseline = results["default"]
    for level in levels[1:]:
        for key, (x, _, _) in inputs.items():
            dtype = x.dtype
            loss, lse, grad, fused_grad, _ = results[level][key]
            expected_loss, expected_lse, expected_grad, expected_fused_grad, _ = baseline[key]
            what = f"{level} {key}"
            assert_close(loss, expected_loss, dtype, f"loss {what}")
            assert_close(lse, expected_lse, torch.float64 if dtype == torch.float64 else torch.float32, f"lse {what}")
            assert_grad_close(grad, expected_grad, dtype, f"backward {what}")
            assert_grad_close(fused_grad, expected_fused_grad, dtype, f"fused gradient {what}")



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes")
def test_ignored_logits_are_never_read():
    """The logits of ignored positions lie on pages that cannot be read (tests/unread_ignored_logits.py): the
    forward, backward and fused forward of rows, NCHW tiles and long lanes all finish, so none touched them."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "unread_ignored_logits.py"), _LIBS[0],
                          "fused_xent"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_nchw_class_indices_past_int32_are_refused():
    """The lane kernels hold class indices in 32-bit lanes: an NCHW input of more than 2^31 - 1 classes is refused
    before anything is read (the logits are never touched: torch.empty commits no memory), where a class index past
    2^31 used to turn negative and its position silently count as ignored."""
    logits = torch.empty((1, 2**31 + 16, 2), dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"at most 2\^31 - 1 classes.*movedim"):
        torch.ops.fused_xent.cross_entropy_fwd(logits, torch.tensor([[2**31 + 5, 7]]), None, 0, -100, 0.0)


@pytest.mark.parametrize("level", ["avx512", "avx2", "default"])
def test_no_access_outside_tensors_under_address_sanitizer(level):
    """tests/cpu_memcheck.py in a process of its own, with AddressSanitizer's runtime preloaded, at each SIMD level
    this CPU has."""
    skip_unless_this_cpu_runs(level)
    assert run_under_address_sanitizer("cpu_memcheck.py", ATEN_CPU_CAPABILITY=level).startswith("ok")


_PRECISION_SCRIPT = f"""
import math, sys, torch
import torch.nn.functional as F
torch.ops.load_library({_LIBS[0]!r})
ops = torch.ops.fused_xent

def fused_loss(x3, y):
    return ops.cross_entropy_fwd(x3, y, None, 0, -100, 0.0)[0]

errors = {{}}
# Near-certain predictions (p_y = 1 - 8e-7): every other class's exp is below half an ulp of the max's 1.
for num_classes in (10, 17, 40, 100, 3000):
    x = torch.zeros(num_classes)
    x[0] = 14 + math.log(num_classes)
    exact = F.cross_entropy(x.double()[None], torch.tensor([0])).item()
    nchw = x[None, :, None, None].expand(2, num_classes, 8, 8).contiguous()
    layouts = {{"rows": x[None].expand(64, num_classes).contiguous(), "nchw": nchw,
                "channels_last": nchw.contiguous(memory_format=torch.channels_last)}}
    for layout, logits in layouts.items():
        target = torch.zeros(logits.shape[:1] + logits.shape[2:], dtype=torch.long)
        ours = fused_loss(logits.flatten(2) if logits.dim() > 2 else logits[..., None],
                          target.view(logits.shape[0], -1))
        theirs = F.cross_entropy(logits, target, reduction="none")
        errors["near-certain", layout, num_classes] = (abs(ours.max().item() - exact), abs(theirs.max().item() - exact))
# Probability targets, not normalised, with weights and smoothing: the recompute backward's sum T of w t', whose
# drift reaches the gradient as T p (largest at a dominant class; the targets here sum to ~C).
torch.manual_seed(0)
for shape in ((4, 20000), (2, 20000, 3), (1, 100000, 2), (2, 100000)):
    x = torch.randn(shape) * 2
    t = torch.softmax(torch.randn(shape) * 2, 1) * 3 - 0.5 / shape[1]
    if shape == (2, 100000):
        x[:, 0], t = 30, torch.rand(shape) + 0.5
    w = torch.rand(shape[1]) + 0.5
    x3, t3 = x.view(shape[0], shape[1], -1), t.view(shape[0], shape[1], -1)
    loss, lse, total = ops.cross_entropy_fwd(x3, t3, w, 2, -100, 0.1)
    ours = ops.cross_entropy_bwd(torch.ones(()), x3, t3, w, lse, total, 2, -100, 0.1).view(shape)
    grads = []
    for dtype in (torch.float64, torch.float32):
        leaf = x.to(dtype).requires_grad_()
        loss = F.cross_entropy(leaf, t.to(dtype), weight=w.to(dtype), reduction="sum", label_smoothing=0.1)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    errors["soft-target backward", shape] = ((ours.double() - grads[0]).abs().max().item(),
                                             (grads[1].double() - grads[0]).abs().max().item())
torch.save(errors, sys.argv[1])
"""


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_never_less_precise_than_pytorch(level, tmp_path):
    """Where float32 rounding decides: a near-certain prediction's tiny loss (a row's exps below half an ulp of the
    max's 1 must not round away: rows, short or long, at every SIMD level keep them apart; NCHW lanes round as
    PyTorch's NCHW kernel does) and the recompute backward's sum of the probability
    targets. At every SIMD level, no farther from float64 than PyTorch's float32 result."""
    skip_unless_this_cpu_runs(level)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level)
    subprocess.run([sys.executable, "-c", _PRECISION_SCRIPT, str(tmp_path / "errors.pt")], env=env, check=True)
    for case, (ours, theirs) in torch.load(tmp_path / "errors.pt").items():
        if case[0] == "soft-target backward":
            assert ours <= 3 * theirs, (level, case, ours, theirs)  # gradient entries: a few roundings either way
            continue
        assert ours <= theirs + 1.2e-7, (level, case, ours, theirs)  # losses ~8e-7 on a grid of ulp(1)
        if case[1] != "nchw":
            assert ours < 1e-3 * 7.8e-7, (level, case, ours)  # rows and channels_last: the exact loss


def test_in_place_op_called_directly_counts_its_write():
    """Called directly (not through the front end), the in-place op moves the version counter of the logits it
    writes over, so an op that saved them refuses to backward from the gradient they now hold, and a leaf that
    requires grad is refused, as PyTorch's in-place ops do (outside no_grad)."""
    leaf, target = check_in_place_call_counts_its_write(ops.cross_entropy_fwd_grad_)
    with torch.no_grad():
        ops.cross_entropy_fwd_grad_(leaf, target, None, 1, -100, 0.0)
    assert leaf._version == 1
