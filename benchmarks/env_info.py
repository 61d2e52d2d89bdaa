"""What a result depends on besides the code: machine, versions, commit, threads, memory allocator regime, load."""

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

import fused_xent
from fused_xent._backends import environment_settings

THP_ENV = "THP_MEM_ALLOC_ENABLE"
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def environment_variable(name: str, value: str | None):
    """The environment variable `name` set to `value` (None: as it is) inside the block, restored after it."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), platform.processor() or "CPU")
    flags = _read("/proc/cpuinfo")
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {isa}"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else _cpu_name()


def git_commit() -> str:
    """The checkout's commit (-dirty with uncommitted changes), or $GIT_COMMIT where the tree is a copy without .git
    (a lent GPU machine: gpu_check.sh passes it on)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]

    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


def thp_enabled() -> bool:
    return os.environ.get(THP_ENV, "0") == "1"


def allocator_regime(device: str) -> str:
    """The settings every provider in the run shares (they are process-wide and fixed when torch loads)."""
    kernel_thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    parts = [
        f"{THP_ENV}={os.environ.get(THP_ENV, 'unset')} (PyTorch CPU allocator huge pages "
        f"{'on' if thp_enabled() else 'off'})",
        f"kernel THP: {kernel_thp}",
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', 'unset')}",
        # glibc's own tuning, e.g. MALLOC_MMAP_THRESHOLD_: which freed buffers its heap keeps for the next step.
        "glibc: " + (" ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
                     or "defaults (dynamic mmap threshold)"),
    ]
    if device == "cuda":
        parts.append(f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', 'unset')}")
    return "; ".join(parts)


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def busy_warning() -> str | None:
    """A note when other processes share the CPUs: with OpenMP threads on every core, one busy core can stall each
    parallel region, and ops made of many small regions slow down by an order of magnitude."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load < 0.8:
        return None
    return (f"WARNING: 1-minute load average {load:.1f} before this run on {os.cpu_count()} CPUs: other processes "
            "are running, CPU timings are unreliable (compare only within a quiet run; --threads 1 suffers less)")


def describe(device: str) -> dict[str, str]:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if device == "cuda" else ""),
        "fused_xent": f"{fused_xent.__version__}, backends available: {', '.join(fused_xent.available_backends())}",
        "fused_xent settings": environment_settings(),
        "commit": git_commit(),
        "threads": str(torch.get_num_threads()) if device == "cpu" else "n/a",
        "allocator": allocator_regime(device),
        "load average at start (1, 5, 15 min)": load_average(),
    }
    if "cpu" in fused_xent.available_backends():
        info["fused_xent CPU capability"] = str(torch.ops.fused_xent.cpu_capability())
    return info


def available_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62
