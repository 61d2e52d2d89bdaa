"""Behaviour under threads, repetition, autograd contexts and autocast, as PyTorch behaves."""

import ctypes
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    assert_grad_close,
    backend_cases,
    backends_for,
    make_class_target,
    make_logits,
    make_prob_target,
    poison_cuda_cache,
)

import fused_xent

BACKENDS = backends_for("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_python_threads(backend):
    """Eight Python threads calling at once, each 20 times (rows of 32000 classes, so that the kernels overlap):
    every loss and gradient is bitwise the one computed alone."""
    g = torch.Generator().manual_seed(7)
    inputs = [(make_logits((16, 32000), "contiguous", torch.float32, generator=g),
               make_class_target((16,), 32000, ignore_index=-100, generator=g)) for _ in range(8)]

    def loss_and_grad(x, t):
        leaf = x.clone().requires_grad_(True)
        loss = fused_xent.cross_entropy(leaf, t, backend=backend, label_smoothing=0.1)
        return loss.detach(), torch.autograd.grad(loss, leaf)[0]

    expected = [loss_and_grad(x, t) for x, t in inputs]
    for (x, t), (serial, _) in zip(inputs, expected, strict=True):  # the serial calls are PyTorch's losses
        torch.testing.assert_close(serial, F.cross_entropy(x, t, label_smoothing=0.1))
    results = [[] for _ in inputs]

    def work(i):
        for _ in range(20):
            results[i].append(loss_and_grad(*inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, (loss, grad) in zip(results, expected, strict=True):
        assert len(got) == 20
        assert all(torch.equal(each_loss, loss) and torch.equal(each_grad, grad) for each_loss, each_grad in got)


class _MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_bytes_in_use():
    """Bytes glibc's malloc has handed out and not had back (heap and mapped blocks): unlike peak RSS, it sees a
    leak below the pages already touched, and one of a few bytes a call."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc 2.33's mallinfo2 is not here")
    mallinfo2.restype = _MallocInfo
    gc.collect()
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
def test_repeated_calls_do_not_grow_memory(backend, grad_mode):
    """2000 training steps hold no more memory than 200 did: under 128 bytes a step (a leaked gradient would be
    250 KiB of it)."""
    x = make_logits((64, 1000), "contiguous", torch.float32).requires_grad_(True)
    t = make_class_target((64,), 1000)

    def step():
        fused_xent.cross_entropy(x * 1, t, backend=backend, grad_mode=grad_mode).backward()
        x.grad = None

    for _ in range(200):
        step()
    before = _heap_bytes_in_use()
    for _ in range(2000):
        step()
    grown = _heap_bytes_in_use() - before
    assert grown < 256 << 10, f"malloc's bytes in use grew by {grown} over 2000 calls"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_contexts(backend, context):
    x = make_logits((5, 9), "contiguous", torch.float32).requires_grad_(True)
    t = make_class_target((5,), 9)
    with context():
        loss = fused_xent.cross_entropy(x, t, backend=backend)
        expected = F.cross_entropy(x, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_without_grad(backend):
    x, t = make_logits((5, 9), "contiguous", torch.float32), make_class_target((5,), 9)
    loss = fused_xent.cross_entropy(x, t, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x, t))


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("case", ["index", "index-weight", "half-weight-none", "probs", "float32-probs"])
def test_autocast_computes_in_float32_like_pytorch(device, backend, dtype, grad_mode, case):
    """Autocast runs cross entropy in float32 (float32 loss; the gradient of half-precision logits in their dtype).
    fused_xent reads half-precision logits as they are, without PyTorch's float32 copy: the loss must be float32 to
    float32's precision, and the gradient the exact one rounded once (the float64 gradient, cast to the logits'
    dtype: PyTorch's own autocast gradient on CUDA is a rounding off it where the terms of the probability-target
    gradient cancel). A probability target of another dtype takes PyTorch's casts."""
    g = torch.Generator().manual_seed(11)
    leaf = make_logits((6, 4, 3, 11), "channels_last", dtype, device, generator=g).requires_grad_(True)
    kwargs = {"label_smoothing": 0.1, "reduction": "none" if case == "half-weight-none" else "mean"}
    if case == "probs":
        target = make_prob_target(leaf, generator=g)
    elif case == "float32-probs":
        target = make_prob_target(leaf.float(), generator=g)
    else:
        target = make_class_target((6, 3, 11), 4, device, ignore_index=-100, generator=g)
    if "weight" in case:
        weight = torch.rand(4, generator=g) + 0.5
        kwargs["weight"] = weight.to(device, dtype if case.startswith("half") else torch.float32)
    logits = leaf.clone() if grad_mode == "inplace" else leaf  # inplace refuses leaves
    poison_cuda_cache()
    with torch.autocast(device, dtype=dtype):
        loss = fused_xent.cross_entropy(logits, target, backend=backend, grad_mode=grad_mode, **kwargs)
        expected = F.cross_entropy(leaf, target, **kwargs)
    assert loss.dtype == expected.dtype == torch.float32
    upstream = (torch.rand(loss.shape, generator=g) + 0.5).to(device)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    assert grad.dtype == dtype
    float64_kwargs = dict(kwargs, weight=kwargs["weight"].double()) if "weight" in kwargs else kwargs
    float64_loss = F.cross_entropy(leaf.double(), target.double() if target.is_floating_point() else target,
                                   **float64_kwargs)
    (exact_grad,) = torch.autograd.grad(float64_loss, leaf, upstream.double())  # rounded once, to dtype
    assert_close(loss, float64_loss, torch.float32, "loss")
    assert_grad_close(grad, exact_grad.double(), dtype, "gradient")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("upstream", [65536.0, 1 / 3], ids=["loss-scale", "accumulation"])
def test_autocast_gradient_under_a_loss_scale(device, backend, dtype, grad_mode, upstream):
    """Mixed precision scales the loss: GradScaler by 65536 (past float16's largest value), gradient accumulation by
    1/steps (not a half-precision number). PyTorch multiplies the float32 gradient by the float32 scale and rounds
    once; so must every grad_mode. A gradient stored in half precision for an upstream gradient of 1 would come back
    inf (float16 65536), without its underflowed small entries, or biased by the rounded scale (bfloat16 1/3 is
    0.19% large)."""
    g = torch.Generator().manual_seed(5)
    leaf = make_logits((512, 1000), "contiguous", dtype, device, generator=g).requires_grad_(True)
    target = make_class_target((512,), 1000, device, generator=g)
    logits = leaf * 1  # inplace refuses leaves
    with torch.autocast(device, dtype=dtype):
        loss = fused_xent.cross_entropy(logits, target, backend=backend, grad_mode=grad_mode)
    got = torch.autograd.grad(loss * upstream, leaf)[0].double()
    # The exact gradient rounded once: PyTorch's own on CPU; on the H200 its autocast gradient differed from this and
    # from ours by a mean 0.05-0.2% (bfloat16 rounding of 1/3 is 0.19%).
    expected = torch.autograd.grad(F.cross_entropy(leaf.double(), target) * upstream, leaf)[0].double()
    assert got.isfinite().all()
    assert (got == 0).sum() <= (expected == 0).sum() + 10, "entries underflowed to 0"
    nonzero = expected != 0
    bias = ((got - expected)[nonzero] / expected[nonzero]).mean().item()
    assert abs(bias) < 2e-4, f"mean relative deviation {bias:.2e}"
    info = torch.finfo(dtype)  # within an ulp; among subnormals, within their spacing
    torch.testing.assert_close(got, expected, rtol=info.eps, atol=info.smallest_normal * info.eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_double_backward_rounds_once(backend, dtype):
    """create_graph=True under autocast, through the logits, a probability target and a weight: the second-order
    terms of every path must meet in float32 and be rounded to the half dtype once, as through PyTorch's float32
    copy (each path casting the logits apart rounded each term, then added them in half precision)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 12, generator=g) * 2).to(dtype)
    probs = torch.softmax(torch.randn(16, 12, generator=g), 1).to(dtype)
    weight, probe = torch.rand(12, generator=g) + 0.5, torch.randn(16, 12, generator=g)
    results = []

    def fused(*args, **kwargs):
        return fused_xent.cross_entropy(*args, backend=backend, **kwargs)

    for loss_fn in (F.cross_entropy, fused):
        x, t, w = logits.clone().requires_grad_(), probs.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(x, t, weight=w, label_smoothing=0.1)
        gx, gt, gw = torch.autograd.grad(loss, (x, t, w), create_graph=True)
        penalty = (gx.double() * probe).sum() + gt.double().pow(2).sum() + gw.double().pow(2).sum()
        results.append(torch.autograd.grad(penalty, (x, t, w)))
    for name, got, expected in zip(("logits", "target", "weight"), results[1], results[0], strict=True):
        assert got.dtype == expected.dtype, name
        torch.testing.assert_close(got, expected, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward"])
def test_gradient_accumulates_into_grad(backend, grad_mode):
    x = make_logits((4, 7), "contiguous", torch.float64).requires_grad_(True)
    t = make_class_target((4,), 7)
    for _ in range(3):
        fused_xent.cross_entropy(x, t, backend=backend, grad_mode=grad_mode).backward()
    y = x.detach().clone().requires_grad_(True)
    (3 * F.cross_entropy(y, t)).backward()
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_double_backward_matches_pytorch(backend, kind):
    """create_graph=True (gradient penalties) differentiates through the gradient, as with PyTorch: the loss (from
    the backend's forward), the gradient and the penalty's gradient."""
    g = torch.Generator().manual_seed(3)
    x = make_logits((4, 7, 3), "contiguous", torch.float64, generator=g)
    t = torch.softmax(torch.randn(4, 7, 3, generator=g, dtype=torch.float64), 1) if kind == "prob" else \
        make_class_target((4, 3), 7, ignore_index=-100, generator=g)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda x: fused_xent.cross_entropy(x, t, weight=w, label_smoothing=0.2, backend=backend),
               lambda x: F.cross_entropy(x, t, weight=w, label_smoothing=0.2)):
        xx = x.clone().requires_grad_(True)
        loss = fn(xx)
        (grad,) = torch.autograd.grad(loss, xx, create_graph=True)
        (second,) = torch.autograd.grad((grad * grad.cos()).sum(), xx)
        results.append((loss.detach(), grad.detach(), second))
    torch.testing.assert_close(*results)
    xx = x.clone().requires_grad_(True)
    loss = fused_xent.cross_entropy(xx, t, backend=backend, grad_mode="in_forward")
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(loss, xx, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignored", ["all", "zero_weight_rest"])
def test_double_backward_over_zero_total_weight(backend, ignored):
    """A mean over zero target weight is NaN (0/0): PyTorch's ignored rows still get exactly zero second-order
    gradients, its kept rows (of zero weight) NaN."""
    g = torch.Generator().manual_seed(4)
    x = make_logits((5, 4), "contiguous", torch.float64, generator=g)
    t = torch.tensor([-100, 1, -100, 3, 0]) if ignored == "zero_weight_rest" else torch.full((5,), -100)
    w = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # every class a kept target names weighs 0
    direction = torch.randn(5, 4, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda x: fused_xent.cross_entropy(x, t, weight=w, label_smoothing=0.1, backend=backend),
               lambda x: F.cross_entropy(x, t, weight=w, label_smoothing=0.1)):
        xx = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(xx), xx, create_graph=True)
        (second,) = torch.autograd.grad((grad * direction).sum(), xx)
        results.append((grad.detach(), second))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert results[0][1][t == -100].eq(0).all()


@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
def test_meta_tensors_give_shapes(grad_mode):
    """Shape inference on the meta device (models built there, FLOP counters): the loss and gradient come back as
    meta tensors of PyTorch's shapes, with no data-dependent check to trip over."""
    for shape, reduction in (((4, 7), "mean"), ((2, 7, 3, 5), "none"), ((7,), "sum")):
        leaf = torch.randn(shape, device="meta", requires_grad=True)
        target = torch.zeros(shape[:1] + shape[2:] if len(shape) > 1 else (), dtype=torch.long, device="meta")
        loss = fused_xent.cross_entropy(leaf * 1, target, reduction=reduction, grad_mode=grad_mode)
        expected = F.cross_entropy(leaf, target, reduction=reduction)
        assert loss.is_meta and loss.shape == expected.shape
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        assert grad.is_meta and grad.shape == shape


def test_tensor_subclasses_see_the_call():
    """As with PyTorch's functions, a tensor subclass's __torch_function__ is handed the call, and the result keeps
    its type."""
    class Traced(torch.Tensor):
        calls = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    logits, target = torch.randn(4, 5), torch.tensor([0, 4, 2, 1])
    loss = fused_xent.cross_entropy(logits.as_subclass(Traced), target, label_smoothing=0.1)
    assert Traced.calls[0] is fused_xent.cross_entropy and type(loss) is Traced
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), F.cross_entropy(logits, target, label_smoothing=0.1))
