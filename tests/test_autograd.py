"""float64 gradcheck over the argument grid, torch.library.opcheck of every op, and torch.compile(fullgraph=True)."""

import functools
import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import backends_for, make_class_target, make_logits, make_prob_target
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fused_xent

BACKENDS = backends_for("cpu")
needs_extension = pytest.mark.skipif("cpu" not in fused_xent.available_backends(), reason="compiled extension missing")
GRAD_SHAPES = [((5,), "contiguous"), ((3, 5), "contiguous"), ((2, 4, 3), "contiguous"), ((2, 3, 2, 2), "channels_last")]


def _targets(shape, kind, generator):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    if kind == "prob":
        return make_prob_target(torch.empty(shape, dtype=torch.float64), generator=generator)
    target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = make_class_target(target_shape, num_classes, generator=generator)
    if target.numel() > 1:
        target.view(-1)[0] = -100
    return target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout", GRAD_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_gradcheck(backend, shape, layout, kind):
    g = torch.Generator().manual_seed(1)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    for reduction, smoothing, weighted in itertools.product(["none", "mean", "sum"], [0.0, 0.25], [False, True]):
        logits = make_logits(shape, layout, torch.float64, generator=g).requires_grad_(True)
        target = _targets(shape, kind, g)
        weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.5 if weighted else None

        def loss_fn(x, target=target, weight=weight, reduction=reduction, smoothing=smoothing):
            return fused_xent.cross_entropy(x, target, weight=weight, reduction=reduction,
                                            label_smoothing=smoothing, backend=backend)

        assert torch.autograd.gradcheck(loss_fn, (logits,))


def _op_samples():
    g = torch.Generator().manual_seed(2)
    # Column-major rows too: the kernels lay their gradient out row-major, which the fake kernels must say.
    for shape, layout in [((4, 7), "contiguous"), ((6, 10), "transposed"), ((2, 5, 3, 2), "contiguous"),
                          ((2, 5, 3, 2), "channels_last")]:
        for dtype, kind, weighted, reduction in itertools.product(
            [torch.float32, torch.bfloat16], ["index", "prob"], [False, True], [0, 1, 2]
        ):
            logits = make_logits(shape, layout, dtype, generator=g)
            n, c = shape[:2]
            logits3 = logits.reshape(n, c, -1)
            if kind == "prob":
                target = make_prob_target(logits, generator=g).reshape(n, c, -1)
            else:
                target = make_class_target((n, logits3.shape[2]), c, ignore_index=-100, generator=g)
            weight = torch.rand(c, generator=g).to(dtype) if weighted else None
            yield logits3, target, weight, reduction


@needs_extension
def test_opcheck_all_ops():
    ops = torch.ops.fused_xent
    for logits, target, weight, reduction in _op_samples():
        options = (reduction, -100, 0.1)
        torch.library.opcheck(ops.cross_entropy_fwd.default, (logits, target, weight, *options))
        torch.library.opcheck(ops.cross_entropy_fwd.default, (logits.requires_grad_(True), target, weight, *options))
        logits = logits.detach()
        loss, lse, total_weight = ops.cross_entropy_fwd(logits, target, weight, *options)
        grad_loss = torch.rand_like(loss)
        torch.library.opcheck(ops.cross_entropy_bwd.default,
                              (grad_loss, logits, target, weight, lse, total_weight, *options))
        torch.library.opcheck(ops.cross_entropy_fwd_grad.default, (logits, target, weight, *options))
        torch.library.opcheck(ops.cross_entropy_fwd_grad_.default, (logits.clone(), target, weight, *options),
                              test_utils=("test_schema", "test_faketensor"))



@needs_extension
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_fwd_grad_op_backward_scales_by_the_upstream_gradient(reduction):
    """Called directly (the front end calls it below autograd), the op that makes the gradient in its forward is
    differentiable through the autograd that _ops.register_autograd gives it: backward scales that gradient by the
    upstream one (gradcheck's one-hot upstream gradients per position for reduction none; 3 for a mean or sum)."""
    g = torch.Generator().manual_seed(9)
    logits = make_logits((5, 6), "contiguous", torch.float64, generator=g).reshape(5, 6, 1).requires_grad_(True)
    target = make_class_target((5, 1), 6, ignore_index=-100, generator=g)
    op = torch.ops.fused_xent.cross_entropy_fwd_grad
    assert torch.autograd.gradcheck(lambda x: 3 * op(x, target, None, reduction, -100, 0.1)[0], (logits,))

class TinySegmenter(torch.nn.Module):
    def __init__(self, loss_fn):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 5, 1)
        self.loss_fn = loss_fn

    def forward(self, image, target):
        return self.loss_fn(self.head(image), target)


@pytest.mark.parametrize("backend,compiler", [*((b, "aot_eager") for b in BACKENDS), (None, "aot_eager"),
                                              (None, "inductor")])
def test_torch_compile_fullgraph(backend, compiler):
    """A model using the loss compiles with no graph break and matches eager, loss and parameter gradients."""
    torch.manual_seed(0)
    image, target = torch.randn(2, 3, 6, 6), torch.randint(0, 5, (2, 6, 6))
    target[0, 0, :3] = -100
    model = TinySegmenter(fused_xent.CrossEntropyLoss(label_smoothing=0.1, backend=backend))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    reference = TinySegmenter(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    reference.load_state_dict(model.state_dict())
    got, expected = compiled(image, target), reference(image, target)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.head.weight.grad, reference.head.weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_with_a_dynamic_batch(backend):
    """torch.export of a model whose loss is fused_xent's, with a dynamic batch: the CPU kernel stays one op in the
    exported graph, and the exported program's loss and parameter gradients on a batch of another size are those of
    the same model with PyTorch's loss."""
    torch.manual_seed(4)
    options = {"label_smoothing": 0.1, "weight": torch.rand(5) + 0.5, "ignore_index": 2}
    model = TinySegmenter(fused_xent.CrossEntropyLoss(**options, backend=backend))
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (torch.randn(2, 3, 4, 6), torch.randint(0, 5, (2, 4, 6))),
                                   dynamic_shapes=({0: batch}, {0: batch}))
    if backend == "cpu":
        assert "torch.ops.fused_xent.cross_entropy_fwd" in exported.graph_module.code
    reference = TinySegmenter(torch.nn.CrossEntropyLoss(**options))
    reference.load_state_dict(model.state_dict())
    image, target = torch.randn(3, 3, 4, 6), torch.randint(0, 5, (3, 4, 6))
    program = exported.module()
    got, expected = program(image, target), reference(image, target)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(program.head.weight.grad, reference.head.weight.grad)
    torch.testing.assert_close(program.head.bias.grad, reference.head.bias.grad)


def test_torch_compile_traces_the_loss_once():
    """Compiled as the first call of a process, the loss is traced once: the front end keeps nothing that changes
    between calls (a cache filled on first use would be a global change that recompiles the second call)."""
    script = (
        "import torch, torch._dynamo.testing, fused_xent\n"
        "counter = torch._dynamo.testing.CompileCounter()\n"
        "loss = torch.compile(fused_xent.cross_entropy, backend=counter, fullgraph=True)\n"
        "for _ in range(3):\n"
        "    logits = torch.randn(6, 5, requires_grad=True)\n"
        "    loss(logits, torch.randint(0, 5, (6,))).backward()\n"
        "    assert logits.grad is not None\n"
        "print(counter.frame_count)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_torch_module(backend):
    weight = torch.rand(6) + 0.5
    arguments = dict(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.2)
    ours = fused_xent.CrossEntropyLoss(**arguments, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(**arguments)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    x, t = torch.randn(8, 6), torch.randint(0, 6, (8,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert f"backend={backend}, grad_mode=recompute" in repr(ours)
    assert "backend=FUSED_XENT_BACKEND or auto" in repr(fused_xent.CrossEntropyLoss())


def test_module_calls_with_its_backend_and_grad_mode(monkeypatch):
    """The module's grad_mode and backend reach the call: inplace writes the gradient over the logits, and a backend
    named on the module wins over FUSED_XENT_BACKEND (which names none here)."""
    x, t = torch.randn(8, 6), torch.randint(0, 6, (8,))
    leaf = x.clone().requires_grad_(True)
    logits = x.clone().requires_grad_(True) * 1
    fused_xent.CrossEntropyLoss(grad_mode="inplace")(logits, t)
    torch.testing.assert_close(logits.detach(), torch.autograd.grad(F.cross_entropy(leaf, t), leaf)[0])
    monkeypatch.setenv("FUSED_XENT_BACKEND", "nonsense")
    for backend in BACKENDS:
        torch.testing.assert_close(fused_xent.CrossEntropyLoss(backend=backend)(x, t), F.cross_entropy(x, t))


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize("backend", BACKENDS)
def test_legacy_size_average_and_reduce(backend):
    x, t = torch.randn(5, 4), torch.randint(0, 4, (5,))
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        torch.testing.assert_close(
            fused_xent.cross_entropy(x, t, size_average=size_average, reduce=reduce, backend=backend),
            F.cross_entropy(x, t, size_average=size_average, reduce=reduce),
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # raised inside torch.func
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_of_probability_targets(backend):
    """PyTorch differentiates the loss of probability targets with respect to weight; so do we (float64 gradcheck
    of logits, target and weight together). For class indices both refuse a weight that requires grad, under
    torch.func.grad and forward-mode AD too (whose loss comes from another path, which once gave a gradient)."""
    g = torch.Generator().manual_seed(4)
    logits = make_logits((3, 5, 2), "contiguous", torch.float64, generator=g).requires_grad_(True)
    target = make_prob_target(logits, generator=g).requires_grad_(True)
    weight = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    for reduction, smoothing in itertools.product(["none", "mean", "sum"], [0.0, 0.3]):
        def loss(x, t, w, reduction=reduction, smoothing=smoothing):
            return fused_xent.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing,
                                            backend=backend)

        assert torch.autograd.gradcheck(loss, (logits, target, weight))
    class_index = torch.tensor([[0, 1], [2, 3], [4, 0]])
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        fused_xent.cross_entropy(logits, class_index, weight=weight, backend=backend)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        torch.func.grad(lambda w: fused_xent.cross_entropy(logits.detach(), class_index, w, backend=backend))(weight)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(RuntimeError, match="not differentiable"):
        dual = torch.autograd.forward_ad.make_dual(logits.detach(), torch.ones_like(logits))
        fused_xent.cross_entropy(dual, class_index, weight=weight, backend=backend)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # raised inside torch.func
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_forward_mode_derivative_of_class_weights_is_pytorchs(reduction):
    """PyTorch's forward-mode derivative with respect to class weights (class-index targets) counts only the weight
    of its smoothing term: 0 without smoothing, where the true derivative is not. The same numbers here."""
    g = torch.Generator().manual_seed(9)
    x = make_logits((2, 5, 3), "contiguous", torch.float64, generator=g)
    t = make_class_target((2, 3), 5, generator=g)
    t[0, 1] = -100
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(5, generator=g, dtype=torch.float64)
    for smoothing in (0.0, 0.3):
        kwargs = {"reduction": reduction, "label_smoothing": smoothing}
        jvps = [torch.func.jvp(functools.partial(loss, x, t, **kwargs), (w,), (v,))
                for loss in (fused_xent.cross_entropy, F.cross_entropy)]
        torch.testing.assert_close(*jvps, rtol=1e-12, atol=1e-12)


def test_vmap_with_class_weights_and_smoothing():
    """Class weights with label smoothing under vmap, one weight for every entry or one each: where the weight is
    not batched, PyTorch's own composition fails (a masked_select over a batched mask); the reference ops give each
    entry's loss and per-sample gradients."""
    g = torch.Generator().manual_seed(10)
    x = make_logits((3, 4, 5), "contiguous", torch.float64, generator=g)
    t = torch.randint(0, 5, (3, 4), generator=g)
    t[0, 1] = -100
    weights = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5
    for w, in_dims in ((weights[0], (0, 0, None)), (weights, (0, 0, 0))):
        loss = lambda x, t, w: fused_xent.cross_entropy(x, t, w, label_smoothing=0.2)  # noqa: E731
        expected = lambda x, t, w: F.cross_entropy(x, t, w, label_smoothing=0.2)  # noqa: E731
        per_entry = [(x[i], t[i], w if in_dims[2] is None else w[i]) for i in range(3)]
        torch.testing.assert_close(torch.vmap(loss, in_dims)(x, t, w),
                                   torch.stack([expected(*args) for args in per_entry]))
        torch.testing.assert_close(torch.vmap(torch.func.grad(loss), in_dims)(x, t, w),
                                   torch.stack([torch.func.grad(expected)(*args) for args in per_entry]))


def test_function_transforms_compile_in_one_graph():
    """torch.compile(fullgraph=True) of torch.func.grad and of per-sample gradients (vmap of grad), as of
    F.cross_entropy: the front end's value checks are off while Dynamo traces, so it must not reach for the tensors
    beneath the transforms' wrappers, which Dynamo cannot trace."""
    g = torch.Generator().manual_seed(6)
    x = make_logits((6, 5), "contiguous", torch.float32, generator=g)
    t = make_class_target((6,), 5, generator=g)
    grad = lambda loss: torch.func.grad(lambda x, t: loss(x, t, label_smoothing=0.1))  # noqa: E731
    per_sample = lambda loss: torch.vmap(grad(lambda x, t, **kw: loss(x[None], t[None], **kw)))  # noqa: E731
    for transform in (grad, per_sample):
        got = torch.compile(transform(fused_xent.cross_entropy), fullgraph=True, backend="eager")(x, t)
        torch.testing.assert_close(got, transform(F.cross_entropy)(x, t))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # raised inside torch.func
@pytest.mark.parametrize("kwargs", [{}, {"label_smoothing": 0.2, "reduction": "sum"}, {"ignore_index": 1}], ids=str)
def test_function_transforms(kwargs):
    """torch.func.grad, hessian, vmap (per-sample gradients) and forward-mode AD, as with F.cross_entropy: under a
    transform the loss comes from the reference implementation's PyTorch ops, which have the rules it needs."""
    g = torch.Generator().manual_seed(5)
    x = make_logits((4, 5), "contiguous", torch.float64, generator=g)
    t = make_class_target((4,), 5, generator=g)
    ours = lambda x, t: fused_xent.cross_entropy(x, t, **kwargs)  # noqa: E731
    theirs = lambda x, t: F.cross_entropy(x, t, **kwargs)  # noqa: E731
    for transform in (torch.func.grad, torch.func.hessian):
        torch.testing.assert_close(transform(ours)(x, t), transform(theirs)(x, t))
    per_sample = lambda loss: torch.vmap(torch.func.grad(lambda x, t: loss(x[None], t[None])))  # noqa: E731
    torch.testing.assert_close(per_sample(ours)(x, t), per_sample(theirs)(x, t))
    tangent = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        jvps = [torch.autograd.forward_ad.unpack_dual(loss(dual, t)).tangent for loss in (ours, theirs)]
    torch.testing.assert_close(*jvps)
    jvp = lambda loss: torch.func.jvp(lambda x: loss(x, t), (x,), (tangent,))[1]  # noqa: E731
    torch.testing.assert_close(torch.compile(lambda x: jvp(ours), backend="aot_eager")(x), jvp(theirs))
    bad = t.clone()
    bad[1] = 5
    with pytest.raises(IndexError, match="target 5 at position 1 is out of range"):
        torch.func.grad(ours)(x, bad)


def test_bad_values_under_vmap_raise_as_in_pytorch():
    """vmap lets no Python branch read its batched values, so the value checks read the plain tensors beneath:
    an out-of-range class raises (PyTorch's gather raises too) instead of giving NaN for its batch entry, and a NaN
    weight raises as it does outside vmap, batched or not; targets equal to ignore_index pass."""
    g = torch.Generator().manual_seed(8)
    x = make_logits((2, 3, 5), "contiguous", torch.float32, generator=g)
    t = torch.tensor([[0, 1, 2], [1, 9, 0]])
    with pytest.raises(RuntimeError):
        torch.vmap(F.cross_entropy)(x, t)
    with pytest.raises(IndexError, match="target 9 at position 4 is out of range for 5 classes.* all batch entries"):
        torch.vmap(fused_xent.cross_entropy)(x, t)
    with pytest.raises(IndexError, match="target 9 .* is out of range"):
        torch.func.jacrev(fused_xent.cross_entropy)(x[1], t[1])
    ignoring = lambda x, t: fused_xent.cross_entropy(x, t, ignore_index=9)  # noqa: E731
    torch.testing.assert_close(torch.vmap(ignoring)(x, t), torch.vmap(F.cross_entropy)(x, t.where(t != 9, -100)))
    weight = torch.ones(5)
    weight[2] = float("nan")
    with pytest.raises(ValueError, match=r"weight contains NaN \(first at class 2\)"):
        torch.vmap(lambda x, t: fused_xent.cross_entropy(x, t, weight=weight))(x, t.clamp(max=4))
    batched_weight = torch.ones(2, 5)
    batched_weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN: the loss"):
        torch.vmap(lambda x, t, w: fused_xent.cross_entropy(x, t, weight=w))(x, t.clamp(max=4), batched_weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_with_the_gradient_over_the_logits(backend):
    head = torch.nn.Linear(8, 6)
    hidden, target = torch.randn(5, 8), torch.randint(0, 6, (5,))
    step = torch.compile(lambda h, t: fused_xent.cross_entropy(head(h), t, grad_mode="inplace", backend=backend),
                         fullgraph=True, backend="aot_eager")
    step(hidden, target).backward()
    got = head.weight.grad.clone()
    head.weight.grad = None
    F.cross_entropy(head(hidden), target).backward()
    torch.testing.assert_close(got, head.weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
def test_torch_compile_under_autocast(backend, grad_mode):
    """A bfloat16 LM head under autocast, compiled whole: the loss is float32 (the kernels read the bfloat16 logits
    as they are) and matches eager PyTorch, and so do the head's gradients."""
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 40).to(torch.bfloat16)
    hidden, target = torch.randn(12, 16, dtype=torch.bfloat16), torch.randint(0, 40, (12,))

    def step(loss_fn, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(head(hidden), target, label_smoothing=0.1, **kwargs)

    compiled = torch.compile(lambda: step(fused_xent.cross_entropy, grad_mode=grad_mode, backend=backend),
                             fullgraph=True, backend="aot_eager")
    loss = compiled()
    got = torch.autograd.grad(loss, head.weight)[0]
    expected_loss = step(F.cross_entropy)
    expected = torch.autograd.grad(expected_loss, head.weight)[0]
    assert loss.dtype == expected_loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
def test_torch_compile_with_dynamic_shapes(backend, grad_mode):
    """Symbolic sizes and strides (dynamic=True; a changing class count recompiles with them by default): the layout
    checks of the in-place mode compare them without sorting, which Dynamo cannot trace over symbols."""
    torch._dynamo.reset()  # the same lambda in each case: start below the recompile limit
    step = torch.compile(lambda x, t: fused_xent.cross_entropy(x * 2, t, grad_mode=grad_mode, backend=backend),
                         fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((4, 7), (6, 9), (2, 11, 3), (3, 5, 4)):
        g = torch.Generator().manual_seed(shape[1])
        leaf = make_logits(shape, "contiguous", torch.float32, generator=g).requires_grad_(True)
        target = make_class_target(shape[:1] + shape[2:], shape[1], generator=g)
        step(leaf, target).backward()
        (expected,) = torch.autograd.grad(F.cross_entropy(leaf * 2, target), leaf)
        torch.testing.assert_close(leaf.grad, expected, msg=str(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_upstream_gradients(backend, grad_mode, reduction):
    """autograd.grad(is_grads_batched=True), as jacobian(vectorize=True) uses it: the upstream gradient differs per
    batch entry, so no mode may read it as one value."""
    g = torch.Generator().manual_seed(2)
    leaf = make_logits((4, 5), "contiguous", torch.float32, generator=g).requires_grad_(True)
    target = make_class_target((4,), 5, generator=g)
    grad_outputs = torch.rand((3,) if reduction == "mean" else (3, 4), generator=g) + 0.5
    loss = fused_xent.cross_entropy(leaf * 1, target, reduction=reduction, backend=backend, grad_mode=grad_mode)
    (got,) = torch.autograd.grad(loss, leaf, grad_outputs, is_grads_batched=True)
    (expected,) = torch.autograd.grad(F.cross_entropy(leaf, target, reduction=reduction), leaf, grad_outputs,
                                      is_grads_batched=True)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_make_fx_traces_loss_and_gradient(backend, grad_mode, tracing_mode):
    """Tracing outside torch.compile (make_fx, as AOTAutograd and memory estimators trace): the backward's test of
    the upstream gradient may not read it, which is a proxy, over real tensors or fake ones (which have no values
    for the value checks either). The traced graph, run on real tensors, gives PyTorch's loss and gradient."""
    g = torch.Generator().manual_seed(5)
    logits = make_logits((6, 5), "contiguous", torch.float32, generator=g)
    target = make_class_target((6,), 5, generator=g)
    target[1] = -100
    weight = torch.rand(5, generator=g) + 0.5
    grad_loss = torch.rand((), generator=g) + 0.5

    def loss_and_grad(loss_fn, x, t, w, upstream):
        x = x.detach().requires_grad_(True)
        loss = loss_fn(x * 1, t, w, label_smoothing=0.1)
        return loss, torch.autograd.grad(loss, x, upstream)[0]

    def fused(x, t, w, **kwargs):
        return fused_xent.cross_entropy(x, t, w, backend=backend, grad_mode=grad_mode, **kwargs)

    graph = make_fx(lambda *args: loss_and_grad(fused, *args), tracing_mode=tracing_mode)(
        logits, target, weight, grad_loss)
    got = graph(logits, target, weight, grad_loss)
    expected = loss_and_grad(F.cross_entropy, logits, target, weight, grad_loss)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_under_fake_tensor_mode(backend):
    """FakeTensorMode (shape and memory estimation): shapes and dtypes of PyTorch's loss, weights and checks on."""
    with FakeTensorMode():
        logits, weight = torch.empty(4, 5, 3), torch.empty(5)
        target = torch.zeros(4, 3, dtype=torch.long)
        for reduction in ("none", "mean"):
            got = fused_xent.cross_entropy(logits, target, weight, reduction=reduction, backend=backend)
            expected = F.cross_entropy(logits, target, weight, reduction=reduction)
            assert (got.shape, got.dtype) == (expected.shape, expected.dtype)
