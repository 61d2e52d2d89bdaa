"""CUDA device code that can be checked without a GPU: built for the host with nvcc and run on the CPU.

Skipped where nvcc is absent. CI has nvcc 13.0, so this runs on every CI machine.
"""

import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def find_nvcc():
    for home in (cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home) / "bin" / "nvcc"
    return None


def build_and_run(source, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    binary = tmp_path / source.stem
    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    # 20011/20014: the check's stand-in thread group is host-only, called from __host__ __device__ templates.
    command = [str(nvcc), "-std=c++20", "-O1", "--expt-relaxed-constexpr", "-diag-suppress", "20011,20014",
               *includes, str(source), "-o", str(binary)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    return subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)


def test_visit_classes_covers_every_class_once(tmp_path):
    """xent_device.cuh's visit_classes / visit_items, replayed for every thread of a group: exact coverage, aligned
    16-byte vectors, loads of a batch before its uses, the same classes on a second visit (tests/host/*.cu)."""
    result = build_and_run(ROOT / "tests" / "host" / "visit_classes.cu", tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr


def test_class_splits_cover_every_class_once(tmp_path):
    """xent_launch.h's split_classes and xent_device.cuh's split_item (split rows and split NCHW positions): every
    plan tiles the classes without an empty range, and every (position, class) goes to exactly one work item."""
    result = build_and_run(ROOT / "tests" / "host" / "split_classes.cu", tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr
