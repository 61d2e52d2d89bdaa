"""Which kernels this installation has, and which one serves a given call.

A backend is the four ops of csrc/fused_xent.cpp (forward, backward, forward with the gradient, and its in-place
form), with what the front end needs to know of it: whether it checks class indices itself, and whether it scales a
gradient made in the forward on the device (scale_unit_grad_). `auto` picks, for CUDA tensors,
the compiled CUDA kernel (on a GPU it was built for), then Triton, then the PyTorch reference; for CPU tensors the
compiled CPU kernel, then the reference; for any other device the reference. Naming a backend that cannot serve
the call is an error, never a silent switch.
"""

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference
from ._triton_env import INTERPRET, NO_DEVICE_FOR_TRITON, triton_interpreter_requested

BACKEND_ENV = "FUSED_XENT_BACKEND"
BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")

try:
    from . import _C  # noqa: F401  (loading it registers the compiled ops)

    EXTENSION_ERROR = None
except ImportError as error:
    # Not built (no working C++ toolchain at install time), or built against another torch.
    if importlib.util.find_spec(f"{__package__}._C") is None:
        EXTENSION_ERROR = "fused_xent._C was not built (no C++ toolchain at install time?)"
    else:
        EXTENSION_ERROR = error


@dataclass(frozen=True)
class Backend:
    name: str
    fwd: Callable
    bwd: Callable
    fwd_grad: Callable
    fwd_grad_: Callable
    checks_targets: bool  # raises on out-of-range class indices itself, so the front end need not
    # Meets an out-of-range class index without reading or writing out of bounds (a NaN loss instead), so the front
    # end's check of the targets may be read after the kernels are queued (fused_xent._value_check.ValueCheck).
    bad_targets_are_nan: bool = False
    # The in_forward and inplace modes' backward on the device (csrc/cuda/xent_scale.cu): grad *= grad_loss in place,
    # skipped there when grad_loss is 1, without a host sync. None: the front end multiplies (on the CPU once the host
    # has found grad_loss is not 1, which costs nothing there).
    scale_unit_grad_: Callable | None = None


def _compiled_ops():
    ops = torch.ops.fused_xent
    return ops.cross_entropy_fwd, ops.cross_entropy_bwd, ops.cross_entropy_fwd_grad, ops.cross_entropy_fwd_grad_


# Settled at import, so that backend selection traced by torch.compile reads plain Python values (no dispatcher
# queries, no imports inside the graph). Triton is imported only where it can run: with a CUDA device, or with the
# interpreter requested for tests.
HAS_CUDA_KERNEL = EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fused_xent::cross_entropy_fwd", "CUDA"
)
# The GPU code the CUDA kernels were built as, e.g. "sm_80 compute_90 sm_90"; "" without them.
CUDA_CODE = torch.ops.fused_xent.cuda_code() if HAS_CUDA_KERNEL else ""
if torch.cuda.is_available() or INTERPRET:
    from . import _triton_ops  # never raises: it records why Triton is unusable instead
else:
    _triton_ops = None


def _why_unavailable(name: str) -> str | None:
    """None when the backend (one of BACKEND_NAMES) can run here, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpu":
        return None if EXTENSION_ERROR is None else f"the compiled extension failed to load ({EXTENSION_ERROR})"
    if name == "cuda":
        if EXTENSION_ERROR is not None:
            return f"the compiled extension failed to load ({EXTENSION_ERROR})"
        if not HAS_CUDA_KERNEL:
            return "the extension was built without CUDA (rebuild with FUSED_XENT_CUDA=1 and nvcc)"
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if name == "triton":
        if _triton_ops is None:
            if triton_interpreter_requested():
                return "TRITON_INTERPRET=1 was set after fused_xent was imported; set it before importing fused_xent"
            return NO_DEVICE_FOR_TRITON
        return _triton_ops.unavailable_reason()
    raise AssertionError(f"not a backend: {name!r}")


def cuda_code_runs_on(code: str, capability: tuple[int, int]) -> bool:
    """Whether a GPU of compute capability (major, minor) runs some of `code` (CUDA_CODE): a cubin (sm_86) runs on
    its major version from its minor version up, PTX (compute_90) is compiled by the driver for any later GPU, and
    code for one architecture (sm_90a) or family (sm_100f) runs on that one or that family only."""
    for target in code.split():
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
        if found is None:
            return True  # not a form this knows: the launch will tell
        kind, major, minor, specific = found[1], int(found[2]), int(found[3]), found[4]
        if specific == "a":
            runs = capability == (major, minor)
        elif kind == "sm" or specific == "f":
            runs = capability[0] == major and capability[1] >= minor
        else:
            runs = capability >= (major, minor)
        if runs:
            return True
    return False


# Why the CUDA kernels cannot run on a GPU (None: they can), by device index, found at the first call on it: asking
# at import would initialize CUDA, which a process that forks workers must not do.
_GPU_REFUSALS: dict[int, str | None] = {}


def why_not_on_gpu(device: torch.device) -> str | None:
    """Why this build's CUDA kernels cannot run on `device`'s GPU (an older one than they were built for), or None.
    Not asked while torch.compile traces: there a launch on such a GPU raises CUDA's own error."""
    if torch.compiler.is_compiling():
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _GPU_REFUSALS:
        major, minor = torch.cuda.get_device_capability(index)
        runs = cuda_code_runs_on(CUDA_CODE, (major, minor))
        _GPU_REFUSALS[index] = None if runs else (
            f"its kernels were built as {CUDA_CODE}, none of which runs on cuda:{index} (compute capability "
            f"{major}.{minor}): rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (the triton backend serves it "
            "meanwhile, if Triton is installed)"
        )
    return _GPU_REFUSALS[index]


def environment_settings() -> str:
    """The FUSED_XENT_* environment variables that are set, as NAME=value: what changes the kernels' behaviour or
    plans, for bug reports and benchmark records."""
    settings = [f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith("FUSED_XENT_")]
    return ", ".join(settings) or "(none set)"


def available_backends() -> list[str]:
    """Backends that can run on this machine, fastest first, e.g. ["cpu", "torch"] without a GPU."""
    return [name for name in BACKEND_NAMES if _why_unavailable(name) is None]


def backends_serving(device_type: str, available_only: bool = True) -> list[str]:
    """The backends that run on tensors of `device_type` (those available here, unless available_only=False),
    fastest first and the reference last. Triton serves CPU tensors only under its interpreter (for tests), which
    `auto` never picks."""
    served = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "triton") if INTERPRET else ("cpu",)}
    names = (*served.get(device_type, ()), "torch")
    return [name for name in names if not available_only or _why_unavailable(name) is None]


def _make_backend(name: str) -> Backend:
    if name == "cpu":
        return Backend(name, *_compiled_ops(), checks_targets=True)
    if name == "cuda":
        return Backend(name, *_compiled_ops(), checks_targets=False, bad_targets_are_nan=True,
                       scale_unit_grad_=torch.ops.fused_xent.scale_unit_grad_)
    if name == "triton":
        ops = torch.ops.fused_xent
        return Backend(
            name, ops.triton_cross_entropy_fwd, ops.triton_cross_entropy_bwd, ops.triton_cross_entropy_fwd_grad,
            ops.triton_cross_entropy_fwd_grad_, checks_targets=False, bad_targets_are_nan=True,
            scale_unit_grad_=ops.triton_scale_unit_grad_,
        )
    if name != "torch":
        raise ValueError(f"fused_xent: unknown backend {name!r}: expected one of {BACKEND_NAMES}")
    return Backend(
        "torch", reference.cross_entropy_fwd, reference.cross_entropy_bwd, reference.cross_entropy_fwd_grad,
        reference.cross_entropy_fwd_grad_, checks_targets=False,
    )


def backend_ops(name: str) -> Backend:
    backend = _AVAILABLE_BACKENDS.get(name)
    return _make_backend(name) if backend is None else backend


_DEVICE_OF_BACKEND = {"cpu": "cpu", "cuda": "cuda"}


def _fastest_serving(device_type: str) -> str:
    """The fastest backend serving the device type; never Triton's interpreter, which is for tests."""
    return next(name for name in backends_serving(device_type) if device_type == "cuda" or name != "triton")


# What can run is settled at import, and so is what serves each device: found once here, instead of on every call
# (9 us of a 30 us small forward), and never changed afterwards, which torch.compile's guards would see.
_AVAILABLE_BACKENDS = {name: _make_backend(name) for name in available_backends()}
_AUTO_BY_DEVICE_TYPE = {device_type: _fastest_serving(device_type) for device_type in ("cpu", "cuda")}


def _auto(device: torch.device) -> str:
    name = _AUTO_BY_DEVICE_TYPE.get(device.type)
    if name is None:
        return _fastest_serving(device.type)
    if name == "cuda" and why_not_on_gpu(device) is not None:
        return next(other for other in backends_serving("cuda") if other != "cuda")
    return name


def check_backend_name(name: str, origin: str = ""):
    if name != "auto" and name not in BACKEND_NAMES:
        choices = ", ".join(BACKEND_NAMES)
        raise ValueError(f"fused_xent: unknown backend {name!r}{origin}; choose one of {choices} or 'auto'")


def resolve(requested: str | None, device: torch.device) -> Backend:
    """The backend for a call on `device`: the requested one, FUSED_XENT_BACKEND, or auto."""
    if requested is None:
        name, origin = os.environ.get(BACKEND_ENV) or "auto", f" (from {BACKEND_ENV})"
    else:
        name, origin = requested, ""
    check_backend_name(name, origin)
    if name == "auto":
        return backend_ops(_auto(device))
    reason = _why_unavailable(name)
    if reason is not None:
        raise RuntimeError(
            f"fused_xent: backend {name!r}{origin} is not available: {reason}. Available here: "
            f"{', '.join(available_backends())} (or 'auto')"
        )
    wanted_device = _DEVICE_OF_BACKEND.get(name)
    if wanted_device is not None and device.type != wanted_device:
        raise RuntimeError(
            f"fused_xent: backend {name!r}{origin} runs on {wanted_device} tensors, but the input is on {device}: "
            "move the tensors or use backend='auto'"
        )
    if name == "triton":
        _triton_ops.check_device(device)
    if name == "cuda":
        reason = why_not_on_gpu(device)
        if reason is not None:
            raise RuntimeError(f"fused_xent: backend 'cuda'{origin} cannot run here: {reason}")
    return backend_ops(name)
