"""The benchmark's own machinery on the CPU: a small end-to-end run, its outputs, and the correctness gate that keeps
a wrong provider out of the timings. (The GPU path runs in benchmarks/gpu_check.sh on a lent GPU.)"""

import csv
import datetime
import importlib.util
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_xent

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench  # noqa: E402
import correctness  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import e2e  # noqa: E402
import gpu_kernel_table  # noqa: E402
import host_overhead  # noqa: E402
import providers  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402
import shapes  # noqa: E402
import timing  # noqa: E402

needs_cpu_kernel = pytest.mark.skipif("cpu" not in fused_xent.available_backends(), reason="extension not built")


@needs_cpu_kernel
def test_bench_runs_end_to_end(tmp_path):
    """With a third of the targets ignored, which every provider's verdict must survive."""
    args = [sys.executable, str(BENCHMARKS / "bench.py"), "--families", "cls", "--providers", "fused-cpu,eager",
            "--modes", "fwd,fwd+bwd", "--repeats", "3", "--ignored", "0.3", "--out", str(tmp_path)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (table,) = tmp_path.glob("cpu-*-cls-fused-cpu,eager-ignored30.csv")  # a partial run: its selection is named
    rows = list(csv.DictReader(table.open()))
    assert {"provider", "shape", "dtype", "mode", "metric", "median", "p20", "p80", "device_name", "torch_version",
            "git_commit", "date"} <= set(rows[0])

    def value(provider, mode, metric):
        (row,) = [r for r in rows if (r["provider"], r["mode"], r["metric"]) == (provider, mode, metric)]
        return row

    for provider in ("fused-cpu", "eager"):
        assert value(provider, "-", "verdict")["note"] == "ok"
        for mode in ("fwd", "fwd+bwd"):
            time_row = value(provider, mode, "time")
            assert float(time_row["p20"]) <= float(time_row["median"]) <= float(time_row["p80"])
            assert float(value(provider, mode, "bandwidth")["median"]) > 0
    fused_ms, eager_ms = (float(value(p, "fwd+bwd", "time")["median"]) for p in ("fused-cpu", "eager"))
    speedup = float(value("fused-cpu", "fwd+bwd", "speedup_vs_eager")["median"])
    assert speedup == pytest.approx(eager_ms / fused_ms, rel=1e-4)
    assert float(value("copy", "copy", "bandwidth")["median"]) > 0
    markdown = next(tmp_path.glob("cpu-*.md")).read_text()
    assert "| provider | mode | median ms | p20-p80 ms | vs eager |" in markdown and "65536x10" in markdown
    assert "Targets: 30% of the positions" in markdown
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed: no plots" in run.stderr
    else:
        assert list(tmp_path.glob("cpu-*-cls-fp32.png"))


def _cls_problem():
    case = shapes.Case("cls", (512, 10), "fp32")
    return shapes.make_inputs(case, "cpu")


def test_gate_passes_pytorch_and_rejects_a_wrong_provider():
    logits, target = _cls_problem()
    reference = correctness.Reference(logits, target, with_grad=True)
    right = providers.Provider("right", F.cross_entropy, traffic="recompute")
    assert correctness.check(right, logits, target, reference, "fp32", with_grad=True).ok
    off_by_a_bit = providers.Provider("wrong", lambda x, t: F.cross_entropy(x, t) * 1.001, traffic="recompute")
    verdict = correctness.check(off_by_a_bit, logits, target, reference, "fp32", with_grad=True)
    assert not verdict.ok and "loss error" in verdict.message and "grad error" in verdict.message


def test_gate_averages_over_the_targets_that_count():
    case = shapes.Case("cls", (4096, 10), "fp32")
    logits, target = shapes.make_inputs(case, "cpu", ignored=0.5)
    assert 0.4 < (target == shapes.IGNORE_INDEX).float().mean() < 0.6
    reference = correctness.Reference(logits, target, with_grad=True)
    right = providers.Provider("right", F.cross_entropy, traffic="recompute")
    assert correctness.check(right, logits, target, reference, "fp32", with_grad=True).ok
    over_every_position = providers.Provider(
        "wrong", lambda x, t: F.cross_entropy(x, t, reduction="sum") / t.numel(), traffic="recompute")
    assert not correctness.check(over_every_position, logits, target, reference, "fp32", with_grad=True).ok


def test_gate_sees_the_small_entries_of_wide_rows():
    """A gradient right in its large entries but zero below 9e-5 of the largest (most of a 32000-class row, 13% of
    its mass): within the float32 tolerance of the largest entry everywhere, and still rejected."""
    logits, target = shapes.make_inputs(shapes.Case("llm", (16, 32000), "fp32"), "cpu")
    reference = correctness.Reference(logits, target, with_grad=True)

    class DropSmallEntries(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad.masked_fill(grad.abs() < 9e-5 * grad.abs().max(), 0.0)

    dropping = providers.Provider("wrong", lambda x, t: F.cross_entropy(DropSmallEntries.apply(x), t),
                                  traffic="recompute")
    verdict = correctness.check(dropping, logits, target, reference, "fp32", with_grad=True)
    assert verdict.loss_err < 1e-6 and not verdict.ok and "grad error" in verdict.message
    right = providers.Provider("right", F.cross_entropy, traffic="recompute")
    assert correctness.check(right, logits, target, reference, "fp32", with_grad=True).ok


@needs_cpu_kernel
def test_autocast_providers_compute_under_autocast():
    """--autocast: every call runs under torch.autocast in the logits' dtype (PyTorch's loss is then float32), and
    the gate still passes each provider."""
    logits, target = _cls_problem()
    logits = logits.bfloat16()
    reference = correctness.Reference(logits, target, True)
    for provider in (providers._eager(), providers._fused("cpu", "recompute"), providers._fused("cpu", "inplace")):
        provider.autocast = True
        x = logits.clone().requires_grad_(True) * 1
        assert provider(x, target).dtype == torch.float32, provider.name
        assert correctness.check(provider, logits, target, reference, "bf16", with_grad=True).ok, provider.name


@pytest.mark.parametrize("argv, message", [
    (["--providers", "fused-cpu,eagr"], "no provider matches eagr; here: "),
    (["--providers", "nope*"], "no provider matches nope*; here: "),
    (["--providers", "eager,fused-cuda"], "no provider matches fused-cuda; here: "),  # not one for CPU tensors
    (["--families", "seq"], "no problem of families seq in the quick set of cpu"),
])
def test_a_selection_that_drops_something_asked_for_is_a_usage_error(argv, message, capsys):
    assert runner.run(bench.parse_args(["--list", "--out", "results", *argv])) == 2
    assert f"bench.py: error: {message}" in capsys.readouterr().err


def test_a_provider_that_cannot_run_here_is_left_out_with_a_note(capsys):
    """Liger on the CPU, as on a GPU machine without its wheel (gpu_check.sh names it): a provider that exists but
    cannot run here is left out, as the default set leaves it out, and the run goes on. (fused-cuda on CPU tensors
    is no provider at all: an error, as above.)"""
    assert runner.run(bench.parse_args(["--list", "--out", "results", "--providers", "eager,liger"])) == 0
    assert "providers: eager\n" in capsys.readouterr().out


def test_gate_rejects_nan():
    logits, target = _cls_problem()
    reference = correctness.Reference(logits, target, with_grad=False)
    nan_loss = providers.Provider("nan", lambda x, t: F.cross_entropy(x, t) * float("nan"), traffic="recompute")
    assert not correctness.check(nan_loss, logits, target, reference, "fp32", with_grad=False).ok


class _NoProgress:
    def update(self, steps):
        pass


def test_a_crashing_provider_is_reported_and_the_others_still_run():
    """Even an exception without a message (a bare assert) becomes a FAILED verdict, not the end of the run."""
    def crash(logits, target):
        raise AssertionError()

    results = report.Results()
    case = shapes.Case("cls", (512, 10), "fp32")
    case_runner = runner.CaseRunner("cpu", ["fwd"], repeats=3, budget_s=0.01, results=results, progress=_NoProgress())
    case_runner.run(case, [providers.Provider("crash", crash, traffic="recompute"),
                           providers.Provider("eager", F.cross_entropy, traffic="recompute")])
    assert results.get("crash", case, "-", "verdict").note == "FAILED: AssertionError: "
    assert results.get("eager", case, "-", "verdict").note == "ok"
    assert results.value("eager", case, "fwd", "time") > 0


def test_a_fwd_only_run_checks_the_gradient_made_in_the_forward():
    """in_forward / inplace (and Liger) compute the gradient in the forward, so even `--modes fwd` times a gradient:
    the gate checks it. A recompute provider makes none in a fwd-only run, so its gradient is not judged there."""
    def skewed_grad(logits, target):  # the right loss, a gradient off by 1e-3 everywhere
        return F.cross_entropy(logits, target) + (logits.sum() - logits.sum().detach()) * 1e-3

    results = report.Results()
    case = shapes.Case("cls", (512, 10), "fp32")
    case_runner = runner.CaseRunner("cpu", ["fwd"], repeats=3, budget_s=0.01, results=results, progress=_NoProgress())
    case_runner.run(case, [providers.Provider("skewed-in_forward", skewed_grad, traffic="in_forward"),
                           providers.Provider("skewed-recompute", skewed_grad, traffic="recompute"),
                           providers.Provider("eager-in_forward", F.cross_entropy, traffic="in_forward")])
    assert results.get("skewed-in_forward", case, "-", "verdict").note.startswith("WRONG: grad error")
    assert results.get("skewed-recompute", case, "-", "verdict").note == "ok"
    assert results.get("eager-in_forward", case, "-", "verdict").note == "ok"
    assert results.value("eager-in_forward", case, "-", "grad_err") < 1e-6


def test_no_bwd_ratio_where_a_gradient_made_in_the_forward_is_only_scaled():
    """A backward that only scales the gradient made in the forward (in_forward, inplace, Liger) is a near no-op: its
    ratio to a full backward, either way round, would read as a speedup. fwd+bwd ratios stay for everyone."""
    results = report.Results()
    case = shapes.Case("cls", (512, 10), "fp32")
    case_runner = runner.CaseRunner("cpu", ["bwd", "fwd+bwd"], repeats=3, budget_s=0.01, results=results,
                                    progress=_NoProgress())
    made_in_forward = providers.Provider("made-in-forward", F.cross_entropy, traffic="in_forward")
    liger_like = providers.Provider("liger", F.cross_entropy, traffic="in_forward")
    case_runner.run(case, [providers._eager(), made_in_forward, liger_like])
    for provider, baseline in (("made-in-forward", "eager"), ("eager", "liger"), ("made-in-forward", "liger")):
        assert results.get(provider, case, "bwd", f"speedup_vs_{baseline}") is None, (provider, baseline)
        assert results.value(provider, case, "fwd+bwd", f"speedup_vs_{baseline}") > 0, (provider, baseline)
    assert results.value("eager", case, "bwd", "speedup_vs_eager") == 1.0


def test_bench_refuses_to_time_triton_s_interpreter():
    """Under TRITON_INTERPRET, Triton's kernels run as Python: a run that would time one stops with a usage error
    (also --list, which shows what a run would do); a run without Triton providers goes on."""
    pytest.importorskip("triton")

    def bench_list(*args):
        return subprocess.run([sys.executable, str(BENCHMARKS / "bench.py"), "--list", *args], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})

    refused = bench_list()  # the quick set has fused-triton beside fused-cpu when Triton is interpreted
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "bench.py: error: TRITON_INTERPRET=1" in refused.stderr and "fused-triton" in refused.stderr
    without_triton = bench_list("--providers", "eager")
    assert without_triton.returncode == 0, without_triton.stderr[-3000:]
    assert providers._compiled("cuda").triton and not providers._compiled("cpu").triton  # Inductor's GPU code


def _result_file(capsys, *args) -> str:
    """The file stem a bench.py run with these arguments writes (from --list)."""
    assert runner.run(bench.parse_args(["--list", "--out", "results", *args])) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("files: ")]
    return line.removeprefix("files: ").partition(".csv")[0]


def test_a_partial_run_does_not_overwrite_the_full_tables(capsys):
    """Each choice that differs from the default run's is in the file name; the default and --full names (which the
    README and RESULTS.md link) stay as they were."""
    day = datetime.date.today().isoformat()
    expected = {
        (): f"cpu-{day}",
        ("--full",): f"cpu-{day}-full",
        ("--modes", "fwd+bwd,fwd"): f"cpu-{day}",  # the default modes in another order
        ("--families", "cls"): f"cpu-{day}-cls",
        ("--full", "--families", "seq"): f"cpu-{day}-full-seq",
        ("--full", "--dtypes", "fp32", "--modes", "fwd+bwd"): f"cpu-{day}-full-fp32-fwd+bwd",
        ("--providers", "eager,compile", "--ignored", "0.5"): f"cpu-{day}-eager,compile-ignored50",
        ("--ignored", "0.001"): f"cpu-{day}-ignored0p1",  # not rounded away to a name that reads "none ignored"
        ("--ignored", "0.004"): f"cpu-{day}-ignored0p4",
        ("--threads", "1"): f"cpu-{day}-threads1",  # bench.py's advice on a busy machine: not the default's tables
    }
    for args, stem in expected.items():
        assert _result_file(capsys, *args) == str(Path("results") / stem), args


def test_a_run_writes_the_tables_it_names(tmp_path, capsys):
    """The files on disk carry the whole name --list gives, settings after the ignored fraction included."""
    args = ["--families", "cls", "--modes", "fwd", "--providers", "eager", "--repeats", "1", "--ignored", "0.001",
            "--threads", "1"]
    stem = Path(_result_file(capsys, *args)).name
    assert runner.run(bench.parse_args([*args, "--out", str(tmp_path)])) == 0
    assert {path.name for path in tmp_path.glob("*.csv")} | {path.name for path in tmp_path.glob("*.md")} == {
        f"{stem}.csv", f"{stem}.md"}


def test_timed_runs_time_each_call_of_what_its_preparation_gave():
    """Each call gets its own prepare()'s value, and what it returns (a loss and its graph) is still alive when its
    time is taken, so that freeing it is not timed. (On the CPU both methods are the wall clock; the queued one is
    checked on a GPU below.)"""

    class Kept:
        pass

    returned, alive_at_stop, seen = [], [], []

    class Timer(timing.Timer):
        def stop(self):
            alive_at_stop.append(returned[-1]() is not None)
            return super().stop()

    def run(value):
        kept = Kept()
        returned.append(weakref.ref(kept))
        seen.append(value)
        return kept

    samples = timing.timed_runs(run, 3, Timer("cpu"), timing.CacheFlusher("cpu"), queued=False,
                                prepare=iter(range(3)).__next__)
    assert seen == [0, 1, 2] and len(samples) == 3 and all(s > 0 for s in samples)
    assert alive_at_stop == [True] * 3 and all(ref() is None for ref in returned)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_queued_timing_hides_the_host_behind_a_busy_gpu_and_synced_timing_does_not():
    """A call that spends 20 ms on the host before its 1 ms kernel: queued behind 50 ms of earlier GPU work, the
    events see the kernel; synchronized before each call, they see the host's 20 ms too."""
    timer, flusher = timing.Timer("cuda"), timing.CacheFlusher("cuda")
    cycles_per_ms = 2_000_000  # an H200 at ~2 GHz; the bounds below allow a 3x slower clock

    def run(_):
        time.sleep(0.02)
        torch.cuda._sleep(cycles_per_ms)

    def busy_gpu():
        torch.cuda._sleep(50 * cycles_per_ms)

    # The first queued call is dropped, as time_steps drops it: on the H200 it saw the host's 20 ms (21.2 ms, the
    # next two 1.0), so something before it waited for the busy GPU (likely the lazy load of the flush's kernel).
    queued = timing.timed_runs(run, 4, timer, flusher, queued=True, prepare=busy_gpu)[1:]
    synced = timing.timed_runs(run, 3, timer, flusher, queued=False, prepare=busy_gpu)
    assert max(queued) < 0.01 and min(synced) > 0.02, (queued, synced)


def test_synced_gpu_tables_are_named_apart():
    day = datetime.date.today().isoformat()
    assert runner.file_stem("cuda", False, [], 0.0, False, False, synced=True) == f"cuda-{day}-synced"
    assert runner.file_stem("cuda", True, [], 0.0, False, False) == f"cuda-{day}-full"


@pytest.mark.parametrize("argv", [["--threads", "-1"], ["--threads", "0"], ["--repeats", "-1"], ["--repeats", "0"],
                                  ["--budget", "0"], ["--budget", "-2"]])
def test_bad_bench_flag_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"error: argument {argv[0]}: {argv[1]}: " in error and ("integer >= 1" in error or "number > 0" in error)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: 0: an integer >= 1 is needed"),
    (["--steps", "-5"], "argument --steps: -5: an integer >= 1 is needed"),
    (["--threads", "-1"], "argument --threads: -1: an integer >= 1 is needed"),
    (["--tasks", "lm,mt"], "--tasks 'lm,mt': a comma list of lm, seg is needed"),
    (["--tasks", ","], "--tasks ',': a comma list of lm, seg is needed"),
    (["--backend", "nope"], "--backend nope: choose one that runs on cpu tensors here"),
])
def test_bad_e2e_arguments_are_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        e2e.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_quick_provider_sets():
    """The quick set is the fastest backend in every grad mode plus the other compiled backends; never the slow
    pure-PyTorch reference beside a compiled kernel."""
    candidates, _ = providers.all_providers("cpu")
    chosen = [p.name for p in providers.select(candidates, "cpu", full=False, patterns=None)]
    backends = providers.fused_backends("cpu")
    if backends[0] == "cpu":
        assert chosen == ["fused-cpu", "fused-cpu-in_forward", "fused-cpu-inplace", "eager", "compile"]
    else:
        assert chosen == ["fused-torch", "eager", "compile"]
    everything = providers.select(candidates, "cpu", full=True, patterns=None)
    assert len(everything) == len(candidates)
    assert [p.name for p in providers.select(candidates, "cpu", False, ["eag*"])] == ["eager"]


def test_gpu_quick_set_has_the_target_shapes():
    table = {(c.family, c.shape, c.dtype_name) for c in shapes.cases("cuda", False, list(shapes.FAMILIES),
                                                                      shapes.default_dtypes("cuda", False))}
    for shape in ((8192, 128256), (4096, 256000)):
        assert ("llm", shape, "bf16") in table
    for dtype in ("fp32", "bf16"):
        assert ("seg", (16, 19, 512, 1024), dtype) in table


@needs_cpu_kernel
def test_sanitizer_workload_runs_on_the_cpu_kernel():
    """benchmarks/gpu_sanitize.py (run under compute-sanitizer on a GPU) makes valid calls of every op."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_sanitize.py"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "op calls, no error raised" in run.stdout


@needs_cpu_kernel
def test_gpu_kernel_table_runs_on_the_cpu_kernel():
    """benchmarks/gpu_kernel_table.py (run by gpu_check.sh on a GPU) measures and renders its table; here through the
    CPU kernel, on small problems like its own: rows, NCHW, channels_last, half the targets ignored."""
    from fused_xent._backends import backend_ops

    backends = {"cpu": backend_ops("cpu")}
    problems = [("rows", (64, 3000), torch.bfloat16, "contiguous", 0.5), ("spatial", (2, 19, 8, 8), torch.float32,
                "contiguous", 0.0), ("channels_last", (2, 19, 8, 8), torch.bfloat16, "channels_last", 0.0)]
    rows = []
    for problem in problems:
        rows += gpu_kernel_table.measure(*problem, 3, backends, device="cpu")
    assert [row[3] for row in rows[:4]] == ["fwd", "fwd+bwd recompute", "fwd+bwd in_forward", "fwd+bwd inplace"]
    assert all(row[4]["cpu"][0] > 0 for row in rows)  # each mode timed, none failed (NaN)
    table = gpu_kernel_table.render(rows, backends, 3, "the CPU").splitlines()
    assert "vs eager on the CPU" in table[0] and len(table) == 4 + len(rows)  # title, blank, header, rule
    assert "| channels_last | 2x19x8x8 (channels_last) | bfloat16 | fwd+bwd inplace |" in table[-1]


@needs_cpu_kernel
def test_host_overhead_report_runs_on_the_cpu_kernel(tmp_path, monkeypatch):
    """benchmarks/host_overhead.py (run by gpu_check.sh on a GPU) times every call and phase it lists, and leaves the
    front end as it found it (its phase timers wrap module functions and the autograd Function's apply)."""
    import fused_xent.functional as functional

    apply, prepare = functional.FusedCrossEntropyFunction.apply, functional.prepare
    run = subprocess.run([sys.executable, str(BENCHMARKS / "host_overhead.py"), "--device", "cpu", "--shape", "16x40",
                          "--dtype", "float32", "--repeats", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = (tmp_path / "host_overhead.md").read_text()
    for row in ("| op fwd |", "| API in_forward fwd+bwd, checks off |", "| eager fwd+bwd |", "| prepare |",
                "| apply |", "| start_value_check |", "| raise_if_failed |", "| ValueCheck, started and read |"):
        assert row in report, report

    phases = {}
    with host_overhead.phase_timers(phases):
        fused_xent.cross_entropy(torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, -100, 4]))
    assert {"prepare", "apply", "forward", "start_value_check"} <= phases.keys()
    assert functional.FusedCrossEntropyFunction.apply == apply and functional.prepare is prepare
    assert "apply" not in functional.FusedCrossEntropyFunction.__dict__
    assert isinstance(functional.FusedCrossEntropyFunction.__dict__["forward"], staticmethod)

    # Where the extension's one-kernel check serves the device (a GPU), its op and the PyTorch ops it replaces are
    # both timed: here a stand-in kernel serving the CPU.
    import fused_xent._value_check as value_check

    monkeypatch.setitem(value_check.VALUE_CHECK_KERNELS, "cpu", lambda *args: torch.zeros(2, dtype=torch.long))
    x, target = torch.randn(8, 5), torch.tensor([0, 1, -100, 4, 2, 2, 3, 0])
    timed = host_overhead.value_check_ops(x, target, "cpu")
    assert "ValueCheck with PyTorch ops instead" in timed
    assert "value_check op (one kernel, csrc/cuda/xent_checks.cu)" in timed
    for fn in timed.values():
        fn()
    assert "cpu" in value_check.VALUE_CHECK_KERNELS  # the stand-in is back after the PyTorch-ops timing


def test_gpu_kernel_table_times_a_variant_under_its_plan_for_its_backend_only(monkeypatch):
    """A variant row (e.g. CUDA's larger clusters) times its mode again with its plan in force, for the backend the
    plan belongs to; the other backends' cells stay empty (NaN), and the plan is undone."""
    import contextlib

    from fused_xent._backends import backend_ops

    entered = []

    @contextlib.contextmanager
    def plan():
        entered.append(True)
        yield

    variants = gpu_kernel_table._variants
    monkeypatch.setattr(gpu_kernel_table, "_variants", lambda label, shape, size: {"fwd, a plan": (("cpu",), plan)})
    backends = {"cpu": backend_ops("cpu"), "torch": backend_ops("torch")}
    rows = gpu_kernel_table.measure("rows", (16, 300), torch.float32, "contiguous", 0.0, 3, backends, device="cpu")
    (variant,) = [row for row in rows if row[3] == "fwd, a plan"]
    assert entered and variant[4]["cpu"][0] > 0 and variant[4]["torch"][0] != variant[4]["torch"][0]
    assert variant[5] == rows[0][5]  # against eager's forward
    bulk = {"fwd, bulk row slices", "fwd+bwd in_forward, bulk row slices",
            "fwd+bwd in_forward, bulk row slices <= 48 KiB", "fwd+bwd in_forward, bulk row slices, 3 buffers"}
    assert variants("rows block", (8192, 128256), 2).keys() == {
        "fwd+bwd in_forward, clusters <= 16", "fwd+bwd in_forward, rows in flight <= L2", *bulk}
    assert all(backends == ("cuda",) for backends, _ in variants("rows block", (8192, 128256), 2).values())
    assert variants("rows split", (512, 256000), 2).keys() == {"fwd+bwd in_forward, clusters <= 16", *bulk}
    with variants("rows block", (8192, 128256), 2)["fwd+bwd in_forward, rows in flight <= L2"][1]():
        assert os.environ["FUSED_XENT_L2_RESIDENT_ROWS_PERCENT"] == "100"
    monkeypatch.setenv("FUSED_XENT_BULK_SLICE_KIB", "64")
    with variants("rows block, half ignored", (8192, 128256), 2)["fwd+bwd in_forward, bulk row slices <= 48 KiB"][1]():
        assert (os.environ["FUSED_XENT_BULK_ROW_SLICES"], os.environ["FUSED_XENT_BULK_SLICE_KIB"]) == ("1", "48")
    assert "FUSED_XENT_BULK_ROW_SLICES" not in os.environ and os.environ["FUSED_XENT_BULK_SLICE_KIB"] == "64"
    assert variants("rows block", (4096, 32000), 2).keys() == bulk
    assert not variants("rows block", (4096, 32001), 2)
    assert not variants("spatial", (16, 19, 512, 1024), 4)
    unstaged = variants("channels_last", (8, 19, 512, 512), 2)
    assert unstaged.keys() == {"fwd+bwd recompute, row stores unstaged", "fwd+bwd in_forward, row stores unstaged"}
    assert variants("rows thread", (2097152, 10), 4).keys() == unstaged.keys()
    with unstaged["fwd+bwd in_forward, row stores unstaged"][1]():
        assert os.environ["FUSED_XENT_STAGED_ROW_STORES"] == "0"


def test_gpu_check_script_parses():
    for script in ("gpu_check.sh", "gpu_check_budget.sh"):
        assert subprocess.run(["bash", "-n", str(BENCHMARKS / script)]).returncode == 0


def _gpu_check_allowances(stages: str, budget: int, **env) -> tuple[dict[str, int], int]:
    """Each stage's allowance in gpu_check.sh's budget split when every stage runs to it and 15 s past it (the kill
    after SIGINT), and the time when the last stage is done."""
    script = """
        source benchmarks/gpu_check_budget.sh
        T=0
        elapsed() { echo "$T"; }
        for stage in "${STAGE_ORDER[@]}"; do
          wants "$stage" || continue
          seconds=$(allowance "$stage")
          echo "$stage $seconds"
          (( seconds >= 20 )) && (( T += seconds + 15 ))  # under 20 s the stage is skipped
        done
        echo "end $T"
    """
    run = subprocess.run(["bash", "-c", script], cwd=BENCHMARKS.parent, capture_output=True, text=True, check=True,
                         env={**os.environ, "STAGES": stages, "BUDGET": str(budget), **env})
    allowances = dict((name, int(value)) for name, value in (line.split() for line in run.stdout.splitlines()))
    return allowances, allowances.pop("end")


CAPS = {"build": 240, "tests": 180, "kernels": 120, "e2e": 150, "bench": 150, "sanitize": 90}


@pytest.mark.parametrize("stages, budget", [("build tests kernels bench sanitize", 540),
                                            ("build tests kernels e2e bench sanitize", 540),
                                            ("build tests kernels e2e bench sanitize", 900),
                                            ("tests bench", 240), ("build tests", 120)])
def test_gpu_check_stages_share_the_budget(stages, budget):
    """The stages' caps add up to more than the budget (780 s of 540 by default): each selected stage gets a share
    of what is left, in proportion to its cap and never over it, so even stages that all run to their share (and
    15 s past it) leave the last 15 s for the summary and packing, and none is crowded out."""
    allowances, end = _gpu_check_allowances(stages, budget)
    assert list(allowances) == stages.split()
    assert all(20 <= seconds <= CAPS[stage] for stage, seconds in allowances.items()), allowances
    assert end <= budget - 15, allowances
    if sum(CAPS[stage] + 15 for stage in allowances) <= budget - 30:  # room for every cap: each gets all of it
        assert allowances == {stage: CAPS[stage] for stage in allowances}


def test_gpu_check_tests_cap_is_the_tests_stage_cap():
    assert _gpu_check_allowances("tests", 540, GPU_TESTS_CAP_S="300")[0] == {"tests": 300}
    assert _gpu_check_allowances("tests", 200, GPU_TESTS_CAP_S="300")[0] == {"tests": 170}


def test_gpu_check_rerun_starts_from_a_clean_work_folder(tmp_path):
    """No stage selected (no GPU needed): the work folder an earlier run made and the files it packed into $OUT are
    gone, so that a rerun never reports an earlier run's logs as its own; other files in $OUT (it may be
    benchmarks/results, with committed tables) stay, and a work folder the script did not make is refused, not
    emptied."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (work / "gpu_tests.log").write_text("= 1 failed in 1.0s\n")
    for name in ("sanitize.log", "bench.md", "cuda-2026-01-01.md", "mine.txt"):
        (out / name).write_text("an earlier run's\n")
    env = {**os.environ, "STAGES": "none", "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable}

    def gpu_check():
        return subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], env=env, capture_output=True, text=True,
                              timeout=300)

    refused = gpu_check()
    assert refused.returncode == 2 and "is a folder this script did not make" in refused.stderr, refused.stderr
    assert (work / "gpu_tests.log").exists() and (out / "sanitize.log").exists()
    (work / ".gpu_check_work").touch()  # as an earlier run leaves it
    run = gpu_check()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert not (work / "gpu_tests.log").exists() and "GPU tests:" not in run.stdout
    assert sorted(path.name for path in out.iterdir()) == ["cuda-2026-01-01.md", "env.txt", "gpu_check.tgz",
                                                           "mine.txt", "summary.txt"]



@pytest.mark.parametrize("budget, warm_up_s, memcheck_runs", [(600, 0, True), (51, 30, False)])
def test_gpu_check_memcheck_gets_what_the_triton_warm_up_leaves(tmp_path, budget, warm_up_s, memcheck_runs):
    """SANITIZE_BACKENDS=triton: the run outside memcheck gets half the stage's share, memcheck what it leaves, and
    memcheck is skipped with a note when that is under 20 s (timeout would take 0 for no limit at all). Stand-ins
    for Python (the warm-up sleeps warm_up_s, stopped at its half of the 21 s left) and for compute-sanitizer."""
    bin_dir, work, out = tmp_path / "bin", tmp_path / "work", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/bash\ncase "$*" in *gpu_sanitize.py*) exec sleep {warm_up_s};; esac\n')
    (bin_dir / "compute-sanitizer").write_text("#!/bin/bash\necho 'ERROR SUMMARY: 0 errors'\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "STAGES": "sanitize", "SANITIZE_BACKENDS": "triton", "GPU_CHECK_BUDGET_S": str(budget),
           "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": str(bin_dir / "python"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    notes = (work / "stage_notes.txt").read_text()
    assert "Triton kernels compiled outside memcheck" in notes
    if memcheck_runs:
        assert "memcheck exit status: 0" in (work / "sanitize.log").read_text()
    else:
        assert "=== memcheck: skipped" in notes and not (work / "sanitize.log").exists()


@needs_cpu_kernel
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
def test_end_to_end_training_check_runs(tmp_path, grad_mode):
    """A few steps of each task: the fused loss agrees with PyTorch's on the same logits at every step."""
    assert e2e.main(["--steps", "3", "--grad-mode", grad_mode, "--out", str(tmp_path)]) == 0
    suffix = "-steps3" if grad_mode == "recompute" else f"-{grad_mode}-steps3"  # settings other than the default's
    (table,) = tmp_path.glob(f"e2e-cpu-*{suffix}.csv")
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert {row["task"] for row in rows} == {"lm", "seg"} and len(rows) == 6
    assert max(float(row["same_input_abs_diff"]) for row in rows) < 1e-4


def test_unchecked_provider_skips_the_value_checks_only_in_its_calls(monkeypatch):
    """The "-unchecked" provider (on a GPU: what the checks' host sync costs) runs with FUSED_XENT_CHECK_VALUES=0
    during its call, so an out-of-range class gives NaN instead of an IndexError, and leaves the setting as it was."""
    monkeypatch.setenv("FUSED_XENT_CHECK_VALUES", "1")
    provider = providers._unchecked("torch")
    assert provider.name == "fused-torch-unchecked"
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 5])
    assert provider(logits, target).isnan()
    assert fused_xent._value_check.value_checks_enabled()
    with pytest.raises(IndexError, match="target 5 at position 3"):
        providers._fused("torch", "recompute")(logits, target)


@pytest.mark.parametrize("backend", ["triton", None])
def test_e2e_refuses_to_time_triton_s_interpreter(backend, monkeypatch, tmp_path, capsys):
    """With TRITON_INTERPRET set (where fused_xent was imported under it, Triton serves CPU tensors), e2e.py would
    report the interpreter's time as the triton backend's loss time: a usage error instead, whether triton is named
    or is what auto would pick."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(e2e, "backends_serving", lambda device: ["triton", "torch"])
    argv = ["--steps", "1", "--out", str(tmp_path)] + (["--backend", backend] if backend else [])
    with pytest.raises(SystemExit) as exit_info:
        e2e.main(argv)
    assert exit_info.value.code == 2
    assert "error: TRITON_INTERPRET is set: the triton backend would run in Triton's Python interpreter" in \
        capsys.readouterr().err
