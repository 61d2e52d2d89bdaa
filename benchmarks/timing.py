"""How one provider is timed on one problem: the step each mode runs, timers, cache flushing, peak memory."""

import ctypes
import gc
import time
from dataclasses import dataclass

import torch

MODES = ("fwd", "bwd", "fwd+bwd")

BYTE_MODEL = (
    "Effective bandwidth = bytes / median time, with bytes the least traffic the provider's algorithm needs "
    "(L = logits bytes, T = int64 target bytes): recompute (fused recompute, eager, compile): fwd L+T, bwd 2L+T "
    "(read logits, write gradient), fwd+bwd 3L+2T; in_forward / inplace / liger (gradient made in the forward): "
    "fwd 2L+T, bwd 0 (no bandwidth shown), fwd+bwd 2L+T (a pass scaling the gradient by a non-unit upstream "
    "gradient is not counted). Copy: dst.copy_(src) of the logits into an existing buffer, 2L."
)


def bytes_moved(traffic: str, mode: str, logits_bytes: int, target_bytes: int) -> int:
    big, small = logits_bytes, target_bytes
    if traffic == "recompute":
        return {"fwd": big + small, "bwd": 2 * big + small, "fwd+bwd": 3 * big + 2 * small}[mode]
    return {"fwd": 2 * big + small, "bwd": 0, "fwd+bwd": 2 * big + small}[mode]


@dataclass(frozen=True)
class Stats:
    median: float  # seconds
    p20: float
    p80: float
    samples: int


def summarize(seconds: list[float]) -> Stats:
    """Median and p20/p80 (linear interpolation, as numpy.percentile; torch's, since a GPU image may lack NumPy)."""
    quantiles = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    p20, median, p80 = torch.quantile(torch.tensor(seconds, dtype=torch.float64), quantiles).tolist()
    return Stats(median, p20, p80, len(seconds))


class Timer:
    """Wall time of a region: perf_counter on the CPU, CUDA events (with a synchronize) on the GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        if self.cuda:
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.t0


class CacheFlusher:
    """Overwrites a buffer larger than the last-level cache before each timed call, so small problems are timed
    from memory (as in training, where other layers run between two loss calls), not from a warm cache."""

    def __init__(self, device: str):
        self.buffer = torch.empty((256 if device == "cuda" else 64) << 20, dtype=torch.uint8, device=device)

    def flush(self):
        self.buffer.fill_(1)


class Workload:
    """One provider on one problem's inputs. Each step gets what a training step has: a gradient that autograd
    allocates afresh, and (for providers that overwrite the logits) fresh logits copied in before the timer starts."""

    def __init__(self, provider, logits: torch.Tensor, target: torch.Tensor):
        self.provider, self.pristine, self.target = provider, logits, target
        self.leaf = logits.detach().requires_grad_(True)
        # Logits to overwrite are a copy made by an op, as a model's logits are (fused_xent's 'inplace' refuses a
        # leaf, as PyTorch's in-place ops do); clone() hands their gradient to the leaf without a copy.
        self.x = self.leaf.clone() if provider.overwrites_logits else self.leaf

    def reset(self):
        self.leaf.grad = None
        if self.provider.overwrites_logits:
            with torch.no_grad():
                self.x.copy_(self.pristine)

    def forward(self) -> torch.Tensor:
        return self.provider(self.x, self.target)

    def step(self, mode: str):
        """The whole step of a mode, untimed (bwd needs its forward)."""
        self.run("fwd" if mode == "fwd" else "fwd+bwd", None)

    def prepare(self, mode: str) -> torch.Tensor | None:
        """What a step does before its timer starts: a fresh gradient (and logits), and bwd's forward."""
        self.reset()
        return self.forward() if mode == "bwd" else None

    def run(self, mode: str, loss: torch.Tensor | None) -> torch.Tensor:
        """The timed part of a step; returns the loss, whose graph the caller frees after the timer stops (training
        frees it too, but outside the loss)."""
        if mode == "fwd":
            return self.forward()
        if mode == "bwd":
            loss.backward()
            return loss
        loss = self.forward()
        loss.backward()
        return loss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None

CPU_MEMORY_METHOD = (
    "CPU peak memory: growth of the process's resident set during one step of the mode (bwd: with its forward) "
    "above what was resident with only the inputs alive (Linux VmHWM, reset through /proc/self/clear_refs; glibc "
    "malloc_trim(0) first, so freed heap pages are returned and reuse of them still counts). It counts every page "
    "the step touches, inside PyTorch's allocator or not; a huge page counts 2 MiB."
)
GPU_MEMORY_METHOD = (
    "GPU peak memory: torch.cuda.max_memory_allocated() during one step of the mode (bwd: with its forward) minus "
    "memory_allocated() before it, with only the inputs alive (PyTorch's caching allocator; memory a kernel "
    "allocates outside it is not seen)."
)


def peak_memory(workload: Workload, mode: str, timer: Timer) -> tuple[float | None, float]:
    """Peak bytes above the inputs during one untimed step of `mode` (None where it cannot be measured), and that
    step's wall time, which serves as the warm-up and as the estimate that sizes the timed run."""
    workload.reset()
    gc.collect()
    if timer.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if _malloc_trim is not None:
            _malloc_trim(0)
        base = _status_kib("VmRSS") * 1024 if _reset_rss_high_water_mark() else None
    started = time.perf_counter()
    workload.step(mode)
    timer.sync()
    elapsed = time.perf_counter() - started
    if timer.cuda:
        return float(torch.cuda.max_memory_allocated() - base), elapsed
    return (None if base is None else float(_status_kib("VmHWM") * 1024 - base)), elapsed


TIMING_METHODS = {
    "queued": "CUDA events, the steps queued back to back (the host runs ahead, as in training, one synchronize at "
              "the end, as triton.testing.do_bench: device time wherever the device's work per step outlasts the "
              "host's; a call that synchronizes inside, as fused_xent's value check does, lets the host run only "
              "that far ahead)",
    "synced": "CUDA events, the device synchronized before each step (the host's time to launch a call counts: "
              "single-call latency from an idle GPU)",
}


def timed_runs(run, count: int, timer: Timer, flusher: CacheFlusher, queued: bool, prepare=lambda: None) -> list:
    """Seconds of `count` calls of run(prepare()), each after an untimed prepare() and a cache flush.

    Synced (and always on the CPU, whose host is its device): the device is idle when each call starts, so the time
    includes the host's work until the call's first kernel runs. Queued (CUDA): every call is queued behind its flush
    without waiting for the device. While a step's device work (the flush, ~0.1 ms on an H200, and the call's
    kernels) outlasts the host's work for it, the device finds each call's kernels already launched and the events
    time the device's work alone, as in a training step where the host is ahead of the GPU; a host-bound call (tiny
    problems) still shows its host time. A call that synchronizes inside (fused_xent's value check; in_forward's
    test of a unit upstream gradient until 2026-11-30, now made on the device) lets the host run only that far
    ahead: the GPU waits for the host's work after that point,
    where a provider without a sync is up to the whole queue ahead.
    What run returns is kept until its time is taken (queued: until its end is recorded), so that freeing it (a
    graph) is not timed."""
    if not (queued and timer.cuda):
        samples = []
        for _ in range(count):
            prepared = prepare()
            flusher.flush()
            timer.sync()
            timer.start()
            kept = run(prepared)
            samples.append(timer.stop())
            del prepared, kept
        return samples
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for begin, end in events:
        prepared = prepare()
        flusher.flush()
        begin.record()
        kept = run(prepared)
        end.record()
        del prepared, kept
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


def time_steps(workload: Workload, mode: str, timer: Timer, flusher: CacheFlusher, estimate_s: float,
               repeats: int | None, budget_s: float, queued: bool = False) -> Stats:
    """Median and spread over `repeats` steps, or as many as fit in `budget_s` (at least 3, at most 50)."""
    count = repeats or int(min(50, max(3, budget_s / max(estimate_s, 1e-6))))
    # One more warm-up where it is cheap; and, queued, the first call, which no earlier one hides the launch of.
    warm_up = 1 if estimate_s < 0.05 or (queued and timer.cuda) else 0
    samples = timed_runs(lambda loss: workload.run(mode, loss), warm_up + count, timer, flusher, queued,
                         prepare=lambda: workload.prepare(mode))
    return summarize(samples[warm_up:])


def time_copy(logits: torch.Tensor, timer: Timer, flusher: CacheFlusher, budget_s: float,
              queued: bool = False) -> Stats:
    """The device's copy speed on this problem's size: dst.copy_(src) into an existing buffer, timed as the steps
    are (at least 5 copies, at most 50, within budget_s)."""
    dst = torch.empty_like(logits)
    dst.copy_(logits)  # touches dst's pages once, so that the copies below do not fault them in
    timer.sync()
    started = time.perf_counter()
    dst.copy_(logits)
    timer.sync()
    estimate = time.perf_counter() - started
    count = int(min(50, max(5, budget_s / max(estimate, 1e-6))))
    # Queued, the first copy is dropped as the first step is (time_steps).
    warm_up = 1 if queued and timer.cuda else 0
    return summarize(timed_runs(lambda _: dst.copy_(logits), warm_up + count, timer, flusher, queued)[warm_up:])
