"""The benchmark's own machinery on the CPU: a small end-to-end run, its outputs, and the correctness gate that keeps
a wrong provider out of the timings. (The GPU path runs in benchmarks/gpu_check.sh on a lent GPU.)"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_xent

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import correctness  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import e2e  # noqa: E402
import gpu_kernel_table  # noqa: E402
import providers  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402
import shapes  # noqa: E402

needs_cpu_kernel = pytest.mark.skipif("cpu" not in fused_xent.available_backends(), reason="extension not built")


@needs_cpu_kernel
def test_bench_runs_end_to_end(tmp_path):
    """With a third of the targets ignored, which every provider's verdict must survive."""
    args = [sys.executable, str(BENCHMARKS / "bench.py"), "--families", "cls", "--providers", "fused-cpu,eager",
            "--modes", "fwd,fwd+bwd", "--repeats", "3", "--ignored", "0.3", "--out", str(tmp_path)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (table,) = tmp_path.glob("cpu-*-ignored30.csv")
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
    assert list(tmp_path.glob("cpu-*-cls-fp32.png"))


def _cls_problem():
    case = shapes.Case("cls", (512, 10), "fp32")
    return shapes.make_inputs(case, "cpu")


def test_gate_passes_pytorch_and_rejects_a_wrong_provider():
    logits, target = _cls_problem()
    reference = correctness.Reference(logits, target, with_grad=True)
    right = providers.Provider("right", F.cross_entropy, traffic="recompute")
    assert correctness.check(right, logits, target, reference, "fp32").ok
    off_by_a_bit = providers.Provider("wrong", lambda x, t: F.cross_entropy(x, t) * 1.001, traffic="recompute")
    verdict = correctness.check(off_by_a_bit, logits, target, reference, "fp32")
    assert not verdict.ok and "loss error" in verdict.message and "grad error" in verdict.message


def test_gate_averages_over_the_targets_that_count():
    case = shapes.Case("cls", (4096, 10), "fp32")
    logits, target = shapes.make_inputs(case, "cpu", ignored=0.5)
    assert 0.4 < (target == shapes.IGNORE_INDEX).float().mean() < 0.6
    reference = correctness.Reference(logits, target, with_grad=True)
    right = providers.Provider("right", F.cross_entropy, traffic="recompute")
    assert correctness.check(right, logits, target, reference, "fp32").ok
    over_every_position = providers.Provider(
        "wrong", lambda x, t: F.cross_entropy(x, t, reduction="sum") / t.numel(), traffic="recompute")
    assert not correctness.check(over_every_position, logits, target, reference, "fp32").ok


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
        assert correctness.check(provider, logits, target, reference, "bf16").ok, provider.name


def test_gate_rejects_nan():
    logits, target = _cls_problem()
    reference = correctness.Reference(logits, target, with_grad=False)
    nan_loss = providers.Provider("nan", lambda x, t: F.cross_entropy(x, t) * float("nan"), traffic="recompute")
    assert not correctness.check(nan_loss, logits, target, reference, "fp32").ok


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


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")]).returncode == 0



@needs_cpu_kernel
@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward", "inplace"])
def test_end_to_end_training_check_runs(tmp_path, grad_mode):
    """A few steps of each task: the fused loss agrees with PyTorch's on the same logits at every step."""
    assert e2e.main(["--steps", "3", "--grad-mode", grad_mode, "--out", str(tmp_path)]) == 0
    (table,) = tmp_path.glob("e2e-cpu-*.csv")
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
    assert fused_xent._validate.value_checks_enabled()
    with pytest.raises(IndexError, match="target 5 at position 3"):
        providers._fused("torch", "recompute")(logits, target)
