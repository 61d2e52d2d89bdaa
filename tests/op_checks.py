"""The four ops of a fused_xent kernel library called directly, against F.cross_entropy computed in float64: shared by
the CPU kernel's tests (tests/test_cpu_ops.py) and those of the CUDA kernels' host emulation
(tests/test_cuda_emulated.py); and the cases of the CUDA value check op (there and in tests/test_cuda.py) and of the
ops that scale a gradient made in the forward in place (the CUDA one and Triton's)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import expected_lse as expected_lse_of
from helpers import without_ignored_gradient
from tolerances import assert_close, assert_grad_close

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def as_ncs(x, y):
    """The op view of an F.cross_entropy input: logits (N, C, S), class-index target (N, S) or probabilities."""
    if x.dim() == 1:
        return x.view(1, -1, 1), (y.view(1, -1, 1) if y.is_floating_point() else y.reshape(1, 1))
    x3 = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)
    if y.is_floating_point():
        return x3, (y.flatten(2) if y.dim() > 2 else y.unsqueeze(-1))
    return x3, y.reshape(x3.shape[0], x3.shape[2])


def kernel_strides(x3):
    """The strides of the gradient an op returns for (N, C, S) logits: those of the logits when the kernels read them
    as they lie (dense, with unit class or position stride), else those of the contiguous copy they read instead
    (csrc/common/xent_problem.cpp). An empty tensor is contiguous whatever its strides, so it keeps them."""
    N, C, S = x3.shape
    dense = torch.empty_like(x3).stride() == x3.stride()  # empty_like keeps only dense strides
    readable = x3.numel() == 0 or (dense and (C == 1 or x3.stride(1) == 1 or (S > 1 and x3.stride(2) == 1)))
    return x3.stride() if readable else (C * S, S, 1)


def reference(x, y, weight, reduction, ignore_index, smoothing):
    """Loss and d(loss)/d(logits) for an upstream gradient of ones, in float64, an ignored position's gradient 0."""
    xr = x.detach().double().requires_grad_()
    yr = y.double() if y.is_floating_point() else y
    w = weight.double() if weight is not None else None
    loss = F.cross_entropy(xr, yr, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(loss, xr, torch.ones_like(loss))
    if not y.is_floating_point():
        grad = without_ignored_gradient(grad, y, ignore_index)
    return loss.detach(), grad


def check_all_ops(ops, x, y, weight=None, reduction="mean", ignore_index=-100, smoothing=0.0, weight_dtype=None,
                  magnitude=1.0, grad_terms=None):
    """Runs the four ops of the library `ops` (torch.ops.fused_xent, or an emulation of it) on x (any layout) and
    compares loss, lse, total_weight and gradients with PyTorch. The ops see the weight in weight_dtype: by default
    the logits' dtype, as PyTorch requires of class-index targets; float32 with half-precision logits is what the
    front end passes under autocast. magnitude and grad_terms: see tolerances.assert_close and assert_grad_close."""
    dtype = x.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = weight.to(weight_dtype or dtype) if weight is not None else None
    ref_loss, ref_grad = reference(x, y, w, reduction, ignore_index, smoothing)
    x3, y3 = as_ncs(x, y)
    N, C, S = x3.shape
    red = REDUCTIONS[reduction]
    expected_loss = ref_loss.reshape(N, S) if reduction == "none" else ref_loss

    # The loss as computed, in the accumulation dtype and to its precision, whatever the logits' dtype (the front end
    # rounds it, or keeps float32 under autocast).
    loss, lse, total_weight = ops.cross_entropy_fwd(x3, y3, w, red, ignore_index, smoothing)
    assert loss.dtype == acc_dtype
    assert_close(loss, expected_loss, acc_dtype, "forward loss", magnitude)
    # lse in two parts: each position's max and the log of its sum of exps relative to that max. An ignored
    # position's row is not read: its lse is that of no classes, (0, -inf).
    assert lse.dtype == acc_dtype and lse.shape == (N, S, 2)
    expected_max, expected_lse, _ = expected_lse_of(x3, y3, ignore_index, lse.dtype)
    torch.testing.assert_close(lse[..., 0], expected_max, rtol=0, atol=0)
    lse_rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse.double().sum(-1), expected_lse, rtol=lse_rtol, atol=lse_rtol)
    if y.is_floating_point():
        expected_total = float(N * S)
    else:
        kept = y3 != ignore_index
        expected_total = (w.double()[y3[kept]].sum() if w is not None else kept.sum()).item()
    assert total_weight.item() == pytest.approx(expected_total, rel=1e-6)

    loss2, grad = ops.cross_entropy_fwd_grad(x3, y3, w, red, ignore_index, smoothing)
    assert grad.dtype == dtype and grad.stride() == kernel_strides(x3)
    assert loss2.dtype == acc_dtype
    assert_close(loss2, expected_loss, acc_dtype, "fwd_grad loss", magnitude)
    assert_grad_close(grad.reshape(x.shape), ref_grad, dtype, "fwd_grad gradient", grad_terms)

    overwritten = _copy_at_the_same_offset(x)  # logits that start mid-vector are written in place as they lie
    loss3 = ops.cross_entropy_fwd_grad_(as_ncs(overwritten, y)[0], y3, w, red, ignore_index, smoothing)
    assert loss3.dtype == acc_dtype
    assert_close(loss3, expected_loss, acc_dtype, "fwd_grad_ loss", magnitude)
    assert_grad_close(overwritten, ref_grad, dtype, "fwd_grad_ gradient (in place)", grad_terms)

    if reduction == "none":
        # Read through its strides: dense, transposed, and expanded along N (stride 0) as loss.sum(0) hands it back.
        values = torch.rand(N, S, dtype=dtype)
        upstream = {"dense": values, "transposed": values.t().contiguous().t(), "expanded": values[:1].expand(N, S)}
    else:
        upstream = {"0-d": torch.tensor(0.7, dtype=dtype)}
    for layout, grad_loss in upstream.items():
        scale = grad_loss.double()
        if reduction == "none":
            scale = scale.reshape(N, 1, *x.shape[2:]) if x.dim() > 1 else scale.reshape(())
        grad_b = ops.cross_entropy_bwd(grad_loss, x3, y3, w, lse, total_weight, red, ignore_index, smoothing)
        assert grad_b.dtype == dtype and grad_b.stride() == kernel_strides(x3)
        assert_grad_close(grad_b.reshape(x.shape), ref_grad * scale, dtype, f"backward gradient ({layout} upstream)",
                          grad_terms)


def every_op_output(ops, x, y, weight, reduction, ignore_index, smoothing):
    """Every tensor the four ops return for x (any layout) and y, the in-place op writing over a copy of x at x's own
    offset, and the backward taking the forward's lse under a random upstream gradient: for comparing two kernel
    plans bit for bit."""
    x3, y3 = as_ncs(x, y)
    red = REDUCTIONS[reduction]
    loss, lse, total_weight = ops.cross_entropy_fwd(x3, y3, weight, red, ignore_index, smoothing)
    overwritten = _copy_at_the_same_offset(x3)
    loss_in_place = ops.cross_entropy_fwd_grad_(overwritten, y3, weight, red, ignore_index, smoothing)
    N, _, S = x3.shape
    upstream = torch.rand(N, S, generator=torch.Generator().manual_seed(0)).to(x.dtype).to(x.device)
    grad_loss = upstream if reduction == "none" else upstream[0, 0]
    grad = ops.cross_entropy_bwd(grad_loss, x3, y3, weight, lse, total_weight, red, ignore_index, smoothing)
    return (loss, lse, total_weight, *ops.cross_entropy_fwd_grad(x3, y3, weight, red, ignore_index, smoothing),
            loss_in_place, overwritten, grad)


def assert_same_bits_under(monkeypatch, call, name, values):
    """call()'s tensors with environment variable `name` set to each of `values` are bitwise those without it."""
    monkeypatch.delenv(name, raising=False)
    unset = call()
    for value in values:
        monkeypatch.setenv(name, value)
        for got, expected in zip(call(), unset, strict=True):
            assert torch.equal(got, expected), (name, value)
    monkeypatch.delenv(name)


def value_check_cases(device):
    """(target or None, weight or None, ignore_index, num_classes, expected flags) for the value_check op: class
    indices in int64 and uint8, ignore_index below, inside and above the classes, a bad index at a random place (one
    or many), targets long enough for every block of the grid to loop, no classes at all, and weights of every
    dtype with and without a NaN."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for count, classes, ignore_index in ((1, 5, -100), (1000, 19, 255), (300_000, 50, -100), (4099, 7, 3),
                                          (10, 0, -100)):
        target = torch.randint(0, max(classes, 1), (count,), generator=generator)
        target[torch.rand(count, generator=generator) < 0.3] = ignore_index
        if classes == 0:
            target.fill_(ignore_index)
        cases.append((target, None, ignore_index, classes, [0, 0]))
        for bad in (-1, classes, -101, 1 << 40):
            wrong = target.clone()
            wrong[int(torch.randint(0, count, (), generator=generator))] = bad
            cases.append((wrong, None, ignore_index, classes, [int(bad != ignore_index), 0]))
    every_other = torch.randint(0, 10, (5000,), generator=generator)
    every_other[::2] = 10
    cases.append((every_other, None, -100, 10, [1, 0]))
    small = torch.randint(0, 200, (777,), generator=generator, dtype=torch.uint8)
    cases += [(small, None, 255, 200, [0, 0]), (small, None, 255, 150, [int(bool((small >= 150).any())), 0])]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        weight = torch.rand(1000, generator=generator).to(dtype)
        cases += [(None, weight, -100, 1000, [0, 0]), (cases[0][0], weight, -100, 5, [0, 0])]
        with_nan = weight.clone()
        with_nan[int(torch.randint(0, 1000, (), generator=generator))] = float("nan")
        cases += [(None, with_nan, -100, 1000, [0, 1]), (cases[1][0], with_nan, -100, 5, [1, 1])]
    return [(t if t is None else t.to(device), w if w is None else w.to(device), i, c, e) for t, w, i, c, e in cases]


# (N, C, S), how the gradient lies in memory: rows, NCHW, channels_last, column-major rows (N innermost, as the
# in-place op writes over transposed logits), positions outermost, one position, one class, no positions, and rows
# long enough for every block of the grid to loop.
SCALE_SHAPES = [((37, 10, 1), "rows"), ((2, 19, 64), "nchw"), ((2, 19, 35), "channels_last"),
                ((37, 10, 1), "column_major"), ((3, 5, 7), "positions_outermost"), ((1, 7, 1), "rows"),
                ((3, 1, 1), "rows"), ((2, 4, 0), "nchw"), ((3, 5000, 1), "rows"), ((2, 3, 70000), "nchw")]
# The dimensions of (N, C, S) in the order of memory, outermost first.
STORAGE_ORDERS = {"rows": (0, 1, 2), "nchw": (0, 1, 2), "channels_last": (0, 2, 1), "column_major": (1, 2, 0),
                  "positions_outermost": (2, 0, 1)}
# Upstream gradients: the usual 1, a mean over accumulation steps, a loss scale's power of two, negative, zero, and
# an overflowed loss scale.
SCALE_FACTORS = [1.0, 0.37, 65536.0, -2.5, 0.0, float("inf"), float("nan")]


def unit_grad_cases(dtype, device="cpu", shapes=SCALE_SHAPES):
    """(gradient, class-index target or None) pairs as a forward makes them for an upstream gradient of 1: dense, in
    every layout of SCALE_SHAPES, with every third position of every other batch entry ignored (its gradient +0; not
    entry 0, whose elements lead the buffer), some exact zeros elsewhere (probabilities that underflowed), and
    starting at several offsets from a 16-byte boundary (elements before the first aligned vector)."""
    generator = torch.Generator().manual_seed(11)
    cases = []
    for (N, C, S), layout in shapes:
        order = STORAGE_ORDERS[layout]
        from_storage = [order.index(d) for d in range(3)]
        for start in (0, 1, 3):
            flat = torch.randn(start + N * C * S, generator=generator).to(device, dtype)  # .to keeps no offset
            flat[start::11] = 0
            grad = flat[start:].view([(N, C, S)[d] for d in order]).permute(*from_storage)
            target = torch.randint(0, C, (N, S), generator=generator).to(device)
            target[1::2, ::3] = -100
            grad.permute(0, 2, 1)[target == -100] = 0
            cases.append((grad, target))
        cases.append((torch.randn(N, C, S, generator=generator).to(device, dtype), None))
    return cases


def check_scale_unit_grad(scale_unit_grad_, dtype, device="cpu", exact=True):
    """scale_unit_grad_(grad, grad_loss, target, -100) against fused_xent._ops.scale_unit_grad (PyTorch's ops, out of
    place) for every case and factor, bit for bit where the result is a number, NaN where it gives NaN, except that
    with a finite factor an exact zero keeps its +0 where those ops make a negative factor's -0 (PyTorch's gradient
    has +0 there). A factor of 1 leaves every bit of the gradient as it was. exact=False: within one rounding of
    the dtype (the Triton interpreter truncates where a GPU rounds to nearest), zeros' signs still exact."""
    from fused_xent._ops import scale_unit_grad

    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for grad, target in unit_grad_cases(dtype, device):
        for factor in SCALE_FACTORS:
            g = _copy_at_the_same_offset(grad)
            grad_loss = torch.tensor(factor, dtype=dtype, device=device)
            # A floating target (the gradient itself stands in) is one of probabilities: nothing is ignored.
            expected = scale_unit_grad(grad, grad_loss, grad if target is None else target, -100)
            if grad_loss.isfinite():  # 65536 is inf in float16
                expected = torch.where(grad == 0, grad, expected)
            scale_unit_grad_(g, grad_loss, target, -100)
            what = (tuple(grad.shape), grad.stride(), grad.storage_offset(), target is None, factor)
            if factor == 1:
                assert torch.equal(g.view(bits), grad.view(bits)), what
                continue
            nan = expected.isnan()
            assert torch.equal(g.isnan(), nan), what
            assert torch.equal(g.signbit()[~nan], expected.signbit()[~nan]), what
            if exact:
                assert torch.equal(g.view(bits)[~nan], expected.view(bits)[~nan]), what
            else:
                torch.testing.assert_close(g, expected, rtol=2 * torch.finfo(dtype).eps, atol=0, equal_nan=True,
                                           msg=str(what))


def _copy_at_the_same_offset(t):
    """A copy of a view that keeps its strides and its offset into a fresh buffer, so its address modulo 16 bytes
    too (clone() would start it at the buffer's aligned beginning, and make a view with gaps dense)."""
    if t.numel() == 0:
        return t.clone()
    extent = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
    return t.new_empty(extent).as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def check_in_place_call_counts_its_write(fwd_grad_, device="cpu"):
    """fwd_grad_ (an in-place forward op) called directly: it moves the version counter of the logits it writes
    over, so an op that saved them refuses to backward from the gradient they now hold, and it refuses a leaf that
    requires grad, as PyTorch's in-place ops do. Returns a (4, 5, 1) leaf and a target to try other calls with."""
    g = torch.Generator().manual_seed(9)
    target = torch.randint(0, 5, (4, 1), generator=g).to(device)
    hidden = torch.randn(4, 5, generator=g).to(device).requires_grad_(True) * 2
    saved_by_sin = hidden.sin()
    version = hidden._version
    fwd_grad_(hidden.unsqueeze(-1), target, None, 1, -100, 0.0)
    assert hidden._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_by_sin.sum().backward()
    leaf = torch.randn(4, 5, 1, generator=g).to(device).requires_grad_(True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fwd_grad_(leaf, target, None, 1, -100, 0.0)
    return leaf, target

