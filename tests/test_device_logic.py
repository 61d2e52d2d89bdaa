"""CUDA device code that can be checked without a GPU: built for the host with nvcc and run on the CPU.

Skipped where nvcc is absent (and the launch plan's check where torch is a CPU-only build, without CUDA headers). CI
has nvcc 13.0 and a CUDA build of torch, so this runs on every CI machine.
"""

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
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
    """xent_vectors.cuh's visit_classes / visit_items, replayed for every thread of a group: exact coverage, aligned
    16-byte vectors, loads of a batch before its uses, the same classes on a second visit (tests/host/*.cu)."""
    result = build_and_run(ROOT / "tests" / "host" / "visit_classes.cu", tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr


def test_class_splits_cover_every_class_once(tmp_path):
    """xent_launch.h's split_classes and xent_position.cuh's split_item (split rows and split NCHW positions): every
    plan tiles the classes without an empty range, and every (position, class) goes to exactly one work item."""
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch: xent_launch.h includes its c10/cuda headers")
    result = build_and_run(ROOT / "tests" / "host" / "split_classes.cu", tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr


def find_cuobjdump():
    try:
        import triton
    except ImportError:
        triton = None
    candidates = [Path(home) / "bin" / "cuobjdump" for home in (cpp_extension.CUDA_HOME, "/usr/local/cuda") if home]
    if triton is not None:
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((path for path in candidates if path.exists()), None)


def sm90_resource_usage():
    """{kernel name (demangled, no namespaces): (registers, stack bytes)} of the built extension's sm_90 code."""
    import re

    library = next(iter((ROOT / "fused_xent").glob("_C*.so")), None)
    cuobjdump = find_cuobjdump()
    if library is None or cuobjdump is None or shutil.which("c++filt") is None:
        pytest.skip("needs the built extension, cuobjdump and c++filt")
    report = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(library)], capture_output=True, text=True)
    usage, arch, mangled = {}, None, []
    # Each line with the one after it (none for an extension without CUDA code, whose report is empty).
    for line, following in itertools.pairwise([*report.stdout.splitlines(), ""]):
        if found := re.match(r"arch = (sm_\d+)", line):
            arch = found[1]
        elif (found := re.match(r"\s*Function (\S+):", line)) and arch == "sm_90":
            counts = re.search(r"REG:(\d+) STACK:(\d+)", following)
            mangled.append((found[1], int(counts[1]), int(counts[2])))
    if not mangled:
        pytest.skip("the extension was built without sm_90 CUDA code (FUSED_XENT_CUDA=1 builds it)")
    names = subprocess.run(["c++filt"], input="\n".join(name for name, _, _ in mangled), capture_output=True,
                           text=True).stdout.splitlines()
    for name, (_, registers, stack) in zip(names, mangled, strict=True):
        name = re.sub(r"fused_xent::cuda::(\(anonymous namespace\)::)?", "", name)
        usage[name.split("(XentParams")[0]] = (registers, stack)
    return usage


def test_hot_kernels_keep_their_occupancy_on_hopper():
    """The kernels that carry the float32/16-bit traffic stay within the registers that keep their occupancy on sm_90
    and never spill: block-row kernels (512 threads) at most 64 registers, two blocks per SM; the cluster kernel its
    launch bounds' 64; thread-per-position kernels (256 threads) at most 48 for the forward, five blocks per SM, and
    40, six blocks, for the gradient of whole positions (the segmentation backward): their latency is hidden by
    occupancy (chunks of 32 classes in flight per thread, at 64-124 registers, measured slower on an H200); those
    that stage short rows in shared memory at most 64, the four blocks they are built for. No thread-per-position
    kernel spills. A run-time choice where a compile-time one belongs (e.g. the lse parts of the
    gradient) shows up here as registers, long before a GPU shows it as time."""
    import re

    usage = sm90_resource_usage()
    checked = 0
    for name, (registers, stack) in usage.items():
        if name.startswith("void spatial_"):
            assert stack == 0, (name, registers, stack)
        dtype = re.search(r"<(float|c10::BFloat16|c10::Half|double)", name)
        if dtype is None or dtype[1] == "double":
            continue
        if re.match(r"void rows_(forward|grad)_kernel<[^,]+, BlockGroup, false", name):
            limit, stack_limit = 64, 0
        elif name.startswith("void rows_cluster_kernel"):
            limit, stack_limit = 64, 0
        elif re.match(r"void spatial_forward_kernel<[^,]+, false, false>", name):
            limit, stack_limit = 48, 0
        elif re.match(r"void spatial_grad_kernel<[^,]+, false, false, false>", name):
            limit, stack_limit = 40, 0  # six blocks per SM: the backward of segmentation
        elif re.match(r"void spatial_(forward|grad)_kernel<.*, true>", name):
            limit, stack_limit = 64, 0  # staged rows (the last template argument): four blocks per SM
        else:
            continue
        checked += 1
        assert registers <= limit and stack <= stack_limit, (name, registers, stack)
    assert checked >= 30, sorted(usage)
