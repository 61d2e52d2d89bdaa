"""grad_mode="in_forward" and "inplace": the same gradients, and in-place writes that autograd can see."""

import contextlib
import dataclasses
import itertools

import pytest
import torch
from helpers import (
    assert_close,
    assert_grad_close,
    backends_for,
    differentiable_copy,
    make_class_target,
    make_logits,
    make_prob_target,
    torch_reference,
)

import fused_xent
from fused_xent import _backends

BACKENDS = backends_for("cpu")
SHAPES = [
    ((6, 11), "contiguous"), ((3, 423), "contiguous"), ((2, 5, 4, 3), "contiguous"), ((2, 5, 4, 3), "channels_last"),
    ((6, 10), "transposed"), ((5, 12), "sliced"),  # copied by the ops: inplace writes the gradient back
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["in_forward", "inplace"])
@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_gradient_as_recompute(backend, grad_mode, shape, layout, dtype):
    g = torch.Generator().manual_seed(3)
    cases = itertools.product(["index", "prob"], [False, True], [0.0, 0.2], ["none", "mean", "sum"])
    for kind, weighted, smoothing, reduction in cases:
        logits = make_logits(shape, layout, dtype, generator=g)
        if kind == "prob":
            target = make_prob_target(logits, generator=g)
        else:
            target = make_class_target(shape[:1] + shape[2:], shape[1], ignore_index=-100, generator=g)
        weight = (torch.rand(shape[1], generator=g) + 0.5).to(dtype) if weighted else None
        kwargs = {"weight": weight, "label_smoothing": smoothing, "reduction": reduction}
        grad_output = torch.rand(() if reduction != "none" else target.shape[:1] + shape[2:], generator=g) + 0.5
        grad_output = grad_output.to(dtype)
        expected_loss, expected_grad = torch_reference(logits, target, grad_output, **kwargs)

        leaf, x, logits_grad = differentiable_copy(logits, grad_mode)
        loss = fused_xent.cross_entropy(x, target, backend=backend, grad_mode=grad_mode, **kwargs)
        grad = logits_grad(torch.autograd.grad(loss, leaf, grad_output)[0])
        what = f"{kind} {kwargs}"
        assert_close(loss, expected_loss, dtype, f"loss {what}")
        assert_grad_close(grad, expected_grad, dtype, f"grad {what}")
        if grad_mode == "inplace":  # the logits now hold the gradient for a unit upstream gradient
            assert not torch.equal(x.detach(), logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ignored_rows_stay_zero_under_a_non_finite_upstream_gradient(backend, grad_mode, reduction):
    """An overflowed loss scale (inf or NaN upstream): PyTorch sends nothing into an ignored row, so it stays 0;
    the gradient made in the forward must not become 0 * inf = NaN there."""
    g = torch.Generator().manual_seed(5)
    x = make_logits((6, 9, 4), "contiguous", torch.float32, generator=g)
    target = make_class_target((6, 4), 9, generator=g)
    target[::2, 1:] = -100
    for bad in (float("inf"), float("nan")):
        grad_output = torch.full((6, 4) if reduction == "none" else (), bad)
        xx = x.clone().requires_grad_(True)
        logits = xx * 1 if grad_mode == "inplace" else xx
        loss = fused_xent.cross_entropy(logits, target, reduction=reduction, backend=backend, grad_mode=grad_mode)
        (grad,) = torch.autograd.grad(loss, xx, grad_output)
        assert grad.permute(0, 2, 1)[target == -100].eq(0).all(), (bad, grad)
        assert not grad.permute(0, 2, 1)[target != -100].isfinite().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_upstream_gradient_is_returned_without_a_copy(backend):
    leaf = make_logits((8, 33), "contiguous", torch.float32).requires_grad_(True)
    target = make_class_target((8,), 33)
    expected = torch_reference(leaf, target, torch.ones(()))[1]
    logits = leaf.clone()  # the output of an op, as the logits of a model are
    fused_xent.cross_entropy(logits, target, backend=backend, grad_mode="inplace").backward()
    assert_grad_close(leaf.grad, expected, torch.float32, "grad")
    assert leaf.grad.data_ptr() == logits.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["in_forward", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_scales_the_gradient_made_in_forward_in_place(backend, grad_mode, reduction):
    """The backward hands autograd the forward's buffer, scaled in place: for the unit upstream gradient of
    loss.backward(), and for any other (a loss divided by the accumulation steps), without a second gradient-sized
    buffer. inplace's buffer is the logits' memory; in_forward's is the one its forward op made."""
    g = torch.Generator().manual_seed(8)
    leaf = make_logits((6, 40), "contiguous", torch.float32, generator=g).requires_grad_(True)
    target = make_class_target((6,), 40, ignore_index=-100, generator=g)
    buffers = []
    ops = _backends.backend_ops(backend)
    fwd_grad = ops.fwd_grad

    def recording_fwd_grad(*args):
        loss, grad = fwd_grad(*args)
        buffers.append(grad)
        return loss, grad

    for grad_output in (torch.ones(()), torch.tensor(0.25), torch.rand(6, generator=g)):
        if (grad_output.dim() == 0) != (reduction == "mean"):
            continue
        expected = torch_reference(leaf, target, grad_output, reduction=reduction)[1]
        logits = leaf.clone()  # clone's backward passes the gradient on as it is
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(_backends._AVAILABLE_BACKENDS, backend, dataclasses.replace(ops, fwd_grad=recording_fwd_grad))
            loss = fused_xent.cross_entropy(logits, target, reduction=reduction, backend=backend, grad_mode=grad_mode)
        leaf.grad = None
        loss.backward(grad_output)
        assert_grad_close(leaf.grad, expected, torch.float32, f"grad for {grad_output}")
        handed_out = logits if grad_mode == "inplace" else buffers[-1]
        assert leaf.grad.data_ptr() == handed_out.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["in_forward", "inplace"])
@pytest.mark.parametrize("hooks", ["none", "save_on_cpu", "identity"])
def test_second_backward_over_the_graph_is_refused(backend, grad_mode, hooks):
    """The first backward scaled the buffer in place and handed it out: a second backward over the same graph would
    scale it again (or read a gradient accumulated into it), and says what to use instead. Also under saved-tensor
    hooks, which bypass autograd's version check of saved tensors."""
    x = make_logits((5, 9), "contiguous", torch.float32).requires_grad_(True)
    target = make_class_target((5,), 9)
    upstream = torch.tensor(0.5)
    expected = torch_reference(x, target, upstream)[1]
    hook_contexts = {
        "none": contextlib.nullcontext,
        "save_on_cpu": torch.autograd.graph.save_on_cpu,
        "identity": lambda: torch.autograd.graph.saved_tensors_hooks(lambda saved: saved, lambda saved: saved),
    }
    for retain_graph in (True, False):  # the refused backward's own retain_graph
        x.grad = None
        with hook_contexts[hooks]():
            loss = fused_xent.cross_entropy(x.clone(), target, backend=backend, grad_mode=grad_mode)
        loss.backward(upstream, retain_graph=True)
        assert_grad_close(x.grad, expected, torch.float32, "first backward")
        with pytest.raises(RuntimeError, match="runs backward once.*retain_graph=True.*grad_mode='recompute'"):
            loss.backward(upstream, retain_graph=retain_graph)
        assert_grad_close(x.grad, expected, torch.float32, "left by the refused backward")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_moves_version_counter(backend):
    """Another op that saved the logits must fail in backward, not silently read gradients (Liger-Kernel #272)."""
    hidden = torch.randn(6, 8, requires_grad=True)
    head = torch.randn(8, 10, requires_grad=True)
    logits = hidden @ head
    other_use = (logits * logits).sum()  # mul saves logits for its backward
    version = logits._version
    loss = fused_xent.cross_entropy(logits, torch.randint(0, 10, (6,)), backend=backend, grad_mode="inplace")
    assert logits._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other_use).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_through_linear_head(backend):
    """The intended use: logits from an LM head, used by nothing else, trained in place."""
    torch.manual_seed(0)
    hidden, target = torch.randn(12, 16), torch.randint(0, 50, (12,))
    head = torch.nn.Linear(16, 50)
    reference = torch.nn.Linear(16, 50)
    reference.load_state_dict(head.state_dict())
    fused_xent.cross_entropy(head(hidden), target, backend=backend, grad_mode="inplace").backward()
    torch.nn.functional.cross_entropy(reference(hidden), target).backward()
    torch.testing.assert_close(head.weight.grad, reference.weight.grad)
    torch.testing.assert_close(head.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_empty_logits(backend):
    """No positions: nothing to write, and the strides of an empty tensor may tie without any overlap."""
    for shape in ((4, 5, 0), (2, 5, 0, 3), (0, 5)):
        logits = torch.randn(shape, requires_grad=True) * 1
        target = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
        loss = fused_xent.cross_entropy(logits, target, reduction="sum", backend=backend, grad_mode="inplace")
        assert loss.item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_a_view_of_model_output(backend):
    """(N, T, V) logits passed as the (N, V, T) view the loss wants: written through the view, differentiated with
    respect to the tensor it views (README: after the overwrite the view refers to its new values)."""
    g = torch.Generator().manual_seed(4)
    hidden, head = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g)
    target = make_class_target((2, 3), 10, generator=g)
    head.requires_grad_(True)
    outputs = [hidden @ head.T for _ in range(2)]  # (N * T, V)
    loss = fused_xent.cross_entropy(outputs[0].view(2, 3, 10).transpose(1, 2), target, backend=backend,
                                    grad_mode="inplace")
    expected = torch.nn.functional.cross_entropy(outputs[1].view(2, 3, 10).transpose(1, 2), target)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, outputs[0])[0], torch.autograd.grad(expected, outputs[1])[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_views(backend):
    """A strided view is written through; logits whose positions cannot be flattened without a copy are refused."""
    wide = torch.randn(4, 10, requires_grad=True) * 1  # logits of some layer
    sliced = wide[:, ::2]
    target = torch.randint(0, 5, (4,))
    expected = torch_reference(sliced, target, torch.ones(()))[1]
    fused_xent.cross_entropy(sliced, target, backend=backend, grad_mode="inplace")
    assert_grad_close(wide.detach()[:, ::2], expected, torch.float32, "gradient written through the view")
    transposed = (torch.randn(2, 3, 4, 5, requires_grad=True) * 1).transpose(2, 3)
    with pytest.raises(ValueError, match=r"without a copy.*input.contiguous\(\)"):
        fused_xent.cross_entropy(transposed, torch.randint(0, 3, (2, 5, 4)), backend=backend, grad_mode="inplace")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["in_forward", "inplace"])
def test_no_gradient_wanted_leaves_the_logits_alone(backend, grad_mode):
    """Evaluation with a loss built for training (no_grad, inference_mode, logits that need no gradient): the loss
    only, no gradient written anywhere."""
    target = make_class_target((6,), 11)
    logits = make_logits((6, 11), "contiguous", torch.float32)
    expected = torch.nn.functional.cross_entropy(logits, target)
    for context in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        x = logits.clone()
        with context():
            loss = fused_xent.cross_entropy(x, target, backend=backend, grad_mode=grad_mode)
        assert_close(loss, expected, torch.float32, str(context))
        assert torch.equal(x, logits), context


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["in_forward", "inplace"])
def test_target_or_weight_that_requires_grad_is_refused_before_the_forward(backend, grad_mode):
    """These modes give no gradient for probability targets or their weights: the call says so, and leaves the
    logits as they were (an inplace forward would otherwise have written the gradient over them before the backward
    could refuse)."""
    logits = make_logits((6, 11), "contiguous", torch.float32).requires_grad_(True)
    target = make_prob_target(logits.detach())
    weight = torch.rand(11) + 0.5
    for requires in ("target", "weight"):
        x = logits.clone()
        t = target.clone().requires_grad_(requires == "target")
        w = weight.clone().requires_grad_(requires == "weight")
        with pytest.raises(fused_xent.InvalidArgumentError, match="use grad_mode='recompute'"):
            fused_xent.cross_entropy(x, t, weight=w, backend=backend, grad_mode=grad_mode)
        assert torch.equal(x, logits), requires


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_leaves_and_overlapping_logits(backend):
    """A leaf that requires grad (a Parameter, or any tensor an optimizer may hold) or a view of one is refused, as
    PyTorch refuses in-place ops on it: its .grad would be the tensor itself, and an optimizer would step from that."""
    target = make_class_target((4,), 5)
    parameter = torch.nn.Parameter(torch.randn(4, 5))
    leaf = torch.randn(4, 5, requires_grad=True)
    view_made_a_leaf = torch.randn(4, 5)[:].requires_grad_(True)
    no_classes = torch.randn(4, 0, requires_grad=True)
    for logits in (parameter, parameter.view(4, 5), parameter[:], leaf, leaf[:, :], view_made_a_leaf,
                   view_made_a_leaf[:, :], no_classes):
        before = logits.detach().clone()
        with pytest.raises(ValueError, match="over a leaf tensor that requires grad"):
            fused_xent.cross_entropy(logits, target, backend=backend, grad_mode="inplace")
        assert torch.equal(logits.detach(), before)
    buffer = torch.randn(20, requires_grad=True)
    overlapping = (buffer * 1).as_strided((4, 5), (2, 1))
    expanded = (torch.randn(1, 5, requires_grad=True) * 1).expand(4, 5)
    for logits in (overlapping, expanded):
        with pytest.raises(ValueError, match=r"overlap here.*input.clone\(\)"):
            fused_xent.cross_entropy(logits, target, backend=backend, grad_mode="inplace")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_writes_through_a_view_with_a_size_one_dim(backend):
    """A size-1 spatial dim's stride says nothing about the layout (a slice keeps its parent's), so a view that ends
    in one, e.g. (N, C, H, 1) of strides (60, 20, 5, 1), still flattens to (N, C, S) without a copy: inplace writes
    its gradient there and hands it to the tensor it views."""
    g = torch.Generator().manual_seed(13)
    values = torch.randn(2, 3, 4, 5, generator=g)
    leaf, reference = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    target = make_class_target((2, 4, 1), 3, generator=g)
    loss = fused_xent.cross_entropy((leaf * 1)[..., :1], target, backend=backend, grad_mode="inplace")
    expected = torch.nn.functional.cross_entropy(reference[..., :1], target)
    assert_close(loss, expected, torch.float32, "loss")
    expected.backward()
    assert_grad_close(torch.autograd.grad(loss, leaf)[0], reference.grad, torch.float32, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_logits_promoted_by_the_weight(backend):
    """The loss of float32 logits with a float64 weight is computed in float64 (PyTorch's promotion), in a copy that
    the gradient cannot be written through: the refusal names the dtypes and the weight, not only the target."""
    logits = make_logits((4, 5), "contiguous", torch.float32).requires_grad_(True) * 1
    target = make_prob_target(logits.detach())
    with pytest.raises(ValueError, match=r"computed in torch.float64.*target and weight.*target.to\(torch.float32\)"):
        fused_xent.cross_entropy(logits, target, torch.rand(5, dtype=torch.float64), backend=backend,
                                 grad_mode="inplace")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("modified", ["logits", "target"])
def test_tensors_modified_before_backward_are_named(backend, grad_mode, modified):
    """recompute reads the logits and target again in backward (PyTorch saves its log-probabilities instead), and
    the other modes keep the target and their gradient (inplace: over the logits): an in-place edit of one of these
    in between is refused in the user's terms, not in those of the kernels' (N, C, S) view."""
    if grad_mode == "in_forward" and modified == "logits":
        pytest.skip("in_forward does not read the logits again")
    logits = make_logits((4, 5), "contiguous", torch.float32).requires_grad_(True) * 1
    target = make_class_target((4,), 5)
    loss = fused_xent.cross_entropy(logits, target, backend=backend, grad_mode=grad_mode)
    with torch.no_grad():
        (logits if modified == "logits" else target).mul_(1)
    expected = "reads them again in backward" if grad_mode == "recompute" else "modified in place before backward"
    with pytest.raises(RuntimeError, match=expected):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_views_that_autograd_cannot_rebase(backend):
    """Views that PyTorch's in-place ops refuse to write through are refused at the call, before anything is
    written (not in backward, after the logits were overwritten); in_forward takes them."""

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad

    target = make_class_target((4,), 5)
    model_output = torch.randn(8, 5, requires_grad=True) * 2
    with torch.no_grad():
        made_without_grad = model_output[:4]
    views = {"chunk": model_output.chunk(2)[0], "split": model_output.split(4)[1],
             "unbind": model_output.view(2, 4, 5).unbind()[1], "no_grad": made_without_grad,
             "custom Function": Identity.apply(model_output[4:])}
    for name, logits in views.items():
        before = model_output.detach().clone()
        with pytest.raises(ValueError, match="views returned by one op"):
            fused_xent.cross_entropy(logits, target, backend=backend, grad_mode="inplace")
        assert torch.equal(model_output.detach(), before), name
        loss = fused_xent.cross_entropy(logits, target, backend=backend, grad_mode="in_forward")
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_inplace_leaves_logits_saved_by_another_op_intact(backend, compiler):
    """Inside a compiled graph no version counter moves, so an op that saved the logits (a z-loss's logsumexp)
    could not notice their overwrite: there inplace writes a new buffer, and the gradients are PyTorch's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(8)
    hidden, head = torch.randn(6, 4, generator=g), torch.randn(4, 7, generator=g)
    target = make_class_target((6,), 7, generator=g)

    def step(loss_fn, head):
        logits = torch.tanh(hidden @ head) * 3  # tanh saves its output, which the logits are a function of
        return loss_fn(logits, target) + 0.1 * torch.logsumexp(logits, -1).pow(2).mean()

    expected_head = head.clone().requires_grad_(True)
    step(torch.nn.functional.cross_entropy, expected_head).backward()
    got_head = head.clone().requires_grad_(True)
    fused_loss = lambda x, t: fused_xent.cross_entropy(x, t, backend=backend, grad_mode="inplace")  # noqa: E731
    torch.compile(lambda h: step(fused_loss, h), fullgraph=True, backend=compiler)(got_head).backward()
    torch.testing.assert_close(got_head.grad, expected_head.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_a_weight_or_target_in_the_logits_memory(backend):
    """The inplace forward writes the gradient over the logits while later rows still read the weight and the
    target: one that lives in the logits' memory would be read overwritten (a wrong loss, silently). Refused by the
    front end, also for memory reached through another storage (a NumPy view), and by the in-place ops themselves
    for a call the front end does not see; the logits are left as they were. A weight in the same buffer, outside
    the logits' range, is accepted."""
    torch.manual_seed(12)
    buffer = torch.randn(302, 300, requires_grad=True) * 1
    logits = buffer[:300]
    numpy_view = torch.from_numpy(buffer.detach().numpy()[1])
    cases = [
        ("weight", dict(target=make_class_target((300,), 300), weight=buffer[0].detach())),
        ("target", dict(target=buffer[1:301].detach(), reduction="sum")),
        ("weight", dict(target=make_class_target((300,), 300), weight=numpy_view)),
    ]
    for name, arguments in cases:
        before = logits.detach().clone()
        with pytest.raises(ValueError, match=f"still reads the {name}, whose memory range intersects theirs"):
            fused_xent.cross_entropy(logits, backend=backend, grad_mode="inplace", **arguments)
        assert torch.equal(logits.detach(), before)
        fused_xent.cross_entropy(logits, backend=backend, grad_mode="in_forward", **arguments)
    # Right after the logits' last element: adjacent, no element in common.
    apart = {"target": make_class_target((300,), 300), "weight": buffer.detach()[300]}
    fused_xent.cross_entropy(logits, backend=backend, grad_mode="inplace", **apart)
    # A weight that starts before the logits and runs into them, and one whose first element is their last.
    flat = buffer.detach().view(-1)
    straddling = (buffer[2:302], flat[2 * 300 - 150:2 * 300 + 150])
    sharing_the_last = (logits, flat[300 * 300 - 1:300 * 300 + 299])
    for these_logits, weight in (straddling, sharing_the_last):
        with pytest.raises(ValueError, match="still reads the weight, whose memory range intersects theirs"):
            fused_xent.cross_entropy(these_logits, make_class_target((300,), 300), weight=weight, backend=backend,
                                     grad_mode="inplace")

    if backend in ("cpu", "cuda"):  # the compiled ops check the overlap themselves
        op = _backends.backend_ops(backend).fwd_grad_
        x = logits.detach().unsqueeze(-1)
        for name, target, weight in [
            ("weight", make_class_target((300, 1), 300), buffer.detach()[0]),
            ("weight", make_class_target((300, 1), 300), numpy_view),
            ("target", buffer.detach()[1:301].unsqueeze(-1), None),
        ]:
            before = x.clone()
            with pytest.raises(ValueError, match=f"the {name}'s memory range intersects theirs"):
                op(x, target, weight, 1, -100, 0.1)
            assert torch.equal(x, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_saves_the_logits_as_the_kernels_read_them(backend):
    """Logits the kernels cannot read as they are (a column-major (N, C), a view with gaps) are copied once, in the
    forward, and the recompute backward reads that copy instead of copying them again; the gradient still reaches
    the tensor they view."""
    g = torch.Generator().manual_seed(6)
    views = {"column-major": lambda t: t.t(), "with gaps": lambda t: t[:, ::2]}
    for name, view in views.items():
        values = torch.randn(64, 100, generator=g)
        leaf, reference = values.clone().requires_grad_(), values.clone().requires_grad_()
        logits = view(leaf * 1)  # an op's output, viewed
        target = make_class_target(logits.shape[:1], logits.shape[1], generator=g)
        loss = fused_xent.cross_entropy(logits, target, backend=backend)
        saved = loss.grad_fn.saved_tensors[0]
        assert saved.is_contiguous(), (name, logits.stride(), saved.stride())
        expected = torch.nn.functional.cross_entropy(view(reference), target)
        assert_close(loss, expected, torch.float32, f"loss {name}")
        expected.backward()
        assert_grad_close(torch.autograd.grad(loss, leaf)[0], reference.grad, torch.float32, f"gradient {name}")
