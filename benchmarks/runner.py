"""Runs the benchmark that bench.py's arguments describe: gate, time and measure each provider on each problem."""

import datetime
import gc
import os
import sys
import time

import torch

from fused_xent._value_check import CHECK_VALUES_ENV, value_checks_enabled

import correctness
import env_info
import progress as progress_mod
import providers as providers_mod
import report
import shapes
import timing
from report import Row


def _fail(message: str) -> int:
    print(f"bench.py: error: {message}", file=sys.stderr)
    return 2


def first_line(error: Exception) -> str:
    """The first line of an exception's message ('' for a bare assert)."""
    return str(error).partition("\n")[0]


def _check_choices(kind: str, chosen: list[str], allowed) -> str | None:
    unknown = [item for item in chosen if item not in allowed]
    return f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(allowed)}" if unknown else None


def _memory_needed(case: shapes.Case, with_grad: bool) -> int:
    """A rough upper bound: inputs, a copy for in-place providers, the worst provider's temporaries (the pure-PyTorch
    fused backend and eager hold a few logits-sized tensors) and the float32 reference gradient."""
    return 5 * case.logits_bytes + (4 * case.numel if with_grad else 0)


class CaseRunner:
    def __init__(self, device, modes, repeats, budget_s, results: report.Results, progress, ignored=0.0,
                 queued=False):
        self.device, self.modes, self.repeats, self.budget_s = device, modes, repeats, budget_s
        self.ignored, self.queued = ignored, queued
        self.results, self.progress = results, progress
        self.timer, self.flusher = timing.Timer(device), timing.CacheFlusher(device)

    def _row(self, provider, case, mode, metric, median, p20=float("nan"), p80=float("nan"), unit="", note=""):
        self.results.add(Row(provider, case.family, case.label, case.dtype_name, mode, metric, median, p20, p80,
                             unit, note))

    def _not_timed(self, provider, case, verdict: str):
        self._row(provider.name, case, "-", "verdict", float("nan"), note=verdict)
        self.progress.update(len(self.modes))

    def run(self, case: shapes.Case, chosen: list):
        backward = any(mode != "fwd" for mode in self.modes)
        # A provider that makes its gradient in the forward makes it in a fwd-only run too, so it is checked too.
        with_grad = backward or any(provider.grad_in_forward for provider in chosen)
        needed, available = _memory_needed(case, with_grad), env_info.available_memory(self.device)
        if needed > 0.8 * available:
            for provider in chosen:
                self._not_timed(provider, case, f"SKIPPED: needs ~{needed / 1e9:.1f} GB, "
                                                f"{available / 1e9:.1f} GB available")
            self.progress.update(1)
            return
        logits, target = shapes.make_inputs(case, self.device, ignored=self.ignored)
        live = self._gate(case, chosen, logits, target, with_grad, backward)
        self._time_copy(case, logits)
        for provider in live:
            self._measure(case, provider, logits, target)
        self._speedups(case, live)
        del logits, target
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _gate(self, case, chosen, logits, target, with_grad, backward) -> list:
        """Providers whose loss, and gradient wherever the run computes one (a mode with backward, or a provider
        that makes it in the forward), match PyTorch in fp64 on this problem; the others get a verdict."""
        reference = correctness.Reference(logits, target, with_grad)
        live = []
        for provider in chosen:
            if provider.rows_only and len(case.shape) != 2:
                self._not_timed(provider, case, "SKIPPED: takes (N, C) logits only")
                continue
            try:
                provider.start_case()
                if provider.compiles:
                    self._warm_up_compile(case, provider, logits, target)
                verdict = correctness.check(provider, logits, target, reference, case.dtype_name,
                                            backward or provider.grad_in_forward)
            except Exception as error:  # a provider that crashes is reported, and the others still run
                self._not_timed(provider, case, f"FAILED: {type(error).__name__}: {first_line(error)}")
                continue
            self._row(provider.name, case, "-", "loss_err", verdict.loss_err, unit="relative")
            if verdict.grad_err is not None:
                self._row(provider.name, case, "-", "grad_err", verdict.grad_err, unit="relative")
            if verdict.ok:
                live.append(provider)
                self._row(provider.name, case, "-", "verdict", float("nan"), note="ok")
            else:
                self._not_timed(provider, case, f"WRONG: {verdict.message}")
        return live

    def _warm_up_compile(self, case, provider, logits, target):
        started = time.perf_counter()
        workload = timing.Workload(provider, logits, target)
        workload.step("fwd+bwd")  # compiles the forward and the backward graph
        self.timer.sync()
        self._row(provider.name, case, "-", "compile_time", time.perf_counter() - started, unit="s",
                  note="first fwd+bwd call (Inductor's on-disk cache may hit), excluded from the timings")

    def _time_copy(self, case, logits):
        stats = timing.time_copy(logits, self.timer, self.flusher, min(self.budget_s, 1.0), self.queued)
        self._row("copy", case, "copy", "time", stats.median * 1e3, stats.p20 * 1e3, stats.p80 * 1e3, "ms")
        moved = 2 * case.logits_bytes
        self._row("copy", case, "copy", "bandwidth", moved / stats.median / 1e9, moved / stats.p80 / 1e9,
                  moved / stats.p20 / 1e9, "GB/s")
        self.progress.update(1)

    def _measure(self, case, provider, logits, target):
        workload = timing.Workload(provider, logits, target)
        copy_bandwidth = self.results.value("copy", case, "copy", "bandwidth")
        for mode in self.modes:
            try:
                peak, estimate = timing.peak_memory(workload, mode, self.timer)
                stats = timing.time_steps(workload, mode, self.timer, self.flusher, estimate, self.repeats,
                                          self.budget_s, self.queued)
            except Exception as error:
                self._row(provider.name, case, mode, "verdict", float("nan"),
                          note=f"FAILED: {type(error).__name__}: {first_line(error)}")
                self.progress.update(1)
                continue
            ms = [value * 1e3 for value in (stats.median, stats.p20, stats.p80)]
            self._row(provider.name, case, mode, "time", *ms, "ms", note=f"{stats.samples} steps")
            moved = timing.bytes_moved(provider.traffic, mode, case.logits_bytes, case.target_bytes)
            if moved:
                bandwidth = moved / stats.median / 1e9
                self._row(provider.name, case, mode, "bandwidth", bandwidth, moved / stats.p80 / 1e9,
                          moved / stats.p20 / 1e9, "GB/s", note=f"{moved} bytes")
                self._row(provider.name, case, mode, "copy_fraction", 100 * bandwidth / copy_bandwidth, unit="%")
            if peak is not None:
                self._row(provider.name, case, mode, "peak_mem", peak / 1e6, unit="MB")
            self.progress.update(1)
        del workload
        gc.collect()

    def _speedups(self, case, live):
        makes_grad_in_forward = {provider.name for provider in live if provider.grad_in_forward}
        for baseline in report.BASELINES:
            for provider in live:
                for mode in self.modes:
                    if mode == "bwd" and {baseline, provider.name} & makes_grad_in_forward:
                        continue  # a backward that only scales the gradient made in the forward: see Method
                    ratio = (self.results.value(baseline, case, mode, "time")
                             / self.results.value(provider.name, case, mode, "time"))
                    if ratio == ratio:  # not NaN: both were timed
                        self._row(provider.name, case, mode, f"speedup_vs_{baseline}", ratio, unit="x",
                                  note=f"{baseline} median / {provider.name} median")


def _method_notes(device, chosen, provider_notes, budget_s, repeats, timing_method) -> list[str]:
    timer = "time.perf_counter" if device == "cpu" else timing.TIMING_METHODS[timing_method]
    count = f"{repeats} steps" if repeats else f"as many steps as fit in {budget_s:g} s (3 to 50)"
    checks = "on (the default)"
    if not value_checks_enabled():
        checks = f"OFF ({CHECK_VALUES_ENV}={os.environ[CHECK_VALUES_ENV]})"
    return [
        f"Times: {timer}; median and p20/p80 over {count}, after an untimed warm-up step; a 64 MiB (GPU: 256 MiB) "
        "buffer is overwritten before each step so no problem is timed from a warm cache.",
        "fwd = the loss forward of a training step (logits require grad, so eager saves its log-softmax and the "
        "in_forward/inplace modes compute the gradient); bwd = loss.backward() alone after an untimed forward; "
        "fwd+bwd = both. The gradient is a fresh buffer each step (`.grad` is reset to None, autograd allocates "
        "it), so the allocator's cost is counted as in training: a buffer of 32 MiB or more is mapped and "
        "page-faulted in afresh every step; a smaller one comes from glibc's heap, whose freed pages a step reuses "
        "or faults in anew as the history of allocations has it (medians of problems of a few MB can move by up to "
        "a third with it; MALLOC_MMAP_THRESHOLD_ fixes glibc's regime). Providers that write the gradient over the "
        "logits get fresh logits copied into their (pre-allocated) input before the timer starts: that copy is "
        "not timed.",
        "Speedup = baseline (eager, compile, Liger) median / provider median, measured in the same run; > 1 is "
        "faster. None in the bwd mode where either makes the gradient in the forward (in_forward, inplace, "
        "Liger): its backward only scales it, and a ratio to a full backward would read as a speedup.",
        timing.BYTE_MODEL,
        timing.GPU_MEMORY_METHOD if device == "cuda" else timing.CPU_MEMORY_METHOD,
        "Correctness gate: before timing, each provider's mean loss, and its gradient wherever the run computes one "
        "(fwd+bwd and bwd modes; in the fwd mode too for in_forward / inplace / Liger, which make it in the "
        "forward), on the benchmark's inputs against F.cross_entropy in float64; relative tolerance (the loss's "
        "error over max(1, |loss|); the gradient's largest error over its largest entry, and its error's 2-norm "
        "over its 2-norm) "
        + ", ".join(f"{k} {v:g}" for k, v in correctness.TOLERANCE.items())
        + ". WRONG providers are not timed.",
        "Every provider runs in one process under the same allocator settings (see 'allocator' above).",
        f"fused_xent's data-dependent input checks (on a GPU: one host sync per call, after the loss kernels are "
        f"queued) were {checks}.",
    ] + [f"{p.name}: {p.note}" for p in chosen] + provider_notes


def file_stem(device: str, full: bool, selection: list[tuple[list[str], list[str]]], ignored: float,
              autocast: bool, thp: bool, synced: bool = False, threads: int | None = None) -> str:
    """<device>-<date>[-full][-<selection>][-ignoredNN][-threadsN][-autocast][-thp][-synced]. `selection` pairs what
    this run chose (families, dtypes, modes, providers) with what the default run (quick or --full) chooses; each
    that differs is named, its items joined by commas, so a partial run never overwrites the same day's default
    tables (or those of another selection). NN: the percent of targets ignored (0p1 for 0.001). `threads`: a thread
    count set by --threads. `synced`: a GPU run timed synchronized (--timing synced)."""
    parts = [device, datetime.date.today().isoformat()] + (["full"] if full else [])
    parts += [",".join(chosen) for chosen, default in selection if set(chosen) != set(default)]
    parts += [f"ignored{100 * ignored:g}".replace(".", "p")] if ignored else []  # no dot: it would read as a suffix
    parts += [f"threads{threads}"] if threads else []
    parts += ["autocast"] if autocast else []
    parts += ["thp"] if thp else []
    parts += ["synced"] if synced else []
    return "-".join(parts)


def run(args) -> int:
    device, full = args.device, args.full
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    default_modes = list(timing.MODES) if full else ["fwd", "fwd+bwd"]
    families = args.families or list(shapes.FAMILIES)
    dtypes = args.dtypes or shapes.default_dtypes(device, full)
    modes = args.modes or default_modes
    for kind, chosen_items, allowed in (("family", families, shapes.FAMILIES), ("dtype", dtypes, shapes.DTYPES),
                                        ("mode", modes, timing.MODES)):
        if error := _check_choices(kind, chosen_items, allowed):
            return _fail(error)
    candidates, provider_notes = providers_mod.all_providers(device)
    chosen = providers_mod.select(candidates, device, full, args.providers)
    unknown = providers_mod.unknown_patterns(device, args.providers)
    if unknown or not chosen:
        return _fail(f"no provider matches {', '.join(unknown or args.providers)}; here: "
                     f"{', '.join(p.name for p in candidates)}")
    interpreted = [p.name for p in chosen if p.triton] if providers_mod.triton_interpreted() else []
    if interpreted:
        # The interpreter runs each kernel as Python on the host: its times say nothing about the Triton kernels.
        return _fail(f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} runs Triton's kernels in its Python "
                     f"interpreter, which would be timed as {', '.join(interpreted)}; unset TRITON_INTERPRET, or "
                     "leave those out with --providers")
    case_list = shapes.cases(device, full, families, dtypes)
    if not case_list:
        return _fail(f"no problem of families {', '.join(families)} in the {'full' if full else 'quick'} set of "
                     f"{device} (some families have shapes with --full only; see --list --full)")
    budget_s = args.budget or (3.0 if full else 1.5)
    names = [p.name for p in chosen]
    default_names = [p.name for p in providers_mod.select(candidates, device, full, None)]
    selection = [(families, list(shapes.FAMILIES)), (dtypes, shapes.default_dtypes(device, full)),
                 (modes, default_modes), (names, default_names)]
    synced = device == "cuda" and args.timing == "synced"
    stem = args.out / file_stem(device, full, selection, args.ignored, args.autocast, env_info.thp_enabled(), synced,
                                args.threads)
    if args.list:
        print("providers:", ", ".join(names))
        print("problems:", ", ".join(f"{c.family} {c.label} {c.dtype_name}" for c in case_list))
        print("modes:", ", ".join(modes))
        print("files:", f"{stem}.csv, {stem}.md, {stem}-<plot group>-<dtype>.png")
        return 0

    env = env_info.describe(device)
    warning = env_info.busy_warning() if device == "cpu" else None
    if warning:
        env["warning"] = warning
    print("\n".join(f"{key:<38} {value}" for key, value in env.items()))
    print("providers:", ", ".join(p.name for p in chosen), "|", "; ".join(provider_notes) or "")
    results = report.Results()
    args.out.mkdir(parents=True, exist_ok=True)
    notes = _method_notes(device, chosen, provider_notes, budget_s, args.repeats, args.timing)
    if args.ignored:
        notes.insert(0, f"Targets: {args.ignored:.0%} of the positions, at random, hold ignore_index -100. Bandwidth "
                        "still counts the bytes of every row.")
    if args.autocast:
        for provider in chosen:
            provider.autocast = True
        notes.insert(0, "Every loss runs under torch.autocast in the logits' dtype: PyTorch computes cross entropy "
                        "in float32 from a float32 copy of half-precision logits; fused_xent's default grad_mode "
                        "reads them as they are. Bandwidth counts the bytes of the logits as stored.")

    def write_tables(done: list[shapes.Case]):
        report.write_csv(stem.with_suffix(".csv"), results, env)
        report.write_markdown(stem.with_suffix(".md"), results, env, done, names, modes, notes,
                              f"fused_xent benchmark, {device}, {env['date']}")

    total = len(case_list) * (len(chosen) * len(modes) + 1)
    with progress_mod.progress_bar(total) as progress:
        case_runner = CaseRunner(device, modes, args.repeats, budget_s, results, progress, args.ignored,
                                 queued=args.timing == "queued")
        for done, case in enumerate(case_list, start=1):
            progress.set_description(f"{case.family} {case.label} {case.dtype_name}")
            case_runner.run(case, chosen)
            progress_mod.write("\n" + report.console_table(results, case, names, modes))
            write_tables(case_list[:done])  # after every problem: a run stopped early keeps what it measured
    env["load average at end (1, 5, 15 min)"] = env_info.load_average()
    write_tables(case_list)
    plots = report.write_plots(stem, results, case_list, names, modes)
    print("\nwrote", ", ".join(str(p) for p in [stem.with_suffix(".csv"), stem.with_suffix(".md"), *plots]))
    return 0
