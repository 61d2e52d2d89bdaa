"""The Triton backend (fused_xent/_triton_ops.py) against torch.nn.functional.cross_entropy.

Where the kernels run:
  - CUDA tensors when a GPU is visible (and TRITON_INTERPRET is not set);
  - CPU tensors under the Triton interpreter. TRITON_INTERPRET=1 has to be set before the kernels are decorated and
    would turn every other Triton kernel of the pytest process (Inductor's included) into interpreted ones, so it
    is not set here nor in a conftest: without a GPU, test_interpreter_run re-runs this file in a subprocess with
    TRITON_INTERPRET=1, where the parity tests run on CPU. `TRITON_INTERPRET=1 python -m pytest tests/test_triton.py`
    runs them directly.

Every parity test compares with float64 PyTorch on the same (rounded) inputs, to the tolerances of tests/tolerances.py:
the rounding of the output dtype, and for half-precision gradients float32's atol, since the kernels compute in
float32 and round each entry once.
"""

import itertools
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
import triton  # noqa: E402 (after the importorskip)
import triton.language as tl  # noqa: E402
from helpers import (  # noqa: E402
    ONE_AT_A_TIME_ON_THE_GPU,
    assert_close,
    assert_grad_close,
    expected_lse,
    poison_cuda_cache,
    run_pytest_with_poisoned_allocations,
    torch_reference,
)
from op_checks import check_in_place_call_counts_its_write, check_scale_unit_grad  # noqa: E402

import fused_xent  # noqa: E402
from fused_xent import _triton_ops, triton_kernels  # noqa: E402
from fused_xent._triton_env import NO_DEVICE_FOR_TRITON  # noqa: E402
from fused_xent.triton_kernels import _position_block  # noqa: E402
from fused_xent.triton_launchers import TileConfig  # noqa: E402

ops = torch.ops.fused_xent
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

pytestmark = [
    # The interpreter evaluates masked-off lanes too (log(0), 0 * inf); their results are discarded.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    # With a GPU the whole file runs on it: `pytest -m cuda` (benchmarks/gpu_check.sh) selects it.
    *([pytest.mark.cuda] if DEVICE == "cuda" else []),
]
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="no GPU: these run in test_interpreter_run's subprocess")


# ---------------------------------------------------------------------------------------------------------------
# Inputs and references
# ---------------------------------------------------------------------------------------------------------------

# layout -> (logical shape, how the logits lie in memory)
LAYOUTS = {
    "rows": (5, 7),
    "one_class": (3, 1),
    "wide_rows": (4, 423),
    "nchw": (2, 5, 3, 4),
    "channels_last": (2, 5, 3, 4),
    "ncl": (2, 6, 7),
    "sliced": (4, 9),  # every other column of a (4, 18) tensor: neither unit stride, copied by the op
    "transposed": (6, 5),  # a (5, 6) tensor transposed: class stride 6, S == 1, copied by the op
    "empty": (0, 5),
    # Few positions with many classes: cut into two class ranges each (kernel docstring) on any GPU and under the
    # interpreter (which counts as one multiprocessor); test_split_plan checks that they are.
    "split_rows": (2, 9000),
    "split_ncl": (2, 600, 16),
    # 20 ranges of 256 classes per position on any GPU and under the interpreter: merged in groups (one full group
    # of MERGE_GROUP ranges, one partial), then the groups.
    "many_ranges_ncl": (1, 5120, 16),
}
SPLIT_LAYOUTS = ["split_rows", "split_ncl"]


def make_logits(layout, dtype, scale=3.0, seed=0):
    """A logits tensor (requiring grad, possibly a view of a leaf) with the layout's shape and memory layout."""
    generator = torch.Generator().manual_seed(seed)
    shape = LAYOUTS[layout]
    if layout == "sliced":
        base = torch.randn(shape[0], 2 * shape[1], generator=generator) * scale
        leaf = base.to(DEVICE, dtype).requires_grad_()
        return leaf[:, ::2]
    if layout == "transposed":
        base = torch.randn(shape[1], shape[0], generator=generator) * scale
        leaf = base.to(DEVICE, dtype).requires_grad_()
        return leaf.t()
    x = (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def class_target(x, ignore_index=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (x.shape[0],) + tuple(x.shape[2:])
    target = torch.randint(0, x.shape[1], shape, generator=generator)
    if ignore_index is not None and target.numel() > 1:
        target.view(-1)[::3] = ignore_index  # a third of the positions ignored
    return target.to(DEVICE)


def prob_target(x, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(x.shape, generator=generator).softmax(1).to(DEVICE, x.dtype)


def class_weight(num_classes, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(num_classes, generator=generator) + 0.5).to(DEVICE)


def upstream_grad(loss_shape, dtype, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(loss_shape, generator=generator) + 0.5).to(DEVICE, dtype)


def op_views(x, target):
    """The (N, C, S) / (N, S) views the ops take (what the package's front end builds)."""
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    target_view = target.reshape(N, C, S) if target.is_floating_point() else target.reshape(N, S)
    return x.reshape(N, C, S), target_view


def triton_loss(x, target, weight, reduction, ignore_index, label_smoothing):
    """Loss through triton_cross_entropy_fwd (autograd: triton_cross_entropy_bwd), in F.cross_entropy's shape."""
    logits, target_view = op_views(x, target)
    poison_cuda_cache()
    loss, lse, total_weight = ops.triton_cross_entropy_fwd(
        logits, target_view, weight, REDUCTIONS[reduction], ignore_index, label_smoothing
    )
    # The loss too is in the accumulation dtype: the front end rounds it to the logits' dtype (or not, under autocast).
    assert loss.dtype == lse.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert lse.shape == target_view.shape[:1] + target_view.shape[-1:] + (2,)
    if not torch.compiler.is_compiling():  # the compile tests trace this function
        check_lse(lse, logits, target_view, ignore_index)
    return loss.reshape((x.shape[0],) + tuple(x.shape[2:])) if reduction == "none" else loss


def check_lse(lse, logits, target, ignore_index):
    """The saved lse: the log-sum-exp of each position's logits (its two parts summed), except that an ignored
    position, whose logits the kernels skip, holds the lse of no classes, (0, -inf)."""
    _, expected, kept = expected_lse(logits, target, ignore_index, lse.dtype)
    torch.testing.assert_close(lse.double().sum(-1), expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert (lse[..., 0][~kept] == 0).all()


def reference(x, target, weight, reduction, ignore_index, label_smoothing, grad_out):
    """float64 PyTorch loss and input gradient on the same values."""
    return torch_reference(x, target, grad_out, weight=weight, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def check_parity(x, target, weight, reduction, ignore_index, label_smoothing, grad_out=None):
    loss = triton_loss(x, target, weight, reduction, ignore_index, label_smoothing)
    if grad_out is None:
        grad_out = upstream_grad(loss.shape, loss.dtype)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    expected_loss, expected_grad = reference(x, target, weight, reduction, ignore_index, label_smoothing, grad_out)
    assert_close(loss, expected_loss, loss.dtype)
    assert_grad_close(grad, expected_grad, x.dtype)
    return loss, grad


# ---------------------------------------------------------------------------------------------------------------
# Parity with F.cross_entropy
# ---------------------------------------------------------------------------------------------------------------

ARGUMENT_GRID = list(itertools.product([False, True], ["none", "mean", "sum"], [None, 2], [0.0, 0.2]))


@needs_kernels
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_class_targets_all_arguments(layout):
    """Every layout against every combination of weight, reduction, ignore_index and label_smoothing."""
    for with_weight, reduction, ignored, label_smoothing in ARGUMENT_GRID:
        x = make_logits(layout, torch.float32)
        weight = class_weight(x.shape[1]) if with_weight else None
        ignore_index = -100 if ignored is None else min(ignored, x.shape[1] - 1)
        target = class_target(x, ignore_index if ignored is not None else None)
        check_parity(x, target, weight, reduction, ignore_index, label_smoothing)


@needs_kernels
@pytest.mark.parametrize("layout", ["rows", "wide_rows", "nchw", "channels_last", "sliced", "empty"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_probability_targets(layout, reduction):
    for with_weight, label_smoothing in itertools.product([False, True], [0.0, 0.3]):
        x = make_logits(layout, torch.float32)
        weight = class_weight(x.shape[1]) if with_weight else None
        check_parity(x, prob_target(x), weight, reduction, -100, label_smoothing)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["wide_rows", "nchw", "channels_last"])
def test_dtypes(dtype, layout):
    x = make_logits(layout, dtype)
    weight = class_weight(x.shape[1])
    for reduction in ("none", "mean"):
        check_parity(x, class_target(x, ignore_index=1), weight, reduction, 1, 0.1)
        check_parity(x, prob_target(x), weight, reduction, -100, 0.1)


@needs_kernels
@pytest.mark.parametrize("layout", ["rows", "wide_rows", "nchw", "channels_last"])
def test_small_tiles(layout, monkeypatch):
    """Tiles of 4 positions x 4 classes: many programs, partial blocks on both axes, and the online softmax carried
    across class blocks, including rows whose first blocks are all -inf."""
    monkeypatch.setattr(_triton_ops.triton_launchers, "tile_config", lambda *args: TileConfig(4, 4, 1))
    x = make_logits(layout, torch.float32).detach()
    with torch.no_grad():
        x[0, :4] = float("-inf")
    target = class_target(x, ignore_index=1)
    target[0] = 5 if x.shape[1] > 5 else 4
    weight = class_weight(x.shape[1])
    for reduction, label_smoothing in (("none", 0.0), ("mean", 0.2)):
        check_parity(x.clone().requires_grad_(), target, weight, reduction, 1, label_smoothing)
    x = x.clamp(min=-50)  # probability targets: -inf logits would give NaN (0 * -inf), as in PyTorch
    check_parity(x.clone().requires_grad_(), prob_target(x), weight, "sum", -100, 0.2)
    logits, target_view = op_views(x, target)
    _, expected_grad = reference(logits, target_view, weight, "mean", 1, 0.2, torch.ones((), device=DEVICE))
    _, grad = ops.triton_cross_entropy_fwd_grad(logits, target_view, weight, 1, 1, 0.2)
    assert_grad_close(grad, expected_grad, x.dtype)


@needs_kernels
def test_gradient_keeps_logit_strides():
    for layout in ("rows", "nchw", "channels_last", "ncl"):
        x = make_logits(layout, torch.float32).detach()
        logits, target = op_views(x, class_target(x))
        _, lse, total_weight = ops.triton_cross_entropy_fwd(logits, target, None, 1, -100, 0.0)
        grad = ops.triton_cross_entropy_bwd(torch.tensor(1.0, device=DEVICE), logits, target, None, lse,
                                            total_weight, 1, -100, 0.0)
        assert grad.stride() == logits.stride(), layout
        _, grad = ops.triton_cross_entropy_fwd_grad(logits, target, None, 1, -100, 0.0)
        assert grad.stride() == logits.stride(), layout


@needs_kernels
@pytest.mark.parametrize("layout", ["rows", "wide_rows", "nchw", "channels_last", "sliced", *SPLIT_LAYOUTS])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fwd_grad_and_in_place(layout, reduction, dtype):
    """The gradient written in the forward (fresh, and over the logits) equals autograd's for grad_loss = 1, and the
    fwd_grad op's autograd scales it by the upstream gradient; bfloat16 with a float32 weight (as under autocast)."""
    code = REDUCTIONS[reduction]
    for targets in ("class", "prob"):
        x = make_logits(layout, dtype)
        weight = class_weight(x.shape[1])
        if targets == "class":
            target, ignore_index, label_smoothing = class_target(x, ignore_index=0), 0, 0.1
        else:
            target, ignore_index, label_smoothing = prob_target(x), -100, 0.1
        logits, target_view = op_views(x, target)
        loss_shape = target_view.shape[:1] + target_view.shape[-1:] if reduction == "none" else ()
        expected_loss, expected_grad = reference(
            logits, target_view, weight, reduction, ignore_index, label_smoothing, torch.ones(loss_shape, device=DEVICE)
        )

        leaf = logits.detach().requires_grad_()
        loss, grad = ops.triton_cross_entropy_fwd_grad(leaf, target_view, weight, code, ignore_index, label_smoothing)
        assert_close(loss, expected_loss, x.dtype)
        assert_grad_close(grad, expected_grad, x.dtype)
        grad_out = upstream_grad(loss.shape, loss.dtype)
        (scaled,) = torch.autograd.grad(loss, leaf, grad_out)
        expected_scaled = expected_grad * (grad_out.double().unsqueeze(1) if reduction == "none" else grad_out.double())
        assert_grad_close(scaled, expected_scaled, x.dtype)

        overwritten = logits.detach().clone()
        loss = ops.triton_cross_entropy_fwd_grad_(overwritten, target_view, weight, code, ignore_index, label_smoothing)
        assert_close(loss, expected_loss, x.dtype)
        assert_grad_close(overwritten, expected_grad, x.dtype)


@needs_kernels
def test_in_place_op_refuses_a_weight_in_the_logits_memory():
    """The in-place op writes the gradient over the logits, so in eager calls it refuses a weight that shares their
    memory (as the compiled ops do), before it writes anything."""
    x = (torch.randn(12, 423, generator=torch.Generator().manual_seed(7)) * 3).to(DEVICE)
    logits, target_view = op_views(x, class_target(x, ignore_index=0))
    overwritten = logits.clone()
    with pytest.raises(ValueError, match="the weight's memory range intersects theirs"):
        ops.triton_cross_entropy_fwd_grad_(overwritten, target_view, overwritten[0, :, 0], 1, 0, 0.1)
    assert torch.equal(overwritten, logits)


@needs_kernels
def test_launchers_refuse_tensors_on_another_device():
    """Each launcher refuses a tensor on a device other than the logits' (the compiled ops' check), before any
    kernel is handed its pointer. Called below the ops' dispatch, where the device of the logits picks the kernel;
    a meta tensor stands in for a second GPU."""
    from fused_xent import triton_launchers

    x = (torch.randn(4, 9, generator=torch.Generator().manual_seed(8)) * 3).to(DEVICE)
    logits, target = op_views(x, class_target(x))
    weight = class_weight(x.shape[1])
    elsewhere = {"target": target.to("meta"), "weight": weight.to("meta")}
    for name, other in elsewhere.items():
        args = {"target": target, "weight": weight, name: other}
        with pytest.raises(RuntimeError, match=rf"{name} is on meta, not on the device of logits \({logits.device}\)"):
            triton_launchers.cross_entropy_fwd(logits, args["target"], args["weight"], 1, -100, 0.0)
    _, lse, total_weight = triton_launchers.cross_entropy_fwd(logits, target, weight, 1, -100, 0.0)
    grad_loss = torch.ones((), device=DEVICE)
    for name in ("grad_loss", "lse", "total_weight"):
        args = {"grad_loss": grad_loss, "lse": lse, "total_weight": total_weight}
        args[name] = args[name].to("meta")
        with pytest.raises(RuntimeError, match=rf"{name} is on meta, not on the device of logits \({logits.device}\)"):
            triton_launchers.cross_entropy_bwd(args["grad_loss"], logits, target, weight, args["lse"],
                                             args["total_weight"], 1, -100, 0.0)
    grad = logits.detach().clone()
    with pytest.raises(RuntimeError, match=rf"grad_loss is on meta, not on the device of grad \({grad.device}\)"):
        triton_launchers.scale_unit_grad_(grad, grad_loss.to("meta"), target, -100)
    assert torch.equal(grad, logits)


@needs_kernels
def test_in_place_ops_called_directly_count_their_writes():
    """Called directly, the in-place ops move the version counter of the tensor they write (so an op that saved it
    refuses to backward from what it now holds) and refuse a leaf that requires grad, as the compiled ops do."""
    leaf, target = check_in_place_call_counts_its_write(ops.triton_cross_entropy_fwd_grad_, DEVICE)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.triton_scale_unit_grad_(leaf, torch.ones((), device=DEVICE), target, -100)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_scale_unit_grad(dtype):
    """triton_scale_unit_grad_, the backward of the in_forward and inplace modes: PyTorch's ops bit for bit (in
    bfloat16 under the interpreter within one rounding: it truncates to bfloat16 where a GPU rounds to nearest)."""
    check_scale_unit_grad(ops.triton_scale_unit_grad_, dtype, DEVICE,
                          exact=not (INTERPRETED and dtype == torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("grad_mode", ["in_forward", "inplace"])
@pytest.mark.parametrize("layout", ["wide_rows", "channels_last"])
def test_public_api_scales_the_gradient_made_in_forward_in_place(grad_mode, layout):
    """fused_xent.cross_entropy(backend="triton"): the backward scales the forward's gradient on the device and
    hands that buffer to autograd (in place: the logits' memory), for the unit upstream gradient of loss.backward(),
    a mean over accumulation steps and an overflowed loss scale, under which ignored positions stay 0."""
    for grad_out in (1.0, 0.25, float("inf")):
        x = make_logits(layout, torch.float32)
        target = class_target(x, ignore_index=-100)
        leaf = x.detach().requires_grad_()
        logits = leaf if grad_mode == "in_forward" else leaf.clone()  # clone's backward passes the gradient on
        loss = fused_xent.cross_entropy(logits, target, backend="triton", grad_mode=grad_mode)
        loss.backward(torch.tensor(grad_out, device=DEVICE), retain_graph=True)
        ignored = (target == -100).unsqueeze(1).expand_as(x)
        assert leaf.grad[ignored].eq(0).all(), grad_out
        if math.isinf(grad_out):  # PyTorch's own mix of inf and NaN there: README, "Non-finite values"
            assert not leaf.grad[~ignored].isfinite().any()
        else:
            _, expected = reference(x, target, None, "mean", -100, 0.0, torch.tensor(grad_out, device=DEVICE))
            assert_grad_close(leaf.grad, expected, torch.float32)
        if grad_mode == "inplace":
            assert leaf.grad.data_ptr() == logits.data_ptr()
        with pytest.raises(RuntimeError, match="runs backward once.*retain_graph=True.*grad_mode='recompute'"):
            loss.backward()  # the graph is still there: it would scale the handed-out gradient again


# ---------------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------------


@needs_kernels
def test_all_ignored_and_empty():
    x = make_logits("rows", torch.float32)
    target = torch.full((x.shape[0],), -100, device=DEVICE)
    for label_smoothing in (0.0, 0.2):
        loss, grad = check_parity(x, target, None, "mean", -100, label_smoothing)
        assert loss.isnan() and bool((grad == 0).all())
        check_parity(x, target, class_weight(x.shape[1]), "sum", -100, label_smoothing)
    empty = make_logits("empty", torch.float32)
    assert triton_loss(empty, class_target(empty), None, "mean", -100, 0.0).isnan()
    assert triton_loss(empty, class_target(empty), None, "sum", -100, 0.0) == 0
    assert triton_loss(empty, class_target(empty), None, "none", -100, 0.0).shape == (0,)


@needs_kernels
def test_mean_over_cancelling_weights():
    """Counted targets whose negative weights cancel: the nonzero sum over 0, ±inf, as PyTorch divides; with label
    smoothing NaN (README)."""
    x = make_logits("rows", torch.float32).detach()
    target = torch.full((x.shape[0],), -100, device=DEVICE)
    target[:4] = torch.tensor([0, 1, 0, 1])
    weight = torch.ones(x.shape[1], device=DEVICE)
    weight[1] = -1.0
    expected = torch.nn.functional.cross_entropy(x.double(), target, weight.double())
    assert expected.isinf()
    assert triton_loss(x, target, weight, "mean", -100, 0.0) == expected
    assert triton_loss(x, target, weight, "mean", -100, 0.1).isnan()


@needs_kernels
@pytest.mark.parametrize("layout", ["wide_rows", "nchw", "split_ncl"])
def test_extreme_logits(layout):
    """-inf logits (not at the target), +-1e4 logits, and a NaN that must stay in its own position."""
    x = make_logits(layout, torch.float32).detach()
    target = class_target(x)
    with torch.no_grad():
        x[:, 2] = float("-inf")
        target[target == 2] = 0
        x[:, 3] = 1e4
        x[:, 4] = -1e4
    weight = class_weight(x.shape[1])
    for reduction, label_smoothing in itertools.product(("none", "mean"), (0.0, 0.1)):
        check_parity(x.clone().requires_grad_(), target, weight, reduction, -100, label_smoothing)
    for label_smoothing in (0.0, 0.1):
        check_parity(x.clone().requires_grad_(), prob_target(x), weight, "none", -100, label_smoothing)

    with torch.no_grad():
        x[0, 1] = float("nan")
    loss = triton_loss(x, target, weight, "none", -100, 0.0)  # with smoothing, the -inf column makes all inf
    assert loss.view(x.shape[0], -1)[0, 0].isnan()
    assert loss.view(x.shape[0], -1)[1:].isfinite().all()
    check_parity(x.clone().requires_grad_(), target, weight, "none", -100, 0.1)


@needs_kernels
@pytest.mark.parametrize("layout", ["wide_rows", "nchw", "split_ncl"])
def test_near_ties_at_huge_logits(layout):
    """Logits near 1.2e4 with the top classes within a unit: the loss and both gradients keep float32 precision
    (lse - x taken from the max and log(sum) apart, which the backward gets saved apart; tests/test_numerics.py)."""
    x = make_logits(layout, torch.float32).detach() * 3 + 12345.6
    with torch.no_grad():
        x[:, 1] = 12380.3
        x[:, 2] = 12379.9
        x[:, 3] = 12380.8
    target = class_target(x)
    logits, target_view = op_views(x, target)
    one = torch.ones((), device=DEVICE)
    expected_loss, expected_grad = reference(logits, target_view, None, "mean", -100, 0.0, one)
    loss, _, _ = ops.triton_cross_entropy_fwd(logits, target_view, None, 1, -100, 0.0)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=0)
    _, grad = ops.triton_cross_entropy_fwd_grad(logits, target_view, None, 1, -100, 0.0)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=2e-6, atol=2e-6 * scale)
    (grad,) = torch.autograd.grad(triton_loss(x.requires_grad_(), target, None, "mean", -100, 0.0), x)
    torch.testing.assert_close(grad.double(), expected_grad.reshape(x.shape), rtol=2e-6, atol=2e-6 * scale)


@needs_kernels
@pytest.mark.parametrize("layout", ["rows", "wide_rows", "nchw", "split_rows", "split_ncl"])
def test_near_certain_target_at_huge_logits(layout):
    """A target 8 above every other class at logits of 1.2e4: its p - 1 = -(C - 1) e^-8, below the rounding of a
    float32 lse there, keeps float32 precision in the recomputing backward and the fused gradient
    (tests/test_numerics.py)."""
    x = make_logits(layout, torch.float32).detach().abs() * 0.1 + 11992.0
    target = class_target(x)
    x = x.scatter(1, target.unsqueeze(1), 12000.0)
    logits, target_view = op_views(x, target)
    one = torch.ones((), device=DEVICE)
    _, expected_grad = reference(logits, target_view, None, "sum", -100, 0.0, one)
    _, grad = ops.triton_cross_entropy_fwd_grad(logits, target_view, None, 2, -100, 0.0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(triton_loss(x.requires_grad_(), target, None, "sum", -100, 0.0), x)
    torch.testing.assert_close(grad.double(), expected_grad.reshape(x.shape), rtol=0, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("layout", ["wide_rows", "nchw", "split_ncl", "many_ranges_ncl"])
def test_loss_sums_at_offset_logits(layout):
    """Label smoothing and probability targets at logits far from 0, and with class 0 masked at -1e9, keep float32
    precision: their sums are taken relative to the position's max, in split ranges too (tests/test_numerics.py)."""
    offset = make_logits(layout, torch.float32).detach() * 0.7 + 1.2e4
    masked = make_logits(layout, torch.float32).detach()
    masked[:, 0] = -1e9
    weight = class_weight(offset.shape[1])
    for x in (offset, masked):
        for target, smoothing in ((prob_target(x), 0.2), (class_target(x), 0.3)):
            logits, target_view = op_views(x, target)
            loss_shape = target_view.shape[:1] + target_view.shape[-1:]
            expected, _ = reference(logits, target_view, weight, "none", -100, smoothing,
                                    torch.ones(loss_shape, device=DEVICE))
            loss, _, _ = ops.triton_cross_entropy_fwd(logits, target_view, weight, 0, -100, smoothing)
            torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)


@needs_kernels
@pytest.mark.parametrize("layout", ["rows", "wide_rows", "nchw", "split_ncl"])
def test_infinite_weight_of_an_absent_class(layout):
    """Inverse-frequency weights are inf for a class that no target names: without smoothing, as in PyTorch, the
    loss and gradient stay finite (only the smoothing term reads the sum of all weights)."""
    x = make_logits(layout, torch.float32)
    target = class_target(x) % (x.shape[1] - 1)  # the last class never occurs
    weight = 1.0 / torch.bincount(target.flatten(), minlength=x.shape[1]).float()
    assert weight.isinf().any()
    for reduction in ("mean", "none"):
        check_parity(x, target, weight, reduction, -100, 0.0)


@needs_kernels
def test_out_of_range_target_gives_nan_without_reading_out_of_bounds():
    x = make_logits("rows", torch.float32).detach()
    target = class_target(x)
    target[1] = x.shape[1]
    target[3] = -5
    logits, target_view = op_views(x, target)
    loss, _, total_weight = ops.triton_cross_entropy_fwd(logits, target_view, None, 0, -100, 0.0)
    assert loss[1].isnan().all() and loss[3].isnan().all() and loss[[0, 2, 4]].isfinite().all()
    assert total_weight.isnan()
    _, grad = ops.triton_cross_entropy_fwd_grad(logits, target_view, None, 0, -100, 0.0)
    assert grad[1].isnan().all() and grad[[0, 2, 4]].isfinite().all()


@needs_kernels
@pytest.mark.parametrize("layout", SPLIT_LAYOUTS)
def test_split_positions_out_of_range_target_and_empty_ranges(layout):
    """Split positions: an out-of-range target gives NaN in its own position only; classes from 100 on all -inf,
    so that whole ranges hold nothing but -inf and must merge as empty, not as NaN."""
    x = make_logits(layout, torch.float32).detach()
    target = class_target(x).clamp(max=99)
    with torch.no_grad():
        x[:, 100:] = float("-inf")
    check_parity(x.clone().requires_grad_(), target, class_weight(x.shape[1]), "mean", -100, 0.0)
    target.view(-1)[0] = x.shape[1]
    logits, target_view = op_views(x, target)
    loss, _, _ = ops.triton_cross_entropy_fwd(logits, target_view, None, 0, -100, 0.0)
    assert loss.view(-1)[0].isnan() and loss.view(-1)[1:].isfinite().all()
    _, grad = ops.triton_cross_entropy_fwd_grad(logits, target_view, None, 0, -100, 0.0)
    first = grad[0, :, 0]
    assert first.isnan().all() and grad[1].isfinite().all()


@needs_kernels
def test_upstream_gradient_of_stride_zero():
    """loss.sum().backward() hands the backward an expanded (stride 0) grad_loss for reduction none."""
    x = make_logits("channels_last", torch.float32)
    target = class_target(x, ignore_index=0)
    loss = triton_loss(x, target, None, "none", 0, 0.1)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    _, expected = reference(x, target, None, "none", 0, 0.1, torch.ones(loss.shape, device=DEVICE))
    assert_grad_close(grad, expected, x.dtype)


@needs_kernels
@pytest.mark.parametrize("layout", ["wide_rows", *SPLIT_LAYOUTS])
def test_deterministic(layout):
    x = make_logits(layout, torch.float32)
    target = class_target(x, ignore_index=0)
    runs = []
    for _ in range(2):
        loss = triton_loss(x, target, class_weight(x.shape[1]), "mean", 0, 0.1)
        runs.append((loss, *torch.autograd.grad(loss, x)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("layout", SPLIT_LAYOUTS)
@pytest.mark.parametrize("multiprocessors", [1, 132])
def test_split_layouts_are_split(monkeypatch, layout, multiprocessors):
    """The split layouts above take the split kernels under the interpreter (planned as one multiprocessor) and on an
    H200 alike, so the parity tests cover them in CI and on the GPU."""
    launchers = _triton_ops.triton_launchers
    monkeypatch.setattr(launchers, "gpu_capacity", lambda device: launchers.GpuCapacity(multiprocessors, 64))
    monkeypatch.setattr(launchers, "check_device", lambda device: None)
    shape = LAYOUTS[layout]
    N, C = shape[:2]
    logits = torch.empty(shape).reshape(N, C, -1)
    problem = launchers._problem(logits, torch.zeros(N, logits.shape[2], dtype=torch.long), None, 1, 0.0)
    # Three ranges of whole column blocks, the last partial: 4096 + 4096 + 808 classes, 256 + 256 + 88.
    assert (problem.splits, problem.split_len) == (3, 4096 if C == 9000 else 256)


@pytest.mark.parametrize("multiprocessors", [1, 132])
def test_many_ranges_layout_takes_more_ranges_than_a_merge_group(monkeypatch, multiprocessors):
    launchers = _triton_ops.triton_launchers
    monkeypatch.setattr(launchers, "gpu_capacity", lambda device: launchers.GpuCapacity(multiprocessors, 64))
    monkeypatch.setattr(launchers, "check_device", lambda device: None)
    N, C, S = LAYOUTS["many_ranges_ncl"]
    problem = launchers._problem(torch.empty(N, C, S), torch.zeros(N, S, dtype=torch.long), None, 1, 0.0)
    assert problem.splits == 20 and launchers.MERGE_GROUP < problem.splits < 2 * launchers.MERGE_GROUP


@pytest.mark.parametrize("properties,expected", [
    (dict(multi_processor_count=132, max_threads_per_multi_processor=2048, warp_size=32), (132, 64)),  # H200
    (dict(multi_processor_count=82, max_threads_per_multi_processor=1536, warp_size=32), (82, 48)),  # RTX 3090
    (dict(multi_processor_count=304, max_threads_per_multi_processor=2048, warp_size=64), (304, 32)),  # MI300X
    (dict(multi_processor_count=40, max_threads_per_multi_processor=1024), (40, 32)),  # no warp_size: 32
])
def test_gpu_capacity_is_read_from_the_device(monkeypatch, properties, expected):
    launchers = _triton_ops.triton_launchers
    monkeypatch.setattr(launchers, "_cuda_properties", lambda device: types.SimpleNamespace(**properties))
    assert launchers.gpu_capacity(torch.device("cuda")) == launchers.GpuCapacity(*expected)
    assert launchers.gpu_capacity(torch.device("cpu")) == launchers.GpuCapacity(1, 64)  # the interpreter's


H200 = (132, 64)  # multiprocessors, warps each holds
RTX_3090 = (82, 48)  # sm_86: 1536 threads per multiprocessor


@pytest.mark.parametrize(
    "gpu,num_classes,positions,spatial,element_size,expected",
    [
        (H200, 128256, 8192, False, 2, (1, 128256)),  # thousands of rows fill the GPU
        (H200, 256000, 512, False, 2, (1, 256000)),  # a wave of 16-warp programs: not split
        (H200, 256000, 64, False, 2, (16, 16384)),
        (H200, 128256, 1, False, 2, (16, 8192)),  # 15.7 column blocks: 16 ranges, the last one partial
        (H200, 128256, 1, False, 4, (32, 4096)),
        (RTX_3090, 256000, 64, False, 2, (8, 32768)),  # three 16-warp programs per multiprocessor, not four
        (H200, 32000, 8 * 256, True, 2, (250, 128)),  # (8, 32000, 256) NCHW: a range of 128 classes per program
        (RTX_3090, 32000, 8 * 256, True, 2, (223, 144)),
        (H200, 150, 8 * 16, True, 4, (1, 150)),  # too few classes to split
        (H200, 256000, 8 * 256, True, 4, (500, 512)),  # at most MAX_SPLITS ranges: the combine merges them in turn
    ],
)
def test_split_plan_on_a_gpu(monkeypatch, gpu, num_classes, positions, spatial, element_size, expected):
    """class_splits from the device's capacity: splits only where positions leave it idle, ranges of whole column
    blocks that cover the classes with no empty range."""
    launchers = _triton_ops.triton_launchers
    monkeypatch.setattr(launchers, "gpu_capacity", lambda device: launchers.GpuCapacity(*gpu))
    N = 8 if spatial else positions
    S = positions // N
    tile = launchers.tile_config(num_classes, S, spatial, element_size)
    programs = N * math.ceil(S / tile.block_p) if spatial else math.ceil(positions / tile.block_p)
    splits, split_len = launchers.class_splits(num_classes, programs, tile, torch.device("cuda"))
    assert (splits, split_len) == expected
    assert split_len % tile.block_c == 0 or splits == 1
    assert (splits - 1) * split_len < num_classes <= splits * split_len


def _free_cuda_gib():
    return torch.cuda.mem_get_info()[0] / 2**30 if DEVICE == "cuda" else 0.0


@pytest.mark.skipif(DEVICE != "cuda" or _free_cuda_gib() < 24, reason="needs a GPU with 24 GiB free")
@ONE_AT_A_TIME_ON_THE_GPU
@pytest.mark.parametrize("shape", [(65_600, 32_768), (2, 19, 2**26)], ids=["rows", "nchw"])
def test_more_than_2_pow_31_elements(shape):
    """Offsets past 2**31 elements (int64 indexing), rows and NCHW: the loss, the gradient recomputed in backward
    and the one written in the forward, on the last positions (whose logits lie past 2**31) against PyTorch; the
    recomputed gradient is 0 wherever the upstream gradient is, so no position writes another's entries."""
    torch.manual_seed(0)
    N, C = shape[:2]
    logits = torch.randn(shape, device="cuda", dtype=torch.bfloat16).view(N, C, -1)
    assert logits.numel() > 2**31
    S = logits.shape[2]
    target = torch.randint(0, C, (N, S), device="cuda")
    tail = (slice(N - 4 if S == 1 else N - 1, None), slice(max(0, S - 1000), None))
    tail_logits = (tail[0], slice(None), tail[1])
    grad_loss = torch.zeros(N, S, device="cuda", dtype=torch.bfloat16)
    grad_loss[tail] = 1
    expected_loss, expected_grad = torch_reference(logits[tail_logits], target[tail], grad_loss[tail], reduction="none")

    poison_cuda_cache()
    loss, lse, total_weight = ops.triton_cross_entropy_fwd(logits, target, None, 0, -100, 0.0)
    assert_close(loss[tail], expected_loss, torch.bfloat16, "loss past 2**31")
    grad = ops.triton_cross_entropy_bwd(grad_loss, logits, target, None, lse, total_weight, 0, -100, 0.0)
    assert_grad_close(grad[tail_logits], expected_grad, torch.bfloat16, "recomputed gradient past 2**31")
    grad[tail_logits] = 0
    assert torch.count_nonzero(grad) == 0, "a gradient entry where the upstream gradient is 0"
    del loss, lse, total_weight, grad

    poison_cuda_cache()
    loss, grad = ops.triton_cross_entropy_fwd_grad(logits, target, None, 0, -100, 0.0)
    assert_close(loss[tail], expected_loss, torch.bfloat16, "loss past 2**31, gradient in the forward")
    assert_grad_close(grad[tail_logits], expected_grad, torch.bfloat16, "gradient in the forward past 2**31")


@triton.jit
def _position_block_probe(out_ptr, pid, num_positions, S, stride_n, BLOCK_P: tl.constexpr):
    """Stores what _position_block gives program `pid` of a spatial problem: n, its first s, flat index and logit
    offset, and how many of its positions exist."""
    n, s, index, offset, in_range = _position_block(pid, num_positions, S, stride_n, 1, BLOCK_P, True)
    tl.store(out_ptr, n)
    tl.store(out_ptr + 1, tl.min(s, axis=0))
    tl.store(out_ptr + 2, tl.min(index, axis=0))
    tl.store(out_ptr + 3, tl.min(offset, axis=0))
    tl.store(out_ptr + 4, tl.sum(in_range.to(tl.int64), axis=0))


@needs_kernels
@pytest.mark.parametrize("block_p", [256, 512, 1024])
def test_position_block_of_a_spatial_size_just_below_2_pow_31(block_p):
    """The last program of N = 2 batch entries of S = 2**31 - 1 positions, S arriving as int32 (tl.cdiv(S, BLOCK_P)
    wrapped there, sending the program to n = -1). The probe runs only the index arithmetic, for the program id
    it is given: no tensor of that size is needed."""
    N, C, S = 2, 3, 2**31 - 1
    blocks_per_n = -(-S // block_p)
    last_pid, first_s = N * blocks_per_n - 1, (blocks_per_n - 1) * block_p
    out = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    _position_block_probe[(1,)](out, last_pid, N * S, S, C * S, BLOCK_P=block_p)
    assert out.tolist() == [N - 1, first_s, (N - 1) * S + first_s, (N - 1) * C * S + first_s, S - first_s]


# ---------------------------------------------------------------------------------------------------------------
# torch.library integration
# ---------------------------------------------------------------------------------------------------------------

# The interpreter cannot be captured into a graph (torch.library.wrap_triton leaves interpreted kernels unwrapped),
# so on CPU opcheck skips its aot_autograd test; on CUDA it runs them all.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") if INTERPRETED else (
    "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@needs_kernels
def test_opcheck():
    x = make_logits("nchw", torch.float32).detach()
    weight = class_weight(x.shape[1])
    for target, ignore_index in ((class_target(x, ignore_index=0), 0), (prob_target(x), -100)):
        logits, target_view = op_views(x, target)
        args = (logits.requires_grad_(), target_view, weight, 1, ignore_index, 0.1)
        torch.library.opcheck(ops.triton_cross_entropy_fwd, args, test_utils=OPCHECK_UTILS)
        torch.library.opcheck(ops.triton_cross_entropy_fwd_grad, args, test_utils=OPCHECK_UTILS)
        _, lse, total_weight = ops.triton_cross_entropy_fwd(*args)
        grad_loss = torch.tensor(0.5, device=DEVICE)
        bwd_args = (grad_loss, logits.detach(), target_view, weight, lse, total_weight, 1, ignore_index, 0.1)
        torch.library.opcheck(ops.triton_cross_entropy_bwd, bwd_args, test_utils=OPCHECK_UTILS)
        in_place_args = (logits.detach().clone(),) + args[1:]
        torch.library.opcheck(ops.triton_cross_entropy_fwd_grad_, in_place_args, test_utils=OPCHECK_UTILS)
        scale_args = (logits.detach().clone(), grad_loss, None if target.is_floating_point() else target_view,
                      ignore_index)
        torch.library.opcheck(ops.triton_scale_unit_grad_, scale_args, test_utils=OPCHECK_UTILS)


@needs_kernels
def test_torch_compile_fullgraph():
    """Eager backend on CPU (Dynamo traces the ops without a graph break; the interpreter can go no further),
    Inductor on CUDA."""
    backend = "eager" if INTERPRETED else "inductor"
    x = make_logits("channels_last", torch.float32)
    target = class_target(x, ignore_index=0)
    weight = class_weight(x.shape[1])

    def loss_fn(x, target):
        return triton_loss(x, target, weight, "mean", 0, 0.1) * 2.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    loss = compiled(x, target)
    (grad,) = torch.autograd.grad(loss, x)
    expected_loss = loss_fn(x, target)
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


@needs_kernels
@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_inplace_traces_over_fake_tensors(tracing_mode):
    """The in-place op refuses to write into a leaf by reading the logits' autograd metadata, which a trace's fake
    tensors do not carry below autograd (reading it there failed an internal assert of PyTorch's): the trace of
    grad_mode="inplace" (make_fx, as AOTAutograd and memory estimators trace), and of the op under torch.compile,
    gives PyTorch's loss and gradient."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = make_logits("rows", torch.float32).detach()
    target = class_target(x, ignore_index=-100)

    def loss_and_grad(loss_fn, x, target):
        leaf = x.detach().requires_grad_()
        loss = loss_fn(leaf * 1, target, label_smoothing=0.1)
        return loss, torch.autograd.grad(loss, leaf)[0]

    def fused(x, target, **kwargs):
        return fused_xent.cross_entropy(x, target, backend="triton", grad_mode="inplace", **kwargs)

    graph = make_fx(lambda *args: loss_and_grad(fused, *args), tracing_mode=tracing_mode)(x, target)
    torch.testing.assert_close(graph(x, target), loss_and_grad(F.cross_entropy, x, target))

    def op_in_place(x, target):
        logits = (x * 1).view(*x.shape, 1)
        return ops.triton_cross_entropy_fwd_grad_(logits, target.view(-1, 1), None, 1, -100, 0.1), logits

    compiled = torch.compile(op_in_place, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x.requires_grad_(), target), op_in_place(x, target))


@needs_kernels
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_torch_compile_keeps_the_batch_size_dynamic(target_kind):
    """A batch dim marked dynamic stays symbolic through the ops' fake kernels (which run the launchers on fake
    tensors): one graph serves every batch size, with PyTorch's loss and gradient. A launcher that turned the
    symbolic size into a Python number pinned it to the first one (a ConstraintViolationError here)."""
    backend = "eager" if INTERPRETED else "inductor"
    compiled = torch.compile(lambda x, t: fused_xent.cross_entropy(x, t, backend="triton"), fullgraph=True,
                             backend=backend)
    g = torch.Generator().manual_seed(3)
    for batch in (4, 9):
        x = torch.randn(batch, 7, generator=g).to(DEVICE).requires_grad_(True)
        t = (torch.rand(batch, 7, generator=g).softmax(1) if target_kind == "prob"
             else torch.randint(0, 7, (batch,), generator=g)).to(DEVICE)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(t, 0)
        loss = compiled(x, t)
        expected = F.cross_entropy(x, t)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x)[0])


@needs_kernels
@pytest.mark.skipif(not INTERPRETED, reason="interpreter only")
def test_interpreter_refuses_graph_capture():
    x = make_logits("rows", torch.float32)
    target = class_target(x)
    compiled = torch.compile(lambda x, t: triton_loss(x, t, None, "mean", -100, 0.0), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(Exception, match="cannot be captured into a graph"):
        compiled(x, target)


# ---------------------------------------------------------------------------------------------------------------
# Without the kernels: availability, errors, and the graph the ops give torch.compile
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="checks the process without TRITON_INTERPRET")
def test_cpu_tensors_without_interpreter_raise_a_clear_error():
    x = torch.randn(3, 4, 1)
    target = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="on CPU set TRITON_INTERPRET=1 before importing fused_xent"):
        ops.triton_cross_entropy_fwd(x, target, None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _triton_ops.check_device(torch.device("cpu"))
    assert _triton_ops.unavailable_reason() == (None if torch.cuda.is_available() else NO_DEVICE_FOR_TRITON)


def _run_python(code, **env):
    root = Path(__file__).resolve().parents[1]
    python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *code], cwd=root, env=dict(os.environ, PYTHONPATH=python_path, **env),
        capture_output=True, text=True, timeout=600, check=False,
    )


@pytest.mark.skipif(INTERPRETED, reason="checked from the main process")
def test_import_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fused_xent._triton_ops as t\n"
        "assert 'triton is not importable' in t.unavailable_reason()\n"
        "assert not hasattr(torch.ops.fused_xent, 'triton_cross_entropy_fwd')\n"
    )
    result = _run_python(["-c", script])
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.6", True),  # torch 2.11's Triton (the H200 image's) beside today's NumPy
    ("3.5.1", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False),
    ("3.8.0+git1a2b3c", "2.5.0", False),
])
def test_interpreter_versions_that_cannot_run_together(triton_version, numpy_version, refused):
    from fused_xent._triton_env import interpreter_incompatibility

    reason = interpreter_incompatibility(triton_version, numpy_version)
    assert (reason is not None) == refused
    if refused:
        assert f"Triton {triton_version}'s interpreter" in reason and "install 'numpy<2.4'" in reason


@pytest.mark.skipif(INTERPRETED, reason="starts its own interpreter process")
def test_interpreter_that_cannot_run_is_refused_with_the_fix():
    """Triton before 3.7 interprets no kernel under NumPy 2.4 (see interpreter_incompatibility): the backend is
    unavailable, and both the public API and the ops say why and what to install, instead of an InterpreterError
    from deep inside the first kernel. Versions as on the H200's image with NumPy 2.4 (faked here)."""
    script = (
        "import numpy; numpy.__version__ = '2.4.6'\n"
        "import triton; triton.__version__ = '3.6.0'\n"
        "import pytest, torch, fused_xent\n"
        "assert 'triton' not in fused_xent.available_backends()\n"
        "x, y = torch.randn(3, 4), torch.tensor([0, 1, 3])\n"
        "with pytest.raises(RuntimeError, match=r\"backend 'triton' is not available.*install 'numpy<2.4'\"):\n"
        "    fused_xent.cross_entropy(x, y, backend='triton')\n"
        "with pytest.raises(RuntimeError, match=r\"Triton 3.6.0's interpreter .* NumPy 2.4.6\"):\n"
        "    torch.ops.fused_xent.triton_cross_entropy_fwd(x.view(3, 4, 1), y.view(3, 1), None, 1, -100, 0.0)\n"
    )
    result = _run_python(["-c", script], TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(INTERPRETED or torch.version.cuda is None, reason="needs a CUDA build of torch, no interpreter")
def test_ops_decompose_to_kernel_calls_on_fake_cuda_tensors():
    """AOT autograd over fake CUDA tensors (no GPU needed) decomposes the ops into triton_kernel_wrapper HOPs, the
    graph Inductor compiles on a GPU. (Without a GPU, torch cannot analyse which arguments a kernel writes and
    logs a warning; it then assumes all of them.)"""
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = []

    def capture(graph, example_inputs):
        graphs.append(graph.code)
        return graph

    def fwd_grad_in_place(logits, target, weight):
        return ops.triton_cross_entropy_fwd_grad_(logits, target, weight, 1, -100, 0.1)

    with FakeTensorMode():
        logits = torch.empty(8, 5, 12, device="cuda")
        target = torch.empty(8, 12, dtype=torch.long, device="cuda")
        weight = torch.empty(5, device="cuda")
        aot_function(fwd_grad_in_place, fw_compiler=capture)(logits, target, weight)
    (code,) = graphs
    assert code.count("triton_kernel_wrapper_functional(") == 2, code  # target weights, then the fused pass
    assert "'SPATIAL': True" in code and "'WRITE_GRAD': True" in code, code


class _CompileOnly:
    """Stands in for triton_launchers._launch: compiles each kernel specialization a launcher asks for down to a
    cubin for Hopper (sm_90, the H200) with the ptxas that ships with Triton, and launches nothing. Catches what the
    interpreter cannot: type errors of compiled code, float64 lowering, unsupported ops. Uses Triton internals
    (argument binding and packing, as JITFunction.run does), so it skips on versions that lack them."""

    def __init__(self):
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource, make_backend
            from triton.runtime.jit import create_function_from_signature
        except ImportError as error:
            pytest.skip(f"this Triton lacks the internals for offline compilation: {error}")
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.ast_source = ASTSource
        self.bind = create_function_from_signature
        self.compiled = {}

    def __call__(self, kernel, grid, *args, **kwargs):
        import triton

        binder = self.bind(kernel.signature, kernel.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            self.backend, kwargs, bound_args, specialization, options
        )
        key = (kernel.__name__, str(signature), str(constexprs), str(attrs), str(options))
        if key not in self.compiled:
            source = self.ast_source(kernel, signature, constexprs, attrs)
            self.compiled[key] = triton.compile(source, target=self.target, options=options.__dict__)


def compile_for_hopper(monkeypatch):
    """(compile_only, triton_launchers) with every launch of the launchers' module replaced by _CompileOnly: each
    specialization the launchers ask for is compiled for sm_90 (compile_only.compiled) and nothing runs."""
    compile_only = _CompileOnly()
    launchers = _triton_ops.triton_launchers
    monkeypatch.setattr(launchers, "_launch", compile_only)
    monkeypatch.setattr(launchers, "check_device", lambda device: None)
    return compile_only, launchers


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="without a GPU only (with one, the kernels run)")
def test_every_specialization_compiles_for_hopper(monkeypatch):
    compile_only, launchers = compile_for_hopper(monkeypatch)
    for dtype, shape in itertools.product([torch.float32, torch.bfloat16, torch.float64], [(3, 5000), (2, 19, 64)]):
        x = torch.randn(shape, dtype=dtype)
        N, C = shape[:2]
        logits = x.reshape(N, C, -1)
        target = torch.randint(0, C, (N, logits.shape[2]))
        probabilities = torch.rand_like(logits)
        weight = torch.rand(C)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        lse = torch.zeros(N, logits.shape[2], 2, dtype=acc)
        scalar, per_position = torch.ones((), dtype=dtype), torch.ones(N, logits.shape[2], dtype=dtype)
        total_weight = torch.ones((), dtype=acc)
        launchers.cross_entropy_fwd(logits, target, weight, 1, -100, 0.1)
        launchers.cross_entropy_fwd(logits, target, None, 2, -100, 0.0)
        launchers.cross_entropy_fwd_grad(logits, target, weight, 1, -100, 0.1)
        launchers.cross_entropy_fwd_grad_(logits.clone(), target, None, 0, -100, 0.0)
        launchers.cross_entropy_bwd(per_position, logits, target, weight, lse, total_weight, 0, -100, 0.1)
        launchers.cross_entropy_fwd(logits, probabilities, weight, 2, -100, 0.1)
        launchers.cross_entropy_fwd_grad(logits, probabilities, weight, 0, -100, 0.1)
        launchers.cross_entropy_bwd(scalar, logits, probabilities, weight, lse, total_weight, 1, -100, 0.1)
        launchers.scale_unit_grad_(logits.clone(), scalar, target, -100)
        launchers.scale_unit_grad_(logits.clone(), scalar, None, -100)
    # Positions cut into class ranges (one multiprocessor: what the interpreter plans for): statistics, combine and
    # the range-wise gradient.
    for dtype, shape in itertools.product([torch.float32, torch.bfloat16], [(1, 20000), (2, 600, 16)]):
        N, C = shape[:2]
        logits = torch.randn(shape, dtype=dtype).reshape(N, C, -1)
        target = torch.randint(0, C, (N, logits.shape[2]))
        assert launchers._problem(logits, target, None, 1, 0.0).splits > 1
        launchers.cross_entropy_fwd(logits, target, torch.rand(C), 1, -100, 0.1)
        launchers.cross_entropy_fwd_grad_(logits.clone(), target, None, 0, -100, 0.0)
    compiled = {key[0] for key in compile_only.compiled}
    split_and_scale = {"xent_split_statistics_kernel", "xent_split_combine_kernel", "xent_scale_unit_grad_kernel"}
    assert split_and_scale <= compiled, compiled
    assert len(compile_only.compiled) >= 48


def ptxas_usage(ptx, tmp_path):
    """(registers, spill-store bytes) of a PTX kernel for sm_90a, from the ptxas that ships with Triton."""
    import re

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except (ImportError, TypeError, AttributeError) as error:
        pytest.skip(f"this Triton does not expose its ptxas the expected way: {error}")
    source = tmp_path / "kernel.ptx"
    source.write_text(ptx)
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(source), "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", report)[1]), int(re.search(r"(\d+) bytes spill stores", report)[1])


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="without a GPU only (with one, the kernels run)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_classes", [10, 100, 1000, 32000])
def test_row_tiles_fit_in_registers(monkeypatch, tmp_path, dtype, num_classes):
    """The heaviest row specialization (fused forward with weights and smoothing) compiled for sm_90: no spills and
    at most 128 registers. Tiles of several rows per program once held 16-32 rows' running state per thread, took
    255 registers and spilled."""
    compile_only, launchers = compile_for_hopper(monkeypatch)
    logits = torch.randn(64, num_classes, 1, dtype=dtype)
    target = torch.randint(0, num_classes, (64, 1))
    launchers.cross_entropy_fwd_grad(logits, target, torch.rand(num_classes, dtype=dtype), 1, -100, 0.1)
    (forward,) = [kernel for key, kernel in compile_only.compiled.items() if key[0] == "xent_forward_kernel"]
    registers, spilled = ptxas_usage(forward.asm["ptx"], tmp_path)
    assert spilled == 0 and registers <= 128, (launchers.tile_config(num_classes, 1, False, dtype.itemsize), registers,
                                                spilled)


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="without a GPU only (with one, the kernels run)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_statistics_loads_are_not_pipelined(monkeypatch, tmp_path, dtype):
    """The row forward's statistics loop keeps one column block in flight (num_stages=1): no cp.async in its sm_90
    PTX, no spills. Loads pipelined three stages deep measured no faster on the H200 (1.87 vs 1.81 ms at
    8192x128256 bfloat16)."""
    compile_only, launchers = compile_for_hopper(monkeypatch)
    logits = torch.randn(16, 128256, 1, dtype=dtype)
    target = torch.randint(0, 128256, (16, 1))
    launchers.cross_entropy_fwd(logits, target, None, 1, -100, 0.0)
    (forward,) = [kernel for key, kernel in compile_only.compiled.items() if key[0] == "xent_forward_kernel"]
    assert "cp.async" not in forward.asm["ptx"]
    assert ptxas_usage(forward.asm["ptx"], tmp_path)[1] == 0


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="without a GPU only (with one, the kernels run)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target_kind,num_classes,label_smoothing", [
    ("index", 5, 0.1), ("index", 1000, 0.1), ("probabilities", 1000, 0.0), ("probabilities", 1000, 0.1),
])
def test_spatial_tiles_do_not_spill(monkeypatch, tmp_path, dtype, target_kind, num_classes, label_smoothing):
    """Every kernel of an (N, C, S) problem compiled for sm_90 (fused forward, forward, backward; with 1000 class
    indices the positions are few enough for class ranges: split statistics and combine): no spills. Tiles of 64
    bfloat16 values per thread took 255 registers and spilled (8-16 bytes with Triton 3.8, up to 412 with 3.6)."""
    compile_only, launchers = compile_for_hopper(monkeypatch)
    N, C, S = 1, num_classes, 1000
    logits = torch.randn(N, C, S, dtype=dtype)
    target = torch.rand_like(logits) if target_kind == "probabilities" else torch.randint(0, C, (N, S))
    weight = torch.rand(C) if label_smoothing else None
    launchers.cross_entropy_fwd_grad(logits, target, weight, 1, -100, label_smoothing)
    launchers.cross_entropy_fwd(logits, target, weight, 1, -100, label_smoothing)
    lse, total_weight, grad_loss = torch.zeros(N, S, 2), torch.ones(()), torch.ones(N, S, dtype=dtype)
    launchers.cross_entropy_bwd(grad_loss, logits, target, weight, lse, total_weight, 0, -100, label_smoothing)
    usage = {key[0]: ptxas_usage(kernel.asm["ptx"], tmp_path) for key, kernel in compile_only.compiled.items()}
    assert "xent_backward_kernel" in usage
    assert ("xent_split_statistics_kernel" in usage) == (target_kind == "index" and C == 1000), usage
    spilling = {name: used for name, used in usage.items() if used[1] > 0}
    assert not spilling, (launchers.tile_config(C, S, True, dtype.itemsize), spilling)


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="without a GPU only (with one, the kernels run)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_spatial_logits_are_loaded_in_16_byte_vectors(monkeypatch, dtype):
    """NCHW logits are contiguous along the positions, so the forward and backward compiled for sm_90 load them 16
    bytes (4-8 positions) at a time. A load mask that changes from one position to the next (each position's own
    ignore test) made Triton load them one element per instruction: 36 2-4 byte loads per thread for 19 classes (the
    H200 measured that bfloat16 forward at 376 GB/s, 9% of its copy rate)."""
    import re

    compile_only, launchers = compile_for_hopper(monkeypatch)
    logits = torch.randn(2, 19, 4096, dtype=dtype)
    target = torch.randint(0, 19, (2, 4096))
    launchers.cross_entropy_fwd(logits, target, None, 1, -100, 0.0)
    lse, total_weight = torch.zeros(2, 4096, 2), torch.ones(())
    launchers.cross_entropy_bwd(torch.ones((), dtype=dtype), logits, target, None, lse, total_weight, 1, -100, 0.0)
    element_load = "ld.global.b16" if dtype == torch.bfloat16 else "ld.global.b32"
    for key, kernel in compile_only.compiled.items():
        if key[0] in ("xent_forward_kernel", "xent_backward_kernel"):
            loads = re.findall(r"ld\.global[.\w]*", kernel.asm["ptx"])
            # A few element loads remain: the target, its logit, the saved lse and the upstream gradient.
            assert "ld.global.v4.b32" in loads and loads.count(element_load) < 19, (key[0], sorted(set(loads)))


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="without a GPU only (with one, the kernels run)")
@pytest.mark.parametrize("wide", [True, False])
def test_class_loops_of_a_row_near_2_31_classes_count_in_64_bits(monkeypatch, wide):
    """A row of 2**31 - 100 classes (not cut into ranges: probability targets never are): Triton passes C as int32,
    and a loop counting in int32 would step past the last block to a negative class, below C, and go on. With
    WIDE_CLASS_LOOP, which the launchers set for such rows, every loop over the classes of the forward and the
    backward counts in int64 (compiled for sm_90, read in Triton's IR); without it they count in int32. Rows too
    long for the interpreter, or for CI's memory."""
    import re

    compile_only, launchers = compile_for_hopper(monkeypatch)
    kernels = triton_kernels
    num_classes, block_c = 2**31 - 100, 8192
    assert launchers.wide_class_loop(num_classes, block_c)
    assert not launchers.wide_class_loop(2**31 - 1 - block_c, block_c) and launchers.wide_class_loop(2**31 + 5, block_c)
    logits, target, grad = (torch.zeros(64, dtype=torch.bfloat16) for _ in range(3))
    acc, lse = torch.ones((), dtype=torch.float32), torch.zeros(2, dtype=torch.float32)
    shape = (1, 1, num_classes, num_classes, 1, 1, -100, 0.0, 0.0)
    flags = dict(SPATIAL=False, PROB_TARGET=True, HAS_WEIGHT=False, HAS_SMOOTHING=False, REDUCTION=1,
                 WIDE_CLASS_LOOP=wide, BLOCK_P=1, BLOCK_C=block_c, num_warps=16)
    compile_only(kernels.xent_forward_kernel, (1,), logits, target, None, None, acc, acc, None, grad, *shape,
                 WRITE_GRAD=True, **flags)
    compile_only(kernels.xent_backward_kernel, (1, 1), acc, 0, 0, logits, target, None, None, lse, acc, grad, *shape,
                 num_classes, SPLIT=False, **flags)
    for key, kernel in compile_only.compiled.items():
        loop_types = re.findall(r"scf\.for .* : (i\d+)", kernel.asm["ttir"])
        assert loop_types and set(loop_types) == {"i64" if wide else "i32"}, (key[0], loop_types)
    # Class indices past 2**31, a row cut into class ranges: the gradient compares each class with the target in
    # int64 (cut to int32, a target of 2**31 + 5 would match no class, and its row would get p where p - 1 is due).
    compile_only.compiled.clear()
    num_classes = 2**31 + 8192
    assert launchers.wide_class_loop(num_classes, block_c)
    index_target = torch.zeros(4, dtype=torch.int64)
    shape = (1, 1, num_classes, num_classes, 1, 1, -100, 0.0, 0.0)
    compile_only(kernels.xent_backward_kernel, (1, 2), acc, 0, 0, logits, index_target, None, None, lse, acc, grad,
                 *shape, 2**30, SPLIT=True, **{**flags, "PROB_TARGET": False})
    (backward,) = compile_only.compiled.values()
    narrowed = re.findall(r"arith\.trunci .* : tensor<\d+xi64> to tensor<\d+xi32>", backward.asm["ttir"])
    assert bool(narrowed) == (not wide), narrowed


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's kernels are not what Inductor re-emits")
@pytest.mark.parametrize("name", ["xent_target_weight_kernel", "xent_forward_kernel", "xent_backward_kernel",
                                  "xent_split_statistics_kernel", "xent_split_combine_kernel"])
def test_inductor_can_re_emit_kernel_source(name, tmp_path):
    """torch.compile with Inductor writes each user kernel, with the jit functions and constexpr globals it uses,
    into a module of its own that imports only triton and Inductor's helpers; that module must load (a constexpr
    global of NaN, written back as `nan`, once made it fail with a NameError on the GPU). Built here with
    Inductor's own code generator, on CPU."""
    try:
        from torch._inductor.codegen.triton import TritonKernel
        from torch._inductor.codegen.wrapper import (
            user_defined_triton_kernel_transitive_closure_source_code as closure_source,
        )
    except ImportError as error:  # private Inductor API: moved in this torch
        pytest.skip(f"Inductor's code generator is not where this test looks: {error}")
    kernel = getattr(triton_kernels, name)
    module = tmp_path / f"{name}.py"
    module.write_text(TritonKernel.gen_common_triton_imports() + "\n@triton.jit\n" + closure_source(kernel))
    result = subprocess.run([sys.executable, str(module)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not INTERPRETED or not sys.platform.startswith("linux"),
                    reason="CPU tensors under the interpreter (test_interpreter_run's subprocess), mprotect")
def test_ignored_logits_are_never_read():
    """The logits of ignored positions lie on pages that cannot be read (tests/unread_ignored_logits.py): the
    interpreter loads only the lanes a mask keeps, so every op of rows, split rows, NCHW and split NCHW finishing
    shows that the kernels' masks leave those positions out."""
    script = Path(__file__).resolve().parent / "unread_ignored_logits.py"
    run = subprocess.run([sys.executable, str(script), "triton"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="runs the interpreter subprocess only without a GPU")
def test_interpreter_run():
    """Runs this file's kernel tests on CPU tensors under TRITON_INTERPRET=1, in a fresh process, with glibc's
    allocator poisoning every fresh block (as test_parity.test_every_output_element_is_written does), so that an
    output element a kernel leaves unwritten fails its comparison instead of reading as the 0 it often holds."""
    run_pytest_with_poisoned_allocations(__file__, TRITON_INTERPRET="1")


@pytest.mark.skipif(INTERPRETED or DEVICE is not None, reason="runs the interpreter subprocess only without a GPU")
def test_public_api_errors_and_fuzz_under_interpreter():
    """The bad-input table and the property-based fuzzer, through fused_xent.cross_entropy(backend="triton")."""
    pytest_args = ["-m", "pytest", "tests/test_errors.py", "tests/test_fuzz.py", "-k", "triton", "-o", "addopts=",
                   "-q", "-p", "no:cacheprovider", "-x"]
    result = _run_python(pytest_args, TRITON_INTERPRET="1", FUSED_XENT_FUZZ_EXAMPLES="30")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
