"""Bad input gets a clear Python exception that names the problem and the fix, on every backend."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import backend_cases, backends_for, devices

import fused_xent
from fused_xent import _backends
from fused_xent._value_check import ValueCheck

BACKENDS = backends_for("cpu")
BACKEND_CASES = backend_cases()
BAD = (ValueError, RuntimeError, IndexError, TypeError)


def _logits(*shape):
    return torch.randn(*shape)


CASES = [
    # (description, input, target, kwargs, expected message fragment)
    ("segmentation target with a class dim of 1", _logits(2, 3, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long), {},
     "target.squeeze(1)"),
    ("spatial target for row logits", _logits(2, 3), torch.zeros(2, 4, 4, dtype=torch.long), {},
     "class indices need shape (2,)"),
    ("probability target with a different class count", _logits(2, 3, 4), torch.rand(2, 5, 4), {},
     "class probabilities and must have the input's shape"),
    ("float target meant as indices", _logits(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0]), {}, "use target.long()"),
    ("int32 class indices", _logits(4, 3), torch.tensor([0, 1, 2, 1], dtype=torch.int32), {}, "int64"),
    ("integer logits", torch.randint(0, 5, (4, 3)), torch.tensor([0, 1, 2, 1]), {}, "must be float32"),
    ("float8 logits", _logits(4, 3).to(torch.float8_e4m3fn), torch.tensor([0, 1, 2, 1]), {}, "input.float()"),
    ("float ignore_index", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": 1.5}, "must be an int"),
    ("bool ignore_index", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": np.True_}, "must be an int"),
    ("Python bool ignore_index", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": True},
     "must be an int"),
    ("float array ignore_index", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": np.array(1.0)},
     "must be an int"),
    ("ignore_index beyond int64", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"ignore_index": 2**63},
     "must fit in int64"),
    ("index too large", _logits(4, 3), torch.tensor([0, 1, 3, 1]), {}, "out of range"),
    ("negative index", _logits(4, 3), torch.tensor([0, -2, 2, 1]), {}, "out of range"),
    ("weight of the wrong length", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(4)},
     "one entry per class (3)"),
    ("(1, C) weight without spatial dims", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(1, 3)},
     "1-D tensor with one entry per class (3)"),
    ("(1, C) weight with probability targets", _logits(4, 3, 2), torch.rand(4, 3, 2), {"weight": torch.ones(1, 3)},
     "1-D tensor with one entry per class (3)"),
    ("token logits with the classes last", _logits(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), {},
     "pass input.flatten(0, -2) with target.flatten() (rows of classes), or input.movedim(-1, 1)"),
    ("spatial weight of the wrong length", _logits(4, 3, 2), torch.zeros(4, 2, dtype=torch.long),
     {"weight": torch.ones(1, 4)}, "one entry per class (3)"),
    ("half weight with float logits", _logits(4, 3), torch.tensor([0, 1, 2, 1]),
     {"weight": torch.ones(3, dtype=torch.half)}, "weight.to(input.dtype)"),
    ("ignore_index with probability targets", _logits(4, 3), torch.rand(4, 3), {"ignore_index": 1},
     "not supported with class-probability targets"),
    ("ignore_index 0 with probability targets", _logits(4, 3), torch.rand(4, 3), {"ignore_index": 0},
     "not supported with class-probability targets"),
    ("label_smoothing above 1", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"label_smoothing": 1.5}, "[0.0, 1.0]"),
    ("negative label_smoothing", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"label_smoothing": -0.1},
     "[0.0, 1.0]"),
    ("unknown reduction", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"reduction": "avg"}, "'none', 'mean' or 'sum'"),
    ("reduction in a list", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"reduction": ["mean"]}, "got ['mean']"),
    ("0-d logits", torch.tensor(1.0), torch.tensor(0), {}, "class dimension"),
    ("unbatched logits with a batched target", _logits(5), torch.tensor([1, 2]), {}, "0-d class-index target"),
    ("NaN in weights", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.tensor([1.0, float("nan"), 1.0])},
     "weight contains NaN (first at class 1)"),
    ("unknown grad_mode", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"grad_mode": "fast"}, "grad_mode"),
    ("sparse logits", _logits(4, 3).to_sparse(), torch.tensor([0, 1, 2, 1]), {}, "input.to_dense()"),
    ("sparse probability target", _logits(4, 3), torch.rand(4, 3).to_sparse(), {}, "target.to_dense()"),
    ("sparse weight", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(3).to_sparse()},
     "weight.to_dense()"),
    ("complex weight with probability targets", _logits(4, 3), torch.rand(4, 3),
     {"weight": torch.ones(3, dtype=torch.complex64)}, "weight must be real"),
    ("label_smoothing that requires grad", _logits(4, 3), torch.tensor([0, 1, 2, 1]),
     {"label_smoothing": torch.tensor(0.1, requires_grad=True)}, "pass float(label_smoothing)"),
    ("empty backend name", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"backend": ""}, "unknown backend ''"),
]


def _on(device, kwargs):
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_explained(device, backend, case):
    _, input, target, kwargs, fragment = case
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(BAD) as info:
        fused_xent.cross_entropy(input.to(device), target.to(device), **_on(device, kwargs))
    assert fragment in str(info.value)
    if device == "cuda":
        torch.cuda.synchronize()  # no device-side assert is pending


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_code_that_catches_pytorchs_exception_catches_ours(case):
    """Where PyTorch raises, fused_xent raises an instance of PyTorch's exception type (argument errors are both
    ValueError and RuntimeError; NotImplementedError, which PyTorch raises for unsupported dtypes and layouts, is
    caught as its base RuntimeError)."""
    _, input, target, kwargs, _ = case
    if "backend" in kwargs or "grad_mode" in kwargs:
        pytest.skip("an argument PyTorch does not have")
    try:
        torch.nn.functional.cross_entropy(input, target, **kwargs)
    except Exception as error:  # noqa: BLE001 - whatever PyTorch raises is the type to match
        expected = RuntimeError if isinstance(error, NotImplementedError) else type(error)
    else:
        pytest.skip("PyTorch accepts this input")
    with pytest.raises(expected):
        fused_xent.cross_entropy(input, target, **kwargs)


def test_argument_errors_are_value_and_runtime_errors():
    with pytest.raises(fused_xent.InvalidArgumentError) as info:
        fused_xent.cross_entropy(_logits(2, 3), torch.zeros(2, 1, dtype=torch.long))
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert type(info.value).__module__ == "fused_xent"


WRONG_TYPES = [
    ("label_smoothing as a string", {"label_smoothing": "0.1"}),
    ("label_smoothing None", {"label_smoothing": None}),
    ("label_smoothing as a 1-element tensor", {"label_smoothing": torch.tensor([0.3])}),
    ("label_smoothing as a numpy array", {"label_smoothing": np.array(0.3)}),
    ("weight as a list", {"weight": [1.0, 2.0, 3.0]}),
    ("target as a list", {"target": [0, 1, 2, 1]}),
    ("input as a list", {"input": _logits(4, 3).tolist()}),
]


@pytest.mark.parametrize("case", WRONG_TYPES, ids=[c[0] for c in WRONG_TYPES])
def test_arguments_of_the_wrong_type_raise_type_error_as_in_pytorch(case):
    """Code that catches PyTorch's TypeError for an argument of the wrong type catches ours too."""
    arguments = {"input": _logits(4, 3), "target": torch.tensor([0, 1, 2, 1]), **case[1]}
    with pytest.raises(TypeError):
        torch.nn.functional.cross_entropy(**arguments)
    with pytest.raises(TypeError, match="fused_xent.cross_entropy: "):
        fused_xent.cross_entropy(**arguments)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_out_of_range_with_ignore_index_is_accepted(device, backend):
    """A value equal to ignore_index is never out of range, even when negative or >= C: it is ignored, loss and
    gradient as PyTorch's."""
    for ignore, reduction in itertools.product((-100, -1, 7), ("mean", "none")):
        x, t = _logits(3, 4), torch.tensor([0, ignore, 3])
        theirs, ours = x.clone().requires_grad_(), x.to(device).requires_grad_()
        loss = fused_xent.cross_entropy(ours, t.to(device), ignore_index=ignore, reduction=reduction, backend=backend)
        expected = F.cross_entropy(theirs, t, ignore_index=ignore, reduction=reduction)
        torch.testing.assert_close(loss.cpu(), expected)
        (grad,), (expected_grad,) = torch.autograd.grad(loss.sum(), ours), torch.autograd.grad(expected.sum(), theirs)
        torch.testing.assert_close(grad.cpu(), expected_grad)
        assert grad[1].eq(0).all()


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        fused_xent.cross_entropy(_logits(2, 3), torch.tensor([0, 1]), backend="tpu")


def test_backend_on_the_wrong_device():
    if "cuda" in fused_xent.available_backends():
        with pytest.raises(RuntimeError, match="runs on cuda tensors"):
            fused_xent.cross_entropy(_logits(2, 3), torch.tensor([0, 1]), backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="not available"):
            fused_xent.cross_entropy(_logits(2, 3), torch.tensor([0, 1]), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_devices(backend):
    """Tensors on different devices (the meta device stands in for a GPU here)."""
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match=f"target is on {other}.* but input is on cpu"):
        fused_xent.cross_entropy(_logits(2, 3), torch.tensor([0, 1], device=other), backend=backend)
    with pytest.raises(ValueError, match=f"weight is on {other}.* but input is on cpu"):
        fused_xent.cross_entropy(_logits(2, 3), torch.tensor([0, 1]), weight=torch.ones(3, device=other),
                                 backend=backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("setting", ["0", "off", " False"])
def test_value_checks_can_be_switched_off(device, backend, setting, monkeypatch):
    """FUSED_XENT_CHECK_VALUES=0 skips the NaN-weight scan: the loss is NaN, as PyTorch's."""
    monkeypatch.setenv("FUSED_XENT_CHECK_VALUES", setting)
    weight = torch.tensor([1.0, float("nan"), 1.0], device=device)
    assert torch.isnan(fused_xent.cross_entropy(_logits(4, 3).to(device), torch.tensor([0, 1, 2, 1], device=device),
                                                weight=weight, backend=backend))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_out_of_range_target_raises_in_every_grad_mode(device, backend, grad_mode, reduction):
    """Wherever the check is read (after the kernels are queued, or before an inplace forward writes over the
    logits), the call raises, and the logits are left as they were."""
    logits = (_logits(5, 4).to(device).requires_grad_(True) * 1)  # an op's output: what inplace may write over
    before = logits.detach().clone()
    target = torch.tensor([0, 3, 4, -100, 1], device=device)
    with pytest.raises(IndexError, match="target 4 at position 2 is out of range for 4 classes"):
        fused_xent.cross_entropy(logits, target, reduction=reduction, backend=backend, grad_mode=grad_mode)
    assert torch.equal(logits.detach(), before)


def _stand_in_for_a_safe_backend(monkeypatch, calls):
    """The PyTorch ops as a backend whose kernels meet bad class indices safely (as cuda's and triton's do, which
    this machine may lack): out-of-range targets are handed to them as ignore_index. Each forward call is logged in
    `calls`, and so is each reading of the value check's verdict."""
    reference = _backends.backend_ops("torch")

    def logged(op):
        def call(logits, target, weight, reduction, ignore_index, *rest):
            calls.append("fwd")
            safe = target.masked_fill((target < 0) | (target >= logits.shape[1]), ignore_index)
            return op(logits, safe, weight, reduction, ignore_index, *rest)
        return call

    stand_in = dataclasses.replace(reference, fwd=logged(reference.fwd), fwd_grad=logged(reference.fwd_grad),
                                   fwd_grad_=logged(reference.fwd_grad_), bad_targets_are_nan=True)
    monkeypatch.setattr(_backends, "resolve", lambda backend, device: stand_in)
    monkeypatch.setattr(_backends, "backend_ops", lambda name: stand_in)
    read_verdict = ValueCheck.raise_if_failed
    monkeypatch.setattr(ValueCheck, "raise_if_failed", lambda check: (calls.append("verdict"), read_verdict(check)))


@pytest.mark.parametrize("grad_mode,order", [("recompute", ["fwd", "verdict"]), ("in_forward", ["fwd", "verdict"]),
                                             ("inplace", ["verdict", "fwd"])])
def test_the_value_check_is_read_after_the_kernels_are_queued(monkeypatch, grad_mode, order):
    """For backends whose kernels meet bad class indices safely (cuda, triton), the front end reads the check's
    verdict after it calls the forward op (on a GPU the host then waits on the check while the kernels run), except
    before an inplace forward, which writes over the logits."""
    calls = []
    _stand_in_for_a_safe_backend(monkeypatch, calls)
    logits = _logits(6, 5).requires_grad_(True) * 1
    fused_xent.cross_entropy(logits, torch.tensor([0, 1, 4, 2, 3, 0]), grad_mode=grad_mode)
    assert calls == order


@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_verdict_read_after_the_forward_still_refuses_the_call(monkeypatch, grad_mode, reduction):
    """A bad class index found after the forward ran raises all the same, leaves the logits as they were, and keeps
    nothing of the refused forward in the traceback (whose frames a notebook or a retry loop may hold on to: the
    autograd graph, and with in_forward a gradient the size of the logits)."""
    calls = []
    _stand_in_for_a_safe_backend(monkeypatch, calls)
    logits = _logits(5, 4).requires_grad_(True) * 1
    before = logits.detach().clone()
    target = torch.tensor([0, 3, 4, -100, 1])
    with pytest.raises(IndexError, match="target 4 at position 2 is out of range for 4 classes") as info:
        fused_xent.cross_entropy(logits, target, reduction=reduction, grad_mode=grad_mode)
    assert calls == (["verdict"] if grad_mode == "inplace" else ["fwd", "verdict"])
    assert torch.equal(logits.detach(), before)
    frames = [entry.frame for entry in info.traceback if entry.frame.code.name == "cross_entropy"]
    assert frames and all("loss" not in frame.f_locals for frame in frames)


def test_value_check_settings(monkeypatch):
    """Empty (as shells and CI leave a variable) and the usual words for on keep the checks; nonsense is refused."""
    nan_weight = torch.tensor([1.0, float("nan"), 1.0])
    for setting in ("", "1", "on", "YES"):
        monkeypatch.setenv("FUSED_XENT_CHECK_VALUES", setting)
        with pytest.raises(ValueError, match="weight contains NaN"):
            fused_xent.cross_entropy(_logits(4, 3), torch.tensor([0, 1, 2, 1]), weight=nan_weight)
    monkeypatch.setenv("FUSED_XENT_CHECK_VALUES", "sometimes")
    with pytest.raises(ValueError, match="FUSED_XENT_CHECK_VALUES='sometimes' is neither on"):
        fused_xent.cross_entropy(_logits(4, 3), torch.tensor([0, 1, 2, 1]))


def test_module_refuses_unknown_names_when_built():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        fused_xent.CrossEntropyLoss(backend="tpu")
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        fused_xent.CrossEntropyLoss(grad_mode="fast")


def test_the_autograd_function_refuses_unknown_names():
    """FusedCrossEntropyFunction is public: a misspelt mode must not fall through to one that writes over the
    logits, nor a misspelt backend to the reference."""
    logits = _logits(4, 3).requires_grad_(True) * 1
    before = logits.detach().clone()
    args = (torch.tensor([0, 1, 2, 1]).view(4, 1), None, 1, -100, 0.0)
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        fused_xent.FusedCrossEntropyFunction.apply(logits.view(4, 3, 1), *args, "cpu", "in-forward", torch.float32)
    assert torch.equal(logits.detach(), before)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fused_xent.FusedCrossEntropyFunction.apply(logits.view(4, 3, 1), *args, "gpu", "recompute", torch.float32)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_out_of_range_with_value_checks_off(device, backend, monkeypatch):
    """Without the front end's check the CPU kernel still raises (the bad class named at its index in the target, as
    with the check); every other backend gives the bad position a NaN loss and a NaN gradient row, never an indexing
    error, a device assert or a number."""
    monkeypatch.setenv("FUSED_XENT_CHECK_VALUES", "0")
    logits = _logits(4, 3).to(device).requires_grad_(True)
    target = torch.tensor([0, 3, 1, -100], device=device)
    if backend == "cpu":
        with pytest.raises(IndexError, match="target 3 at position 1 is out of range"):
            fused_xent.cross_entropy(logits, target, backend=backend)
        spatial_target = torch.zeros(2, 2, 3, dtype=torch.long)
        spatial_target[1, 0, 2] = 3
        with pytest.raises(IndexError, match=r"target 3 at position \(1, 0, 2\) is out of range"):
            fused_xent.cross_entropy(_logits(2, 3, 2, 3), spatial_target, backend=backend)
        return
    loss = fused_xent.cross_entropy(logits, target, reduction="none", label_smoothing=0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    bad = torch.tensor([False, True, False, False], device=device)
    assert loss[bad].isnan().all() and loss[~bad].isfinite().all()
    assert grad[bad].isnan().all() and grad[~bad].isfinite().all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_backend_says_the_same(case):
    """Word for word, including the CPU kernel's own class-index check."""
    _, input, target, kwargs, _ = case
    said = {}
    for backend in BACKENDS:
        with pytest.raises(BAD) as info:
            fused_xent.cross_entropy(input, target, **{"backend": backend, **kwargs})
        said[backend] = (type(info.value), str(info.value))
    assert len(set(said.values())) == 1, said


def _bad_class_cases():
    """(id, logits, target, kwargs, what is said): class indices out of range that only a backend's own check can
    find, in every layout it reads them from (the cases above fail in the shared front end, before any backend); the
    first one in the target's order is named, where the user indexes it."""
    g = torch.Generator().manual_seed(3)
    spatial = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    spatial_target = torch.randint(0, 3, (2, 4, 5), generator=g)
    spatial_target[1, 0, 0], spatial_target[0, 3, 4] = 7, -5
    rows_target = torch.randint(0, 5, (100000,), generator=g)
    rows_target[99990], rows_target[50001] = 9, 8
    vocab_target = torch.randint(0, 40, (6,), generator=g)
    vocab_target[2] = 40
    return [
        ("channels_last, two bad positions", spatial, spatial_target, {"reduction": "none"},
         "target -5 at position (0, 3, 4) is out of range for 3 classes"),
        ("100000 rows, weighted", torch.randn(100000, 5, generator=g), rows_target, {"weight": torch.ones(5)},
         "target 8 at position 50001 is out of range for 5 classes"),
        ("smoothed rows", torch.randn(6, 40, generator=g), vocab_target, {"label_smoothing": 0.1},
         "target 40 at position 2 is out of range for 40 classes"),
        ("unbatched", torch.randn(5, generator=g), torch.tensor(5), {}, "target 5 is out of range for 5 classes"),
    ]


BAD_CLASS_CASES = [pytest.param(device, *case[1:], id=f"{device}-{case[0]}",
                                marks=[pytest.mark.cuda] if device == "cuda" else [])
                   for device in devices() for case in _bad_class_cases()]


@pytest.mark.parametrize("device, logits, target, kwargs, expected", BAD_CLASS_CASES)
def test_every_backend_names_the_same_bad_class(device, logits, target, kwargs, expected):
    """The out-of-range class each backend finds with its own check, in the same words: the first in the target's
    order, its value, its index in the target and the fix."""
    kwargs = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    said = {}
    for backend in backends_for(device):
        with pytest.raises(IndexError) as info:
            fused_xent.cross_entropy(logits.to(device), target.to(device), backend=backend, **kwargs)
        said[backend] = str(info.value)
    assert len(set(said.values())) == 1, said
    assert expected in said[backend], said


@pytest.mark.filterwarnings("ignore:reduction='elementwise_mean' is deprecated")
@pytest.mark.parametrize("backend", BACKENDS)
def test_what_pytorch_accepts_is_accepted(backend):
    """Argument forms F.cross_entropy takes besides the usual ones, with its results."""
    x, t = _logits(3, 5), torch.tensor([1, 2, 3])
    forms = [
        ((_logits(5), torch.tensor([2])), {"reduction": "none"}),  # unbatched input, target of shape (1,)
        ((x, t), {"label_smoothing": torch.tensor(0.2)}),
        ((x, t), {"label_smoothing": np.float32(0.2)}),
        ((x, t), {"reduction": "elementwise_mean"}),
        ((x, t), {"ignore_index": torch.tensor(1)}),
        ((x, t), {"ignore_index": torch.tensor([2], dtype=torch.int32)}),
        ((x, t), {"ignore_index": np.int32(3)}),
        ((x, t), {"ignore_index": np.array(1)}),  # a 0-d integer array, as numpy indexing gives
    ]
    for args, kwargs in forms:
        expected = torch.nn.functional.cross_entropy(*args, **kwargs)
        got = fused_xent.cross_entropy(*args, backend=backend, **kwargs)
        assert got.shape == expected.shape, kwargs
        torch.testing.assert_close(got, expected, msg=str(kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_each_half_precision_argument(backend):
    """Under autocast PyTorch runs cross entropy in float32, casting each float16/bfloat16 tensor (a bfloat16 weight
    with float32 logits too) and leaving float64 alone, so that bfloat16 logits with a float64 weight still fail."""
    x, t, w = _logits(3, 5), torch.tensor([1, 2, 3]), torch.rand(5) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_xent.cross_entropy(x, t, weight=w.bfloat16(), backend=backend)
        expected = torch.nn.functional.cross_entropy(x, t, weight=w.bfloat16())
        assert got.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(got, expected)
        with pytest.raises(ValueError, match="weight dtype torch.float64 differs"):
            fused_xent.cross_entropy(x.bfloat16(), t, weight=w.double(), backend=backend)
