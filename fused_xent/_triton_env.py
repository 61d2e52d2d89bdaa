"""Whether Triton runs its kernels in its Python interpreter, asked in one place by the backend table, the Triton
kernels and the benchmark."""

import os


def triton_interpreter_requested() -> bool:
    """TRITON_INTERPRET as Triton reads it (its getenv_bool: 1, true, on, yes or y, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")
