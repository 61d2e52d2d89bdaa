"""Input builders and tolerances shared by the test modules."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOLERANCES, assert_close, assert_grad_close  # noqa: F401 (re-exported)

import fused_xent
from fused_xent._backends import backends_serving

# Tests of more than 2**31 elements hold 20-45 GiB of GPU memory each: under pytest-xdist (--dist loadgroup, as
# benchmarks/gpu_check.sh runs) they take turns on one worker, so that together they never exhaust the GPU.
ONE_AT_A_TIME_ON_THE_GPU = pytest.mark.xdist_group("gpu_memory")

# Input shapes with how to lay them out in memory: spans 1 class, odd sizes, a 32K vocabulary, unbatched and empty
# inputs, 3-D to 5-D spatial inputs, channels_last and non-contiguous views.
SHAPES = [
    ((7,), "contiguous"),
    ((1, 1), "contiguous"),
    ((5, 1), "contiguous"),
    ((4, 2), "contiguous"),
    ((9, 423), "contiguous"),
    ((3, 32000), "contiguous"),
    ((0, 5), "contiguous"),
    ((2, 3, 0, 4), "contiguous"),
    ((6, 10), "transposed"),
    ((5, 12), "sliced"),
    ((2, 3, 5), "contiguous"),
    ((2, 4, 3, 5), "contiguous"),
    ((2, 5, 3, 4), "channels_last"),
    ((2, 19, 8, 8), "channels_last"),
    ((2, 3, 2, 3, 4), "contiguous"),
    ((2, 300, 5), "contiguous"),  # NCHW with many classes: chunked lanes on CPU
    ((3, 6, 4, 5), "sliced"),
]


def shape_id(item):
    shape, layout = item
    return "x".join(map(str, shape)) + ("" if layout == "contiguous" else f"-{layout}")


def backends_for(device: str):
    """Backends to test on a device: every available one that runs there. Triton serves CPU tensors only under
    TRITON_INTERPRET=1, which tests/test_triton.py sets in subprocesses that run its own suite, the error table and
    the fuzzer."""
    return backends_serving(device)


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases():
    """(device, backend) parameters for every backend on every device here; those on a GPU carry the `cuda` mark,
    so that `pytest -m cuda` (benchmarks/gpu_check.sh) selects all of them."""
    return [
        pytest.param(device, backend, id=f"{device}-{backend}", marks=[pytest.mark.cuda] if device == "cuda" else [])
        for device in devices()
        for backend in backends_for(device)
    ]


def poison_cuda_cache(byte=0xFF):
    """Leave `byte` in the blocks PyTorch's CUDA caching allocator hands out next (a whole 2 MiB segment of its
    small pool, which serves blocks of up to 1 MiB, and 256 MiB of its large pool): by default NaN (0xFF..FF in
    every float dtype), so an output element a kernel forgets to write stays NaN and fails the comparison with
    PyTorch; 0 (zeros) where a test expects NaN, which an unwritten element would otherwise pass for. The cache is
    emptied first: the allocator hands out the best-fitting cached block, which would otherwise often be a stale one
    from an earlier test. A no-op without a GPU."""
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    poisoned = [torch.empty(size, dtype=torch.uint8, device="cuda") for size in (1 << 20, 1 << 20, 256 << 20)]
    for block in poisoned:
        block.fill_(byte)


def make_logits(shape, layout, dtype, device="cpu", generator=None, scale=3.0):
    """Fresh random logits of `shape` in the requested memory layout (values never all zero)."""
    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).mul_(scale)

    if layout == "contiguous":
        x = randn(*shape)
    elif layout == "transposed":  # (N, C) stored column-major
        x = randn(*reversed(shape)).t()
    elif layout == "sliced":  # every other class of a wider tensor
        wide = list(shape)
        wide[1] *= 2
        x = randn(*wide)[:, ::2]
    elif layout == "channels_last":
        x = randn(*shape).contiguous(memory_format=torch.channels_last)
    elif layout == "offset":  # contiguous, one element past the allocation's start (rows begin mid-vector)
        storage = torch.empty(math.prod(shape) + 1, dtype=dtype, device=device)
        return storage[1:].view(shape).copy_(randn(*shape))
    else:
        raise ValueError(layout)
    out = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device)
    return out.copy_(x)


def expected_lse(logits, target, ignore_index, dtype):
    """The lse an op saves for (N, C, S) logits, as (its max part in `dtype`, the log-sum-exp in float64, which
    positions count): an ignored position's row is not read, and its lse is that of no classes, (0, -inf), as is that
    of a row of -inf logits (a max of -inf is kept as 0, so that x - max is never -inf - -inf)."""
    kept = torch.ones_like(logits[:, 0], dtype=torch.bool) if target.is_floating_point() else target != ignore_index
    maximum = logits.detach().to(dtype).amax(1)
    maximum = torch.where(kept & (maximum != -torch.inf), maximum, 0)
    log_sum_exp = torch.where(kept, torch.logsumexp(logits.detach().double(), 1), -torch.inf)
    return maximum, log_sum_exp, kept


def make_class_target(shape, num_classes, device="cpu", ignore_index=None, generator=None):
    """Class indices of `shape`; about a third of them set to ignore_index when one is given."""
    target = torch.randint(0, num_classes, shape, generator=generator)
    if ignore_index is not None and target.numel():
        drop = torch.rand(shape, generator=generator) < 0.35
        target[drop] = ignore_index
    return target.to(device)


def make_prob_target(logits, generator=None):
    """Class probabilities with the logits' shape, with some exact zeros."""
    class_dim = 0 if logits.dim() == 1 else 1
    raw = torch.randn(logits.shape, generator=generator, dtype=torch.float64) * 2
    raw[torch.rand(logits.shape, generator=generator) < 0.2] = -float("inf")
    probs = torch.softmax(raw, dim=class_dim).nan_to_num(0.0)
    return probs.to(logits.dtype).to(logits.device)


def loss_magnitude(logits, weight):
    """The size of the terms a loss is a difference of, largest |logit| x largest weight (see assert_close)."""
    largest_logit = logits.detach().double().abs().nan_to_num(posinf=0).max().item() if logits.numel() else 1.0
    return largest_logit * (max(1.0, weight.double().max().item()) if weight is not None else 1.0)


def gradient_terms(target, weight, reduction, ignore_index, upstream=1.0):
    """A bound on the terms each gradient entry is made of, largest |upstream gradient| x weight / the mean's
    denominator (see assert_grad_close): with full smoothing and near-uniform softmax, the entries cancel far below
    them."""
    largest_weight = max(1.0, weight.double().abs().max().item()) if weight is not None else 1.0
    denominator = 1.0
    if reduction == "mean":
        if target.is_floating_point():  # the number of positions
            denominator = target.numel() / (target.shape[0] if target.dim() == 1 else target.shape[1])
        else:
            kept = target[target != ignore_index]
            denominator = kept.numel() if weight is None else weight.double()[kept].sum().item()
    return upstream * largest_weight / denominator if denominator else 0.0


def torch_reference(input, target, grad_output, **kwargs):
    """F.cross_entropy loss and input gradient, evaluated in float64 on the same values."""
    x = input.detach().double().requires_grad_(True)
    t = target.double() if target.is_floating_point() else target
    if kwargs.get("weight") is not None:
        kwargs = dict(kwargs, weight=kwargs["weight"].double())
    loss = F.cross_entropy(x, t, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, grad_output.double()) if loss.numel() else (torch.zeros_like(x),)
    return loss.detach(), grad


def without_ignored_gradient(grad, target, ignore_index):
    """PyTorch's gradient with the ignored positions' entries set to 0, which fused_xent gives whatever their logits
    (PyTorch's is NaN for a row of -inf: one of the README's deliberate differences). target: class indices."""
    return grad.masked_fill((target == ignore_index).unsqueeze(0 if grad.dim() == 1 else 1), 0.0)


def differentiable_copy(x, grad_mode="recompute"):
    """(leaf, logits, logits_grad): a copy of x with its exact geometry (strides, gaps, storage offset, so that
    misaligned rows stay misaligned) to pass as logits, the leaf to differentiate with respect to, and the map from
    the leaf's gradient to the logits' shape. grad_mode='inplace' refuses leaves, as PyTorch's in-place ops do:
    there the logits are a view of a clone of the leaf storage, which passes the gradient back without a copy."""
    storage_size = x.untyped_storage().nbytes() // x.element_size()
    storage = x.detach().as_strided((storage_size,), (1,), 0).clone()  # all of it: x's elements may overlap

    def geometry_of_x(flat):
        return flat.as_strided(x.shape, x.stride(), x.storage_offset())

    if grad_mode != "inplace":
        leaf = geometry_of_x(storage).detach().requires_grad_(True)
        return leaf, leaf, lambda grad: grad
    storage.requires_grad_(True)
    return storage, geometry_of_x(storage.clone()), geometry_of_x


def fused(input, target, grad_output, backend, **kwargs):
    """fused_xent's loss and input gradient on a copy of input with its exact geometry."""
    leaf, x, logits_grad = differentiable_copy(input, kwargs.get("grad_mode", "recompute"))
    if x.is_cuda:
        poison_cuda_cache()
    loss = fused_xent.cross_entropy(x, target, backend=backend, **kwargs)
    if not loss.numel():
        return loss.detach(), torch.zeros_like(input)
    return loss.detach(), logits_grad(torch.autograd.grad(loss, leaf, grad_output)[0])


def run_under_address_sanitizer(script, **env):
    """Runs tests/<script> in a process of its own with AddressSanitizer's runtime preloaded (an instrumented
    library cannot load without it), `env` added to the environment; returns its stdout. Skips where the compiler
    has no ASan runtime; fails with the tail of ASan's report."""
    compiler = os.environ.get("CXX", "c++")
    libasan = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip(f"{compiler} has no AddressSanitizer runtime")
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1", **env)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    run = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout


_POISON_PROBE = "import torch; x = torch.empty(4096); print(int((x.view(torch.int32) == 0x5A5A5A5A).sum()))"


def run_pytest_with_poisoned_allocations(path, selection=None, **env):
    """Runs the tests of `path` (those `selection` names with -k, if given) in a process of their own, with `env`
    added, whose glibc allocator fills every fresh block below 32 MiB with bytes 0x5A (a float of 1.5e16): an output
    element a kernel forgets to write keeps that value and fails the comparison with PyTorch, where a reused block
    might have held the right answer already, or the 0 a fresh page holds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python_path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=python_path, MALLOC_PERTURB_="165", MALLOC_MMAP_THRESHOLD_=str(32 << 20), **env)
    probe = subprocess.run([sys.executable, "-c", _POISON_PROBE], env=env, capture_output=True, text=True, check=True)
    assert int(probe.stdout) == 4096, "fresh allocations are not poisoned; the test would prove nothing"
    args = [sys.executable, "-m", "pytest", path, "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-x"]
    args += ["-k", selection] if selection else []
    run = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert " passed" in run.stdout, run.stdout[-2000:]
