"""Loss and input gradient against torch.nn.functional.cross_entropy over every argument, shape, layout and dtype."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SHAPES,
    assert_close,
    assert_grad_close,
    backend_cases,
    backends_for,
    fused,
    make_class_target,
    make_logits,
    make_prob_target,
    run_pytest_with_poisoned_allocations,
    shape_id,
    torch_reference,
)

import fused_xent

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
# (target kind, ignore_index): a negative ignore value, a class index that is ignored, or no ignored positions.
TARGETS = [("index", None), ("index", -100), ("index", 1), ("prob", None)]
BACKEND_CASES = backend_cases()


def _case(shape, layout, dtype, device, target_kind, ignore, weighted, smoothing, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(shape, layout, dtype, device, generator=g)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    kwargs = {"reduction": reduction, "label_smoothing": smoothing}
    if target_kind == "prob":
        target = make_prob_target(logits, generator=g)
    else:
        target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
        target = make_class_target(target_shape, num_classes, device, ignore, generator=g)
        if ignore is not None:
            kwargs["ignore_index"] = ignore
    if weighted:
        kwargs["weight"] = (torch.rand(num_classes, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype).to(device)
    loss_shape = () if reduction != "none" or len(shape) == 1 else shape[:1] + shape[2:]
    grad_output = (torch.rand(loss_shape, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    return logits, target, grad_output, kwargs


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=[shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_kind,ignore", TARGETS)
def test_matches_pytorch(device, backend, shape, layout, dtype, target_kind, ignore):
    """Every combination of weight, label smoothing and reduction for one shape, dtype and target kind."""
    if dtype == torch.float16 and device == "cpu" and shape[-1] == 32000:
        pytest.skip("covered by float32/bfloat16; keeps the CPU suite short")
    for seed, (weighted, smoothing, reduction) in enumerate(itertools.product([False, True], [0.0, 0.1], REDUCTIONS)):
        logits, target, grad_output, kwargs = _case(
            shape, layout, dtype, device, target_kind, ignore, weighted, smoothing, reduction, seed
        )
        expected_loss, expected_grad = torch_reference(logits, target, grad_output, **kwargs)
        loss, grad = fused(logits, target, grad_output, backend, **kwargs)
        what = f"{kwargs}"
        assert loss.dtype == dtype and loss.shape == expected_loss.shape, what
        assert grad.dtype == dtype and grad.shape == logits.shape, what
        assert_close(loss, expected_loss, dtype, f"loss {what}")
        assert_grad_close(grad, expected_grad, dtype, f"grad {what}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(device, backend, reduction):
    """Every position ignored: mean is 0/0 = NaN as in PyTorch, sum is 0, gradients are 0."""
    logits = make_logits((4, 6), "contiguous", torch.float32, device)
    target = torch.full((4,), -100, device=device)
    grad_output = torch.ones(() if reduction != "none" else (4,), device=device)
    for smoothing in (0.0, 0.2):
        expected_loss, expected_grad = torch_reference(
            logits, target, grad_output, reduction=reduction, label_smoothing=smoothing
        )
        loss, grad = fused(logits, target, grad_output, backend, reduction=reduction, label_smoothing=smoothing)
        assert_close(loss, expected_loss, torch.float32, "loss")
        assert torch.equal(grad, torch.zeros_like(grad))
        if reduction == "mean":
            assert torch.isnan(loss)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_uint8_targets_and_mixed_prob_dtypes(device, backend):
    """PyTorch accepts uint8 class indices, and probability targets or their weight in another float dtype: the
    logits are promoted with them, and the gradient comes back to the logits in their own dtype."""
    logits = make_logits((5, 7), "contiguous", torch.float32, device)
    target = make_class_target((5,), 7, device).to(torch.uint8)
    ones = torch.ones((), device=device)
    loss, grad = fused(logits, target, ones, backend)
    expected_loss, expected_grad = torch_reference(logits, target, ones)
    assert_close(loss, expected_loss, torch.float32, "uint8 loss")
    assert_grad_close(grad, expected_grad, torch.float32, "uint8 grad")
    probs = make_prob_target(logits)
    weight = torch.rand(7, device=device) + 0.5
    for what, target, kwargs in [("target", probs.double(), {}), ("weight", probs, {"weight": weight.double()})]:
        loss, grad = fused(logits, target, ones.double(), backend, **kwargs)
        expected = F.cross_entropy(logits, target, **kwargs)
        assert loss.dtype == expected.dtype == torch.float64
        assert grad.dtype == logits.dtype
        assert_close(loss, expected, torch.float32, f"loss promoted by the {what}")
        expected_grad = torch_reference(logits, target, ones.double(), **kwargs)[1]
        assert_grad_close(grad, expected_grad, torch.float32, f"grad promoted by the {what}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_probability_target_gradient(device, backend):
    """Soft targets are differentiable in PyTorch (distillation); so are ours."""
    g = torch.Generator().manual_seed(0)
    logits = make_logits((3, 5, 4), "contiguous", torch.float64, device, generator=g)
    for reduction, smoothing, weighted in itertools.product(REDUCTIONS, [0.0, 0.3], [False, True]):
        target = make_prob_target(logits, generator=g).requires_grad_(True)
        weight = torch.rand(5, generator=g, dtype=torch.float64).to(device) if weighted else None
        kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": smoothing}
        ours = fused_xent.cross_entropy(logits, target, backend=backend, **kwargs).sum()
        theirs = F.cross_entropy(logits, target, **kwargs).sum()
        (g_ours,) = torch.autograd.grad(ours, target)
        (g_theirs,) = torch.autograd.grad(theirs, target)
        assert_grad_close(g_ours, g_theirs, torch.float64, f"target grad {reduction} {smoothing} {weighted}")



@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("weight_shape", [(1, 6), (6, 1), (1, 6, 1), (2, 3)])
def test_spatial_class_indices_read_a_weight_of_any_shape_flat(device, backend, weight_shape):
    """PyTorch's loss of class indices over spatial positions counts the weight's entries, not its shape: a (1, C)
    weight serves as its C entries. Where PyTorch answers, ours is its answer; with label smoothing it refuses some
    of these shapes, and fused_xent reads them the same way."""
    g = torch.Generator().manual_seed(sum(weight_shape))
    logits = make_logits((3, 6, 2, 5), "contiguous", torch.float64, device, generator=g)
    target = make_class_target((3, 2, 5), 6, device, ignore_index=2, generator=g)
    weight = (torch.rand(6, generator=g, dtype=torch.float64) + 0.1).to(device)
    for reduction, smoothing in itertools.product(REDUCTIONS, [0.0, 0.2]):
        kwargs = {"reduction": reduction, "label_smoothing": smoothing, "ignore_index": 2}
        grad_output = torch.rand(() if reduction != "none" else (3, 2, 5), generator=g, dtype=torch.float64)
        loss, grad = fused(logits, target, grad_output.to(device), backend, weight=weight.view(weight_shape), **kwargs)
        expected_loss, expected_grad = torch_reference(logits, target, grad_output.to(device), weight=weight, **kwargs)
        assert_close(loss, expected_loss, torch.float64, f"loss {reduction} {smoothing}")
        assert_grad_close(grad, expected_grad, torch.float64, f"grad {reduction} {smoothing}")
        if smoothing == 0.0:
            pytorch_loss = F.cross_entropy(logits, target, weight.view(weight_shape), **kwargs)
            assert_close(pytorch_loss, expected_loss, torch.float64, "PyTorch's own answer")


@pytest.mark.skipif("cpu" not in backends_for("cpu"), reason="compiled extension missing")
def test_every_output_element_is_written():
    """The CPU parity grid, and that of in_forward and inplace, again with every fresh allocation poisoned."""
    grad_modes = os.path.join(os.path.dirname(__file__), "test_grad_modes.py")
    run_pytest_with_poisoned_allocations(__file__, "test_matches_pytorch and cpu-cpu and (float32 or bfloat16)")
    run_pytest_with_poisoned_allocations(grad_modes, "test_same_gradient_as_recompute and cpu")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_mean_over_zero_target_weight_is_nan(device, backend):
    """Targets that are counted but weigh 0: PyTorch's mean is NaN (its NLL part is 0/0) even when label smoothing
    adds a positive term, and so is its gradient; so are ours."""
    logits = make_logits((3, 5), "contiguous", torch.float32, device)
    weight = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0], device=device)
    target = torch.zeros(3, dtype=torch.long, device=device)
    for smoothing in (0.0, 0.1):
        kwargs = {"weight": weight, "label_smoothing": smoothing}
        expected_loss, expected_grad = torch_reference(logits, target, torch.ones((), device=device), **kwargs)
        loss, grad = fused(logits, target, torch.ones((), device=device), backend, **kwargs)
        assert expected_loss.isnan() and loss.isnan(), (smoothing, loss)
        assert expected_grad.isnan().all() and grad.isnan().all(), (smoothing, grad)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_unreduced_loss_reduced_afterwards(device, backend, grad_mode, kind):
    """reduction='none' reduced by the caller: autograd hands back the upstream gradient expanded (stride 0, from a
    sum) or transposed (from a product with a transposed tensor), which every path reads through its strides."""
    g = torch.Generator().manual_seed(12)
    logits = make_logits((6, 7, 5), "contiguous", torch.float32, device, generator=g)
    if kind == "prob":
        target = make_prob_target(logits, generator=g)
    else:
        target = make_class_target((6, 5), 7, generator=g).to(device)
        target[0, :2] = -100
    columns = torch.rand(5, generator=g).to(device)
    transposed = torch.rand(5, 6, generator=g).to(device)
    reductions = {"sum": lambda loss: loss.sum(), "sum over N": lambda loss: (loss.sum(0) * columns).sum(),
                  "transposed": lambda loss: (loss.t() * transposed).sum()}
    for name, reduce in reductions.items():
        grads = []
        for loss_fn in (F.cross_entropy, lambda *a, **k: fused_xent.cross_entropy(*a, backend=backend,
                                                                                   grad_mode=grad_mode, **k)):
            leaf = logits.detach().clone().requires_grad_(True)
            reduce(loss_fn(leaf * 1, target, reduction="none")).backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[1], grads[0], msg=name)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward"])
def test_mean_over_cancelling_weights_divides_as_pytorch(device, backend, grad_mode):
    """Negative class weights whose counted targets weigh 0 in all: PyTorch divides the nonzero NLL sum by 0, ±inf,
    and so do we (with label smoothing we give NaN: README). The gradient is non-finite where PyTorch's is, every
    entry of the counted rows, and 0 on the ignored one."""
    logits = make_logits((5, 4), "contiguous", torch.float32, device)
    weight = torch.tensor([1.0, -1.0, 2.0, 0.5], device=device)
    for target in ([0, 1, -100, 0, 1], [2, 1, 1, -100, -100]):
        target = torch.tensor(target, device=device)
        assert weight[target[target != -100]].sum() == 0
        expected_loss, expected_grad = torch_reference(logits, target, torch.ones((), device=device), weight=weight)
        loss, grad = fused(logits, target, torch.ones((), device=device), backend, weight=weight, grad_mode=grad_mode)
        assert expected_loss.isinf(), expected_loss
        assert loss.double() == expected_loss, (loss, expected_loss)
        assert torch.equal(grad.isfinite(), expected_grad.isfinite()), (grad, expected_grad)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_no_classes(device, backend):
    """Logits with a class dimension of 0 (empty batches, probability targets): PyTorch's empty, 0 or NaN, bit for
    bit, with its gradient; an index into no classes is refused with an IndexError."""
    for shape, prob in (((0, 0), False), ((3, 0), True), ((0,), True), ((2, 0, 4), True)):
        for reduction, smoothing in itertools.product(REDUCTIONS, (0.0, 0.1)):
            logits = torch.randn(shape, device=device, requires_grad=True)
            target = torch.rand(shape, device=device) if prob else torch.zeros(0, dtype=torch.long, device=device)
            kwargs = {"reduction": reduction, "label_smoothing": smoothing}
            expected = F.cross_entropy(logits, target, **kwargs)
            got = fused_xent.cross_entropy(logits, target, backend=backend, **kwargs)
            torch.testing.assert_close(got, expected, equal_nan=True, atol=0, rtol=0)
            assert got.requires_grad and torch.autograd.grad(got.sum(), logits)[0].shape == shape
    ignored = torch.full((3,), -100, device=device)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(fused_xent.cross_entropy(torch.randn(3, 0, device=device), ignored,
                                                            reduction=reduction, backend=backend),
                                   F.cross_entropy(torch.randn(3, 0, device=device), ignored, reduction=reduction),
                                   equal_nan=True, atol=0, rtol=0)
    # One spatial dim, every target ignored: PyTorch's own 1-D spatial kernel fails there ("size mismatch"), its
    # 2-D one gives the answer, taken through a trailing dim of 1.
    for reduction, smoothing in itertools.product(REDUCTIONS, (0.0, 0.1)):
        logits = torch.randn(2, 0, 3, device=device, requires_grad=True)
        kwargs = {"reduction": reduction, "label_smoothing": smoothing}
        got = fused_xent.cross_entropy(logits, torch.full((2, 3), -100, device=device), backend=backend, **kwargs)
        expected = F.cross_entropy(logits.unsqueeze(-1), torch.full((2, 3, 1), -100, device=device), **kwargs)
        torch.testing.assert_close(got, expected.squeeze(-1) if reduction == "none" else expected, equal_nan=True,
                                   atol=0, rtol=0)
        assert torch.autograd.grad(got.sum(), logits)[0].shape == logits.shape
    # PyTorch's CUDA kernel would stop at a device assert, which leaves the process's CUDA context unusable.
    with pytest.raises(IndexError, match="target 0 at position 1 is out of range: the input has no classes"):
        fused_xent.cross_entropy(torch.randn(3, 0, device=device), torch.tensor([-100, 0, -100], device=device),
                                 backend=backend)
