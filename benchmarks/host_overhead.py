"""Where the public API's time goes beyond its kernels: host time of each call, of each phase of the front end and
of each op of the default value check, beside device time (CUDA events; on the CPU, wall time), with the device
idle before each call as `bench.py --timing synced` times it (cache flushed, synchronized).

On the H200 of 2026-11-30 (benchmarks/RESULTS.md) a small PyTorch op cost 14-17 us of host time, so the front end
(about 230 us per forward against F.cross_entropy's 88) was most of the gap between the API and the kernels:

    python benchmarks/host_overhead.py --device cuda            (also run by gpu_check.sh, in its kernels stage)
    python benchmarks/host_overhead.py --device cpu --shape 64x300 --backend cpu
"""

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import fused_xent
import fused_xent._validate as validate
import fused_xent._value_check as value_check
import fused_xent.functional as functional
import fused_xent.reference as reference
from fused_xent._backends import backend_ops

import env_info
import timing

# Front-end functions whose host time is reported as phases of one call (recompute forward, checks on).
PHASES = ("prepare", "start_value_check", "grad_mode_to_run", "kernel_logits")


class Probe:
    """Median ms of a call until the device is done (the begin event is recorded on an idle device before the host
    starts the call, so the host's launch time counts) and host us until it returns; the cache flushed before each."""

    def __init__(self, device: str, repeats: int):
        self.device, self.repeats = device, repeats
        self.timer, self.flusher = timing.Timer(device), timing.CacheFlusher(device)

    def _runs(self, fn):
        for i in range(self.repeats + 3):
            self.flusher.flush()
            self.timer.sync()
            self.timer.start()
            began = time.perf_counter()
            fn()
            host_us = (time.perf_counter() - began) * 1e6
            latency_ms = self.timer.stop() * 1e3
            if i >= 3:
                yield latency_ms, host_us

    def measure(self, fn) -> tuple[float, float]:
        latency_ms, host_us = zip(*self._runs(fn), strict=True)
        return statistics.median(latency_ms), statistics.median(host_us)


@contextlib.contextmanager
def phase_timers(phases: dict[str, list[float]]):
    """Host time of each front-end phase (PHASES, ValueCheck.raise_if_failed; the autograd Function's apply, and
    within it its forward, and within that the cast of the loss to the logits' dtype), recorded into `phases` while
    the block runs."""

    def timed(name, original):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases.setdefault(name, []).append((time.perf_counter() - began) * 1e6)
        return wrapper

    patches = [(functional, name) for name in PHASES]
    patches += [(value_check.ValueCheck, "raise_if_failed"), (functional.FusedCrossEntropyFunction, "apply"),
                (functional.FusedCrossEntropyFunction, "forward"), (reference, "cast")]
    # apply is inherited (a classmethod of autograd.Function): the wrapper, set on the class, calls it bound, and
    # deleting the wrapper brings it back.
    own = [(owner, name, owner.__dict__.get(name)) for owner, name in patches]
    try:
        for owner, name, _ in own:
            setattr(owner, name, timed(name, getattr(owner, name)))
        yield
    finally:
        for owner, name, original in own:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def calls(x, target, backend):
    """{label: (fn, checks)}: each op alone, the API per grad_mode with and without the value checks, and eager."""
    ops = backend_ops(backend)
    leaf = x.detach().clone().requires_grad_(True)
    x3, t2 = x.view(x.shape[0], x.shape[1], -1), target.view(x.shape[0], -1)

    def api(grad_mode, backward):
        def run():
            loss = fused_xent.cross_entropy(leaf, target, grad_mode=grad_mode, backend=backend)
            if backward:
                loss.backward()
                leaf.grad = None
        return run

    def eager(backward):
        def run():
            loss = F.cross_entropy(leaf, target)
            if backward:
                loss.backward()
                leaf.grad = None
        return run

    table = {"op fwd": (lambda: ops.fwd(x3, t2, None, 1, -100, 0.0), None),
             "op fwd_grad": (lambda: ops.fwd_grad(x3, t2, None, 1, -100, 0.0), None)}
    for checks in ("1", "0"):
        for grad_mode in ("recompute", "in_forward"):
            for backward in (False, True):
                label = f"API {grad_mode} {'fwd+bwd' if backward else 'fwd'}, checks {'on' if checks == '1' else 'off'}"
                table[label] = (api(grad_mode, backward), checks)
    table["eager fwd"] = (eager(False), None)
    table["eager fwd+bwd"] = (eager(True), None)
    return table


def value_check_ops(x, target, backend):
    """{label: fn}: the value check (fused_xent._value_check.ValueCheck) of `backend`'s calls whole, and the ops it
    runs one at a time: for the CUDA backend the extension's one-kernel op, else (and for comparison) a handful of
    PyTorch ops."""
    flat = target.view(-1)
    filled = flat.masked_fill(flat == -100, 0)
    extrema = list(filled.aminmax())
    summary = torch.stack(extrema)
    pinned = summary.is_cuda
    on_host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=pinned)
    problem = validate.prepare(x, target, None, -100, "mean", 0.0, False)
    table = {
        "target == ignore_index": lambda: flat == -100,
        "masked_fill(target == ignore_index)": lambda: flat.masked_fill(flat == -100, 0),
        "aminmax": lambda: filled.aminmax(),
        "stack": lambda: torch.stack(extrema),
        "empty (pinned on a GPU)": lambda: torch.empty(summary.shape, dtype=summary.dtype, pin_memory=pinned),
        "copy to host": lambda: on_host.copy_(summary, non_blocking=pinned),
        "prepare": lambda: validate.prepare(x, target, None, -100, "mean", 0.0, False),
        "ValueCheck, started and read": lambda: value_check.ValueCheck(problem, True, backend).raise_if_failed(),
    }
    if summary.is_cuda:
        table["event, made and recorded"] = lambda: torch.cuda.Event().record()
    kernel = value_check.VALUE_CHECK_KERNELS.get(backend)
    if kernel is not None:
        table["value_check op (one kernel, csrc/cuda/xent_checks.cu)"] = lambda: kernel(target, None, -100, x.shape[1])

        def with_python_ops():
            with mock.patch.dict(value_check.VALUE_CHECK_KERNELS, clear=True):
                value_check.ValueCheck(problem, True, backend).raise_if_failed()

        table["ValueCheck with PyTorch ops instead"] = with_python_ops
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="default: cuda on a GPU, cpu on the CPU")
    parser.add_argument("--shape", default="8192x128256")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="also write the report to OUT/host_overhead.md")
    args = parser.parse_args()
    backend = args.backend or ("cuda" if args.device == "cuda" else "cpu")
    n, c = map(int, args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=generator).to(args.device, dtype)
    target = torch.randint(0, c, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < 0.1] = -100  # padding, as in a language-model batch
    target = target.to(args.device)
    probe = Probe(args.device, args.repeats)

    lines = [f"Host overhead, {env_info.device_name(args.device)}, {args.shape} {args.dtype}, backend {backend}, "
             f"median of {args.repeats}, the device idle before each call", "",
             "| call | ms until the device is done | host us until return |", "|---|--:|--:|"]
    for label, (fn, checks) in calls(x, target, backend).items():
        with env_info.environment_variable("FUSED_XENT_CHECK_VALUES", checks):
            latency_ms, host_us = probe.measure(fn)
        lines.append(f"| {label} | {latency_ms:.3f} | {host_us:.0f} |")

    phases: dict[str, list[float]] = {}
    leaf = x.detach().clone().requires_grad_(True)
    with phase_timers(phases), env_info.environment_variable("FUSED_XENT_CHECK_VALUES", "1"):
        _, whole = probe.measure(lambda: fused_xent.cross_entropy(leaf, target, backend=backend))
    lines += ["", f"Phases of an API recompute forward, checks on (host us; the whole call {whole:.0f} with the "
              "timers):", "", "| phase | host us |", "|---|--:|"]
    lines += [f"| {name} | {statistics.median(values):.0f} |" for name, values in phases.items()]

    lines += ["", "The value check's ops, one at a time:", "", "| op | host us |", "|---|--:|"]
    for label, fn in value_check_ops(x, target, backend).items():
        lines.append(f"| {label} | {probe.measure(fn)[1]:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
