"""Benchmark fused_xent against PyTorch's cross entropy (eager, torch.compile) and Liger-Kernel.

`python benchmarks/bench.py` (what `make bench` runs) is the quick CPU run: three problems, fp32, fwd and fwd+bwd,
the fastest fused_xent backend in each grad mode (only its default one if that is the pure-PyTorch reference),
eager and compile. `--full` sweeps every shape family, dtype, mode and provider. Each provider's loss, and its
gradient wherever the run computes one, is checked against PyTorch in fp64 before it is timed; a wrong one is marked
WRONG and not timed. Writes
<out>/<device>-<date>[-full][-<selection>][-ignoredNN][-threadsN][-autocast][-thp][-synced].{csv,md} and one PNG per
shape sweep, where <selection> names each of --families, --dtypes, --modes and (the chosen) --providers that differs
from the default run's, its items joined by commas (e.g. cpu-2026-11-29-cls-fused-cpu,eager), so a partial run never
overwrites a full table. Triton's interpreter is never timed: with TRITON_INTERPRET set, a run that would time a
Triton kernel (the triton backend, Liger, torch.compile on a GPU) refuses to start.
"""

import argparse
import os
import sys
import time
from pathlib import Path

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="sweep every shape, dtype, mode and provider")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--families", type=_csv_list,
                        help="comma list of llm, seg, cls, seq (default: all; seq has shapes in --full only)")
    parser.add_argument("--dtypes", type=_csv_list,
                        help="comma list of fp32, bf16, fp16 (default: fp32; --full: fp32,bf16 and fp16 on GPU)")
    parser.add_argument("--providers", type=_csv_list,
                        help="comma list of provider names or fnmatch patterns, e.g. 'fused-*,eager' "
                             "(default: fastest fused backend in each grad mode, eager, compile; --full: all)")
    parser.add_argument("--modes", type=_csv_list, help="comma list of fwd, bwd, fwd+bwd (default: fwd,fwd+bwd; "
                                                        "--full: all three)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="output folder (default: benchmarks/results/)")
    parser.add_argument("--repeats", type=positive_int,
                        help="timed steps per measurement, >= 1 (default: as many as fit in --budget, 3 to 50)")
    parser.add_argument("--budget", type=_positive_float,
                        help="seconds of timed steps per measurement when --repeats is not given, > 0 "
                             "(default: 1.5, --full: 3)")
    parser.add_argument("--ignored", type=_fraction, default=0.0,
                        help="fraction of the targets set to ignore_index (-100), as in a padded or prompt-masked "
                             "batch; chosen at random per position (default: 0)")
    parser.add_argument("--autocast", action="store_true",
                        help="every provider's loss runs under torch.autocast in the logits' dtype, as in mixed-"
                             "precision training (use with --dtypes bf16 or fp16: PyTorch then computes in float32)")
    parser.add_argument("--timing", choices=("queued", "synced"), default="queued",
                        help="on a GPU: 'queued' (default) queues the timed steps back to back, so the host runs "
                             "ahead as in training and the CUDA events time the device's work; 'synced' waits for "
                             "the GPU before each step, so a call's host time until its first kernel counts too "
                             "(single-call latency). The CPU is always timed by the wall clock")
    parser.add_argument("--threads", type=positive_int,
                        help="torch.set_num_threads for the CPU run, >= 1 (default: torch's)")
    parser.add_argument("--thp", action="store_true",
                        help=f"rerun this command with {THP_ENV}=1 (huge pages in PyTorch's CPU allocator; it must "
                             "be set before torch loads). Every provider runs under the same setting either way.")
    parser.add_argument("--list", action="store_true",
                        help="print the providers, problems and result file names, then exit")
    return parser.parse_args(argv)


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def positive_int(text: str) -> int:
    """An argparse type for counts (also e2e.py's): argparse reports a bad value as an error naming the flag."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: an integer >= 1 is needed")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # `not >` also catches NaN
        raise argparse.ArgumentTypeError(f"{text}: a number > 0 is needed")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in [0, 1) is needed (1 would leave no target)")
    return value


def reexec_with_thp():
    env = dict(os.environ, **{THP_ENV: "1"})
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.thp and os.environ.get(THP_ENV) != "1":
        reexec_with_thp()
    # Imported only now: THP_MEM_ALLOC_ENABLE is read when torch loads, and --help should not wait for torch.
    import runner

    return runner.run(args)


if __name__ == "__main__":
    started = time.perf_counter()
    status = main()
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    sys.exit(status)
