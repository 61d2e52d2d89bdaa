"""`python -m fused_xent`: what this installation can run, for bug reports."""

import os
import platform

import torch

from . import __version__, _backends


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
        _line("CUDA kernel built", _backends.HAS_CUDA_KERNEL)
    else:
        _line("compiled extension", f"missing ({_backends.EXTENSION_ERROR})")
    _line("ATEN_CPU_CAPABILITY", os.environ.get("ATEN_CPU_CAPABILITY", "(unset)"))
    if torch.cuda.is_available():
        _line("CUDA device", torch.cuda.get_device_name())
        _line("CUDA arch list", " ".join(torch.cuda.get_arch_list()))
    else:
        _line("CUDA device", "none")
    for name in _backends.BACKEND_NAMES:
        reason = _backends._why_unavailable(name)
        _line(f"backend {name}", "available" if reason is None else f"unavailable: {reason}")
    _line("available backends", ", ".join(_backends.available_backends()))
    _line(_backends.BACKEND_ENV, os.environ.get(_backends.BACKEND_ENV, "(unset: auto)"))
    _line("FUSED_XENT_* settings", _backends.environment_settings())


if __name__ == "__main__":
    main()
