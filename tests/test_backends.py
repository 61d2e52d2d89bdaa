"""Backend discovery and selection: auto order, the environment variable, clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import fused_xent
from fused_xent import _backends


def test_available_backends_lists_the_reference_last():
    names = fused_xent.available_backends()
    assert names[-1] == "torch"
    assert set(names) <= {"cuda", "triton", "cpu", "torch"}


def test_extension_is_built():
    """The compiled CPU kernel must load wherever the package was built (set FUSED_XENT_ALLOW_NO_EXTENSION=1 to
    test a toolchain-less install)."""
    if os.environ.get("FUSED_XENT_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("testing an install without the compiled extension")
    assert _backends.EXTENSION_ERROR is None, f"fused_xent._C failed to load: {_backends.EXTENSION_ERROR}"
    assert "cpu" in fused_xent.available_backends()
    assert torch.ops.fused_xent.cpu_capability() in ("default", "avx2", "avx512")


def test_auto_prefers_compiled_kernel_on_cpu():
    expected = "cpu" if "cpu" in fused_xent.available_backends() else "torch"
    assert _backends.resolve(None, torch.device("cpu")).name == expected
    assert _backends.resolve("auto", torch.device("meta")).name == "torch"


def test_auto_on_cuda_tensors_takes_cuda_then_triton_then_torch(monkeypatch):
    """The order auto walks on CUDA tensors, as on a machine where every backend runs (this one may lack a GPU)."""
    monkeypatch.setattr(_backends, "_why_unavailable", lambda name: None)
    assert _backends.backends_serving("cuda") == ["cuda", "triton", "torch"]
    assert _backends._fastest_serving("cuda") == "cuda"
    monkeypatch.setattr(_backends, "_why_unavailable", lambda name: "absent" if name == "cuda" else None)
    assert _backends._fastest_serving("cuda") == "triton"


@pytest.mark.skipif("cpu" not in fused_xent.available_backends(), reason="compiled extension missing")
def test_a_backend_refuses_tensors_of_another_device():
    with pytest.raises(RuntimeError, match="backend 'cpu' runs on cpu tensors, but the input is on meta"):
        fused_xent.cross_entropy(torch.randn(2, 3, device="meta"), torch.tensor([0, 1], device="meta"),
                                 backend="cpu")


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FUSED_XENT_BACKEND", "torch")
    assert _backends.resolve(None, torch.device("cpu")).name == "torch"
    monkeypatch.setenv("FUSED_XENT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"unknown backend 'nonsense' \(from FUSED_XENT_BACKEND\)"):
        fused_xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
    if "cuda" not in fused_xent.available_backends():
        monkeypatch.setenv("FUSED_XENT_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match=r"backend 'cuda' \(from FUSED_XENT_BACKEND\) is not available"):
            fused_xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_environment_report():
    """`python -m fused_xent` says what can run, and which FUSED_XENT_* settings are in force."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("FUSED_XENT_")}
    out = subprocess.run([sys.executable, "-m", "fused_xent"], check=True, capture_output=True, text=True,
                         env=environment).stdout
    assert "available backends" in out and "torch" in out and "FUSED_XENT_* settings  (none set)" in out
    environment.update(FUSED_XENT_CHECK_VALUES="0", FUSED_XENT_L2_RESIDENT_ROWS_PERCENT="50")
    out = subprocess.run([sys.executable, "-m", "fused_xent"], check=True, capture_output=True, text=True,
                         env=environment).stdout
    assert "FUSED_XENT_CHECK_VALUES=0, FUSED_XENT_L2_RESIDENT_ROWS_PERCENT=50" in out
    environment.update(FUSED_XENT_BACKEND="", FUSED_XENT_CHECK_VALUES="0")
    out = subprocess.run([sys.executable, "-m", "fused_xent"], check=True, capture_output=True, text=True,
                         env=environment).stdout
    assert "FUSED_XENT_BACKEND     (unset: auto)" in out


def test_environment_report_names_the_settings_every_call_would_refuse():
    environment = {name: value for name, value in os.environ.items() if not name.startswith("FUSED_XENT_")}
    environment.update(FUSED_XENT_BACKEND="gpu", FUSED_XENT_CHECK_VALUES="maybe")
    report = subprocess.run([sys.executable, "-m", "fused_xent"], capture_output=True, text=True, env=environment)
    assert report.returncode == 1
    assert "REFUSED SETTING        fused_xent: unknown backend 'gpu' (from FUSED_XENT_BACKEND)" in report.stdout
    assert "FUSED_XENT_CHECK_VALUES='maybe' is neither on (1) nor off (0)" in report.stdout


def test_environment_report_refuses_a_backend_that_cannot_run_here():
    unavailable = [name for name in _backends.BACKEND_NAMES if name not in fused_xent.available_backends()]
    if not unavailable:
        pytest.skip("every backend runs here")
    environment = {name: value for name, value in os.environ.items() if not name.startswith("FUSED_XENT_")}
    environment.update(FUSED_XENT_BACKEND=unavailable[0])
    report = subprocess.run([sys.executable, "-m", "fused_xent"], capture_output=True, text=True, env=environment)
    assert report.returncode == 1
    assert f"FUSED_XENT_BACKEND={unavailable[0]} names a backend that is not available here: " in report.stdout


@pytest.mark.parametrize("code, capability, runs", [
    ("sm_80 compute_90 sm_90", (8, 0), True), ("sm_80 compute_90 sm_90", (8, 6), True),
    ("sm_80 compute_90 sm_90", (8, 9), True), ("sm_80 compute_90 sm_90", (9, 0), True),
    ("sm_80 compute_90 sm_90", (10, 0), True), ("sm_80 compute_90 sm_90", (12, 0), True),
    ("sm_80 compute_90 sm_90", (7, 5), False), ("sm_80 compute_90 sm_90", (7, 0), False),
    ("sm_86", (8, 0), False), ("sm_86", (8, 9), True), ("sm_86", (9, 0), False), ("compute_80", (8, 0), True),
    ("compute_80", (7, 5), False), ("sm_90a", (9, 0), True), ("sm_90a", (10, 0), False),
    ("compute_90a", (10, 0), False), ("sm_100f", (10, 3), True), ("sm_100f", (12, 0), False),
    ("sm_100", (10, 0), True), ("", (9, 0), False), ("lto_90", (7, 5), True),
])
def test_which_gpus_the_cuda_kernels_run_on(code, capability, runs):
    assert _backends.cuda_code_runs_on(code, capability) == runs


def test_the_extension_records_the_gpu_code_it_was_built_as():
    if not _backends.HAS_CUDA_KERNEL:
        assert _backends.CUDA_CODE == ""
        return
    targets = _backends.CUDA_CODE.split()
    assert targets and all(target.startswith(("sm_", "compute_")) for target in targets), targets
    # setup.py's default list (TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"), as the Makefile and CI build it.
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX") == "8.0;9.0+PTX":
        assert sorted(targets) == ["compute_90", "sm_80", "sm_90"]


def test_auto_passes_over_a_gpu_the_cuda_kernels_do_not_run_on(monkeypatch):
    """A build for sm_80 and sm_90 on a Turing GPU (compute capability 7.5): auto takes the next backend that serves
    CUDA tensors, and naming "cuda" says how to rebuild."""
    monkeypatch.setattr(_backends, "CUDA_CODE", "sm_80 compute_90 sm_90")
    monkeypatch.setattr(_backends, "_GPU_REFUSALS", {})
    monkeypatch.setitem(_backends._AUTO_BY_DEVICE_TYPE, "cuda", "cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    capabilities = {0: (7, 5), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    next_backend = [name for name in _backends.backends_serving("cuda") if name != "cuda"][0]
    assert _backends._auto(torch.device("cuda")) == next_backend
    assert _backends._auto(torch.device("cuda", 1)) == "cuda"
    assert "rebuild with TORCH_CUDA_ARCH_LIST=\"7.5\"" in _backends.why_not_on_gpu(torch.device("cuda", 0))
    assert _backends.why_not_on_gpu(torch.device("cuda", 1)) is None


@pytest.mark.skipif(_backends._triton_ops is not None, reason="Triton was set up at import (GPU or interpreter)")
def test_triton_without_a_gpu_says_how_to_interpret(monkeypatch):
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing fused_xent"):
        fused_xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after fused_xent was imported"):
        fused_xent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="triton")


@pytest.mark.parametrize("setting", ["1", "true", "TRUE", "on", "Yes", "y", "0", "false", "", " 1", "2"])
def test_triton_interpret_is_read_as_triton_reads_it(setting, monkeypatch):
    """fused_xent decides whether Triton will interpret its kernels from TRITON_INTERPRET: it must agree with
    Triton's own reading of the variable, or it would launch interpreted kernels as compiled ones (or refuse them)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    from fused_xent._triton_env import triton_interpreter_requested

    monkeypatch.setenv("TRITON_INTERPRET", setting)
    assert triton_interpreter_requested() == libtriton.getenv_bool("TRITON_INTERPRET", False)
