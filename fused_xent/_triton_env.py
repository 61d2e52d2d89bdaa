"""Whether Triton runs its kernels in its Python interpreter, asked in one place by the backend table, the Triton
launchers and the benchmark; whether that interpreter can run with the NumPy installed; and what the Triton backend
says where it cannot run."""

import os
import re


def triton_interpreter_requested() -> bool:
    """TRITON_INTERPRET as Triton reads it (its getenv_bool: 1, true, on, yes or y, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


# Read once, at import, as Triton reads it when it decorates the kernels: a later change of the variable would not
# change how they run (the backend table says so to a caller who sets it too late).
INTERPRET = triton_interpreter_requested()
TRITON_CPU_HINT = (
    "the triton backend runs on CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing fused_xent "
    "(slow, for tests)"
)
NO_DEVICE_FOR_TRITON = f"no CUDA device is visible ({TRITON_CPU_HINT})"


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0", "2.4.0rc1" or "3.8.0+git1a2b3c"."""
    major, minor = (re.findall(r"\d+", version) + ["0", "0"])[:2]
    return int(major), int(minor)


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None. Before 3.7 it took a loop bound
    held in a one-element array to a Python int with int(array), which NumPy refuses from 2.4 on: every kernel would
    stop at its first loop with "only 0-dimensional arrays can be converted to Python scalars"."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run under NumPy {numpy_version}: "
            "before Triton 3.7 it converts one-element arrays to Python integers, which NumPy refuses from 2.4 on; "
            "install 'numpy<2.4', or Triton 3.7 or newer"
        )
    return None


def interpreter_problem(triton_version: str) -> str | None:
    """interpreter_incompatibility with the NumPy installed (None without NumPy: Triton's interpreter says so)."""
    try:
        import numpy
    except ImportError:
        return None
    return interpreter_incompatibility(triton_version, numpy.__version__)
