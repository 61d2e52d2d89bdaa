"""Bad input gets a clear Python exception that names the problem and the fix, on every backend."""

import pytest
import torch
from helpers import backend_cases, backends_for

import fused_xent

BACKENDS = backends_for("cpu")
BACKEND_CASES = backend_cases()
BAD = (ValueError, RuntimeError, IndexError)


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
    ("integer logits", torch.randint(0, 5, (4, 3)), torch.tensor([0, 1, 2, 1]), {}, "floating-point"),
    ("index too large", _logits(4, 3), torch.tensor([0, 1, 3, 1]), {}, "out of range"),
    ("negative index", _logits(4, 3), torch.tensor([0, -2, 2, 1]), {}, "out of range"),
    ("weight of the wrong length", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.ones(4)},
     "one entry per class (3)"),
    ("half weight with float logits", _logits(4, 3), torch.tensor([0, 1, 2, 1]),
     {"weight": torch.ones(3, dtype=torch.half)}, "weight.to(input.dtype)"),
    ("ignore_index with probability targets", _logits(4, 3), torch.rand(4, 3), {"ignore_index": 1},
     "not supported with class-probability targets"),
    ("label_smoothing above 1", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"label_smoothing": 1.5}, "[0.0, 1.0]"),
    ("negative label_smoothing", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"label_smoothing": -0.1},
     "[0.0, 1.0]"),
    ("unknown reduction", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"reduction": "avg"}, "'none', 'mean' or 'sum'"),
    ("0-d logits", torch.tensor(1.0), torch.tensor(0), {}, "class dimension"),
    ("unbatched logits with a batched target", _logits(5), torch.tensor([1, 2]), {}, "0-d class-index target"),
    ("NaN in weights", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"weight": torch.tensor([1.0, float("nan"), 1.0])},
     "weight contains NaN (first at class 1)"),
    ("unknown grad_mode", _logits(4, 3), torch.tensor([0, 1, 2, 1]), {"grad_mode": "fast"}, "grad_mode"),
]


def _on(device, kwargs):
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_explained(device, backend, case):
    _, input, target, kwargs, fragment = case
    with pytest.raises(BAD) as info:
        fused_xent.cross_entropy(input.to(device), target.to(device), backend=backend, **_on(device, kwargs))
    assert fragment in str(info.value)
    if device == "cuda":
        torch.cuda.synchronize()  # no device-side assert is pending


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_out_of_range_with_ignore_index_is_accepted(device, backend):
    """A value equal to ignore_index is never out of range, even when negative or >= C."""
    for ignore in (-100, -1, 7):
        loss = fused_xent.cross_entropy(_logits(3, 4).to(device), torch.tensor([0, ignore, 3], device=device),
                                        ignore_index=ignore, backend=backend)
        assert torch.isfinite(loss)


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
def test_value_checks_can_be_switched_off(device, backend, monkeypatch):
    """FUSED_XENT_CHECK_VALUES=0 skips the NaN-weight scan: the loss is NaN, as PyTorch's."""
    monkeypatch.setenv("FUSED_XENT_CHECK_VALUES", "0")
    weight = torch.tensor([1.0, float("nan"), 1.0], device=device)
    assert torch.isnan(fused_xent.cross_entropy(_logits(4, 3).to(device), torch.tensor([0, 1, 2, 1], device=device),
                                                weight=weight, backend=backend))
