"""`python -m fused_xent`: what this installation can run, for bug reports."""

import os
import platform
import sys

import torch

from . import __version__, _backends, _value_check


def _line(name, value):
    print(f"{name:<22} {value}")


def main():
    _line("fused_xent", __version__)
    _line("python", platform.python_version())
    _line("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        _line("triton", triton.__version__)
    except ImportError:
        _line("triton", "not installed")
    if _backends.EXTENSION_ERROR is None:
        _line("compiled extension", "loaded")
        _line("CPU capability", torch.ops.fused_xent.cpu_capability())
        _line("CUDA kernel built", f"as {_backends.CUDA_CODE}" if _backends.HAS_CUDA_KERNEL else False)
    else:
        _line("compiled extension", f"missing ({_backends.EXTENSION_ERROR})")
    _line("ATEN_CPU_CAPABILITY", os.environ.get("ATEN_CPU_CAPABILITY", "(unset)"))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        _line("CUDA device", f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})")
        _line("torch's CUDA archs", " ".join(torch.cuda.get_arch_list()))
        if _backends.HAS_CUDA_KERNEL:
            refusal = _backends.why_not_on_gpu(torch.device("cuda"))
            _line("CUDA kernel runs here", "yes" if refusal is None else f"no: {refusal}")
    else:
        _line("CUDA device", "none")
    for name in _backends.BACKEND_NAMES:
        reason = _backends._why_unavailable(name)
        _line(f"backend {name}", "available" if reason is None else f"unavailable: {reason}")
    _line("available backends", ", ".join(_backends.available_backends()))
    _line(_backends.BACKEND_ENV, os.environ.get(_backends.BACKEND_ENV) or "(unset: auto)")
    _line("FUSED_XENT_* settings", _backends.environment_settings())
    refused = _refused_settings()
    for problem in refused:
        _line("REFUSED SETTING", problem)
    return 1 if refused else 0


def _refused_settings() -> list[str]:
    """What every call would raise about the settings the Python layer reads (the CUDA kernels check theirs at
    launch)."""
    problems = []
    backend = os.environ.get(_backends.BACKEND_ENV)
    try:
        if backend:
            _backends.check_backend_name(backend, f" (from {_backends.BACKEND_ENV})")
    except ValueError as error:
        problems.append(str(error))
    else:
        reason = _backends._why_unavailable(backend) if backend and backend != "auto" else None
        if reason is not None:
            problems.append(f"{_backends.BACKEND_ENV}={backend} names a backend that is not available here: {reason}")
    try:
        _value_check.value_checks_enabled()
    except ValueError as error:
        problems.append(str(error))
    return problems


if __name__ == "__main__":
    sys.exit(main())
