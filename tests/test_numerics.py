"""Extreme inputs and determinism."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    assert_grad_close,
    backend_cases,
    backends_for,
    fused,
    make_class_target,
    make_logits,
    torch_reference,
)

import fused_xent
from fused_xent import _backends

BACKENDS = backends_for("cpu")
needs_extension = pytest.mark.skipif("cpu" not in fused_xent.available_backends(), reason="compiled extension missing")


def _compare(logits, target, backend, dtype=torch.float32, **kwargs):
    grad_output = torch.ones(() if kwargs.get("reduction", "mean") != "none" else target.shape)
    expected_loss, expected_grad = torch_reference(logits, target, grad_output, **kwargs)
    loss, grad = fused(logits, target, grad_output.to(logits.dtype), backend, **kwargs)
    assert_close(loss, expected_loss, dtype, "loss")
    assert_grad_close(grad, expected_grad, dtype, "grad")
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(6, 300), (2, 600, 7)], ids=str)
def test_huge_logits(backend, smoothing, shape):
    logits = make_logits(shape, "contiguous", torch.float32) * 1e4 / 3
    _compare(logits, make_class_target(shape[:1] + shape[2:], shape[1]), backend, label_smoothing=smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 300), (3, 5000), (2, 300, 5), (2, 700, 5), (2, 19, 3, 3)], ids=str)
def test_near_ties_at_huge_logits(backend, shape):
    """Logits near 1.2e4 whose top classes lie within a unit of each other, so that the softmax is not one-hot.
    Loss and gradient keep float32 precision in every grad_mode: lse - x[y] is taken as (max - x[y]) + log(sum),
    where lse itself is rounded by up to |lse| * 2^-24 (~7e-4), the smoothing sums relative to the max, and the
    recomputing backward takes p from the max and log(sum) it saved apart (README, "Precision at huge logits")."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(shape, generator=g) * 10 + 12345.6
    logits[:, 7] = 12380.3
    logits[:, 9] = 12379.9
    logits[:, 11] = 12380.8
    target = make_class_target(shape[:1] + shape[2:], shape[1], generator=g)
    target.view(-1)[::2] = 9
    for smoothing in (0.0, 0.1):
        expected_loss, expected_grad = torch_reference(logits, target, torch.ones(()), label_smoothing=smoothing)
        for grad_mode in ("recompute", "in_forward", "inplace"):
            what = f"{grad_mode}, label_smoothing={smoothing}"
            loss, grad = fused(logits, target, torch.ones(()), backend, grad_mode=grad_mode, label_smoothing=smoothing)
            torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=0, msg=f"loss {what}")
            torch.testing.assert_close(grad.double(), expected_grad, rtol=2e-6,
                                       atol=2e-6 * expected_grad.abs().max().item(), msg=f"grad {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 5), (3, 3000), (2, 5, 7), (2, 300, 5)], ids=str)
def test_near_certain_target_at_huge_logits(backend, shape):
    """A target 8 above every other class at logits of 1.2e4: its gradient p - 1 = -(C - 1) e^-8 (times the weight)
    is smaller than the rounding of a float32 lse there (~7e-4). Every grad_mode gets it to float32 precision,
    relative to the unit-sized p and 1 it is the difference of, as PyTorch does; p = exp(x - lse) from a saved lse
    rounded to one float would give 0 or an error of up to 7e-4."""
    g = torch.Generator().manual_seed(11)
    logits = torch.rand(shape, generator=g) * 0.5 + 11992.0
    target = make_class_target(shape[:1] + shape[2:], shape[1], generator=g)
    logits.scatter_(1, target.unsqueeze(1), 12000.0)
    for kwargs in ({}, {"label_smoothing": 0.05}, {"weight": torch.rand(shape[1], generator=g) + 0.5}):
        expected_loss, expected_grad = torch_reference(logits, target, torch.ones(()), reduction="sum", **kwargs)
        for grad_mode in ("recompute", "in_forward", "inplace"):
            loss, grad = fused(logits, target, torch.ones(()), backend, reduction="sum", grad_mode=grad_mode, **kwargs)
            torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=1e-6, msg=f"{grad_mode} {kwargs}")
            assert_close(loss, expected_loss, torch.float32, f"loss {grad_mode} {kwargs}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(16, 1000), (3, 5000), (4, 300, 37), (6, 19, 40), (3, 20000, 5)], ids=str)
def test_loss_sums_at_offset_logits(backend, shape):
    """The terms W lse - sum_c w[c] x[c] (label smoothing) and T lse - sum_c w[c] t'[c] x[c] (probability targets)
    subtract two sums of ~C * offset: taken relative to the position's max, they keep float32 precision however far
    the logits are from 0 (PyTorch, summing log-probabilities, does too)."""
    g = torch.Generator().manual_seed(9)
    num_classes = shape[1]
    weight = torch.rand(num_classes, generator=g) + 0.5
    for offset in (1e3, 1.2e4):
        logits = torch.randn(shape, generator=g) * 2 + offset
        probabilities = torch.softmax(torch.randn(shape, generator=g) * 3, 1)
        classes = make_class_target(shape[:1] + shape[2:], num_classes, generator=g)
        cases = [(probabilities, {}), (probabilities, {"weight": weight, "label_smoothing": 0.2}),
                 (classes, {"label_smoothing": 0.3}), (classes, {"weight": weight, "label_smoothing": 1.0})]
        for target, kwargs in cases:
            loss = fused_xent.cross_entropy(logits, target, reduction="none", backend=backend, **kwargs)
            expected = torch_reference(logits, target, torch.ones(loss.shape), reduction="none", **kwargs)[0]
            torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0, msg=f"{offset} {kwargs}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(16, 1000), (3, 9000), (2, 50257), (4, 300, 37), (2, 64, 16), (3, 20000, 5),
                                   (1, 128256, 2)], ids=str)
def test_loss_sums_with_a_masked_first_class(backend, shape):
    """Class 0 masked with a large finite value (a pad token at -1e4 or -1e9, a common idiom): the loss sums must not
    be taken relative to it (or to any one logit) but to the max, or they cancel or overflow; and the lane holding
    its term must not swallow the terms added after it (blocks, compensated)."""
    g = torch.Generator().manual_seed(10)
    num_classes = shape[1]
    for mask in (-1e4, -1e9):
        logits = torch.randn(shape, generator=g)
        logits[:, 0] = mask
        probabilities = torch.softmax(torch.randn(shape, generator=g) * 3, 1)
        probabilities[:, 0] = 0
        classes = make_class_target(shape[:1] + shape[2:], num_classes - 1, generator=g) + 1
        for target, kwargs in ((probabilities / probabilities.sum(1, keepdim=True), {}),
                               (classes, {"label_smoothing": 0.1})):
            loss = fused_xent.cross_entropy(logits, target, reduction="none", backend=backend, **kwargs)
            expected = torch_reference(logits, target, torch.ones(loss.shape), reduction="none", **kwargs)[0]
            torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0, msg=f"{mask} {kwargs}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 257), (2, 7, 3, 5), (2, 700, 9)])
def test_masked_vocabulary(backend, shape):
    """-inf logits (masked classes) are fine as long as the target's own logit is finite."""
    logits = make_logits(shape, "contiguous", torch.float32)
    target = make_class_target(shape[:1] + shape[2:], shape[1])
    mask = torch.rand(shape) < 0.5
    mask.scatter_(1, target.unsqueeze(1), False)
    logits[mask] = -float("inf")
    loss, grad = _compare(logits, target, backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss = fused_xent.cross_entropy(logits, target, label_smoothing=0.1, backend=backend)
    assert loss == float("inf")  # as PyTorch: smoothing puts mass on -inf logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
def test_masked_class_chunks(backend, grad_mode):
    """NCHW with many classes, every class from 300 on masked: whole chunks of -inf, before and after the running
    max is finite (chunk order), must add nothing; a NaN stays in its own position."""
    logits = make_logits((2, 1000, 9), "contiguous", torch.float32)
    logits[:, 300:] = -float("inf")
    logits[1, :600, 4] = -float("inf")  # a position whose first chunks are all -inf
    logits[1, 700, 4] = 2.0
    target = make_class_target((2, 9), 300)
    target[1, 4] = 700
    grad_output = torch.ones(())
    expected_loss, expected_grad = torch_reference(logits, target, grad_output)
    loss, grad = fused(logits, target, grad_output, backend, grad_mode=grad_mode)
    assert_close(loss, expected_loss, torch.float32, "loss")
    assert_grad_close(grad, expected_grad, torch.float32, "grad")
    logits[0, 5, 3] = float("nan")
    loss = fused_xent.cross_entropy(logits, target, reduction="none", backend=backend)
    assert loss[0, 3].isnan() and loss.isnan().sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_all_masked_rows_propagate(backend):
    logits = make_logits((4, 9), "contiguous", torch.float32)
    logits[1, 3] = float("nan")
    logits[2] = -float("inf")
    target = torch.tensor([0, 1, 2, 3])
    loss = fused_xent.cross_entropy(logits, target, reduction="none", backend=backend)
    expected = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    logits[2, 2] = 0.0  # only the target's class unmasked: probability 1, loss 0
    assert fused_xent.cross_entropy(logits[2:3], target[2:3], backend=backend) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_of_a_row_of_minus_infinity(backend):
    """What the ops save for a counted row whose logits are all -inf is the lse of no classes, (0, -inf), in every
    backend: the reference's log_softmax too (its recompute backward and create_graph path read it)."""
    logits = make_logits((3, 9, 1), "contiguous", torch.float32)
    logits[1] = -float("inf")
    target = torch.tensor([[0], [1], [2]])
    lse = _backends.backend_ops(backend).fwd(logits, target, None, 0, -100, 0.0)[1]
    assert lse[1, 0].tolist() == [0.0, -float("inf")]
    torch.testing.assert_close(lse, _backends.backend_ops("torch").fwd(logits, target, None, 0, -100, 0.0)[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_accumulates_in_float32(backend, dtype):
    """Logits whose exp overflows the dtype: a few huge ones that hold the whole sum, and rows shifted past the
    overflow whose 64K classes all count, a sum that fp16/bf16 accumulation would ruin (bfloat16 keeps 8 bits: adding
    one term of about 1 at a time stalls at 256)."""
    target = make_class_target((4,), 65536)
    logits = (make_logits((4, 65536), "contiguous", torch.float32) * 4).to(dtype)
    logits[:, :8] = 6e4 if dtype == torch.float16 else 3e4
    _compare(logits, target, backend, dtype=dtype)
    overflow = math.log(torch.finfo(dtype).max)  # 11.1 for float16, 88.7 for bfloat16
    shifted = (make_logits((4, 65536), "contiguous", torch.float32) + overflow + 10).to(dtype)
    _compare(shifted, target, backend, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_huge_class_and_one_class(backend):
    logits = make_logits((3, 1000), "contiguous", torch.float32)
    logits[:, 17] = 80.0
    _compare(logits, torch.tensor([17, 17, 3]), backend)
    _compare(make_logits((5, 1), "contiguous", torch.float32), torch.zeros(5, dtype=torch.long), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_and_tiny_weights(backend):
    """Weights spanning 40 orders of magnitude: float32 results within float32 rounding of the largest terms."""
    weight = torch.tensor([1e20, 1e-20, 3.0, 1e10, 0.0]).repeat(20)
    logits = make_logits((8, 100), "contiguous", torch.float32)
    for reduction in ("none", "mean", "sum"):
        kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1}
        target = make_class_target((8,), 100, ignore_index=-100)
        grad_output = torch.ones(() if reduction != "none" else (8,))
        expected_loss, expected_grad = torch_reference(logits, target, grad_output, **kwargs)
        loss, grad = fused(logits, target, grad_output, backend, **kwargs)
        torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=1e-6 * expected_grad.abs().max())


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("shape", [(6, 300), (64, 10), (2, 19, 4, 4), (2, 300, 5)], ids=str)
def test_float32_losses_past_the_float32_range(device, backend, shape):
    """Targets on logits masked at -3e38: each position's loss is finite, their float32 sum is not, and PyTorch
    returns inf for the sum and the mean (and for per-position losses of weight 3e38, whose sum of target weights
    overflows too). The CPU kernel, which sums
    in double, once raised there instead ('value cannot be converted to type float without overflow'), and in
    grad_mode='inplace' after it had written the gradient over the logits. The gradients stay finite."""
    target = make_class_target(shape[:1] + shape[2:], shape[1], device=device)
    logits = make_logits(shape, "contiguous", torch.float32, device=device)
    logits.scatter_(1, target.unsqueeze(1), -3e38)
    heavy = torch.full((shape[1],), 3e38, device=device)
    cases = [{"reduction": "sum"}, {"reduction": "mean"}, {"reduction": "none", "weight": heavy}]
    for kwargs in cases:
        expected = F.cross_entropy(logits, target, **kwargs)
        assert expected.isinf().any(), kwargs
        grad_output = torch.ones_like(expected)
        expected_grad = torch_reference(logits, target, grad_output, **kwargs)[1]
        for grad_mode in ("recompute", "in_forward", "inplace"):
            loss, grad = fused(logits, target, grad_output, backend, grad_mode=grad_mode, **kwargs)
            torch.testing.assert_close(loss, expected, msg=f"{kwargs}, {grad_mode}")
            assert_grad_close(grad, expected_grad, torch.float32, f"grad, {kwargs}, {grad_mode}")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("shape", [(6, 300), (64, 10), (3, 5000), (2, 19, 4, 4), (2, 300, 5)], ids=str)
def test_infinite_weight_of_an_absent_class(device, backend, shape):
    """Inverse-frequency weights (1 / class count) are inf for a class that never occurs. Without label smoothing
    PyTorch never reads that weight, and its loss and gradient stay finite; the sum of all the weights, which only
    the smoothing term needs, must not reach the gradient as 0 * inf = NaN."""
    num_classes = shape[1]
    target = make_class_target(shape[:1] + shape[2:], num_classes - 1, device=device)  # the last class never occurs
    weight = 1.0 / torch.bincount(target.flatten(), minlength=num_classes).float()
    assert weight.isinf().any()
    logits = make_logits(shape, "contiguous", torch.float32, device=device)
    for reduction in ("mean", "none"):
        grad_output = torch.rand(() if reduction == "mean" else target.shape, device=device) + 0.5
        expected_loss, expected_grad = torch_reference(logits, target, grad_output, weight=weight, reduction=reduction)
        assert expected_grad.isfinite().all()
        for grad_mode in ("recompute", "in_forward", "inplace"):
            loss, grad = fused(logits, target, grad_output, backend, weight=weight, reduction=reduction,
                               grad_mode=grad_mode)
            assert_close(loss, expected_loss, torch.float32, f"loss, {grad_mode}")
            assert_grad_close(grad, expected_grad, torch.float32, f"grad, {grad_mode}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_256k_classes(backend):
    logits = make_logits((3, 262144), "contiguous", torch.float32)
    _compare(logits, make_class_target((3,), 262144), backend, label_smoothing=0.1)


def _loss_and_grad(backend, shape, grad_mode="recompute", **kwargs):
    g = torch.Generator().manual_seed(5)
    x = make_logits(shape, "contiguous", torch.float32, generator=g).requires_grad_(True)
    target = make_class_target(shape[:1] + shape[2:], shape[1], ignore_index=-100, generator=g)
    loss = fused_xent.cross_entropy(x, target, backend=backend, grad_mode=grad_mode, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward"])
@pytest.mark.parametrize("shape", [(64, 3001), (4, 3001, 37)], ids=str)
def test_deterministic_across_runs_and_threads(backend, grad_mode, shape):
    threads = torch.get_num_threads()
    try:  # three threads whatever OMP_NUM_THREADS says, so that the comparison with one is never with itself
        torch.set_num_threads(3)
        first = _loss_and_grad(backend, shape, grad_mode, label_smoothing=0.1)
        again = _loss_and_grad(backend, shape, grad_mode, label_smoothing=0.1)
        torch.set_num_threads(1)
        single = _loss_and_grad(backend, shape, grad_mode, label_smoothing=0.1)
    finally:
        torch.set_num_threads(threads)
    for a, b in [(first, again), (first, single)]:
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_extension
def test_weight_sum_does_not_follow_the_thread_count():
    """Label smoothing reads the sum of all class weights, in float64 for float64 logits. Summed in ranges that
    follow the thread count, these weights (1.0, and one 1e17 that absorbs some of them) come out 32 apart: torch
    2.14's sum gives 1.0000000000030003e17 on one thread and 1.000000000003e17 on two. (The pure-PyTorch backend
    inherits that from PyTorch.)"""
    num_classes = 300_000
    weight = torch.ones(num_classes, dtype=torch.float64)
    weight[num_classes // 2 + 5] = 1e17
    logits = make_logits((4, num_classes), "contiguous", torch.float64)
    target = make_class_target((4,), num_classes)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(fused(logits, target, torch.ones((), dtype=torch.float64), "cpu", weight=weight,
                                 label_smoothing=0.1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_extension
@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """64-bit indexing: 2^31 + 2^17 bf16 logits; the last rows (past 2^31) checked against PyTorch."""
    classes = 1 << 16
    rows = (1 << 15) + 2
    logits = torch.empty(rows, classes, dtype=torch.bfloat16)
    logits[-4:] = torch.randn(4, classes).to(torch.bfloat16)
    logits[:-4] = 0.5
    target = torch.randint(0, classes, (rows,))
    x = logits.requires_grad_(True)
    loss = fused_xent.cross_entropy(x, target, reduction="none", backend="cpu")
    tail = logits[-4:].detach().float()
    torch.testing.assert_close(loss[-4:].float(), F.cross_entropy(tail, target[-4:], reduction="none"),
                               rtol=1.6e-2, atol=1e-2)
    loss[-4:].sum().backward()
    expected_grad = torch.softmax(tail, 1) - F.one_hot(target[-4:], classes)
    # atol below the entries (at most ~1e-3 at 65536 classes): a backward that read the wrong row would pass 1e-3.
    torch.testing.assert_close(x.grad[-4:].float(), expected_grad, rtol=1.6e-2, atol=2e-6)
    assert not x.grad[:-4].any()


@needs_extension
@pytest.mark.slow
def test_more_than_2_pow_31_elements_nchw():
    """The same for NCHW logits with many classes (chunked lanes): (1, 2^16, 2^15 + 2), the last positions' classes
    lying past 2^31 elements."""
    classes, positions = 1 << 16, (1 << 15) + 2
    logits = torch.full((1, classes, positions), 0.5, dtype=torch.bfloat16)
    logits[:, :, -4:] = torch.randn(1, classes, 4).to(torch.bfloat16)
    target = torch.randint(0, classes, (1, positions))
    x = logits.requires_grad_(True)
    loss = fused_xent.cross_entropy(x, target, reduction="none", backend="cpu")
    tail = logits[0, :, -4:].detach().float().t()
    torch.testing.assert_close(loss[0, -4:].float(), F.cross_entropy(tail, target[0, -4:], reduction="none"),
                               rtol=1.6e-2, atol=1e-2)
    loss[0, -4:].sum().backward()
    expected_grad = torch.softmax(tail, 1) - F.one_hot(target[0, -4:], classes)
    torch.testing.assert_close(x.grad[0, :, -4:].float().t(), expected_grad, rtol=1.6e-2, atol=2e-6)
    assert not x.grad[:, :, :-4].any()
