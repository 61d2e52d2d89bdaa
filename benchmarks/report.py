"""Result rows and what is made of them: the console table, CSV, markdown and PNG plots."""

import csv
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

NAN = float("nan")
BASELINES = ("eager", "compile", "liger")  # speedup_vs_<baseline> rows, where the baseline was timed


@dataclass(frozen=True)
class Row:
    provider: str
    family: str
    shape: str
    dtype: str
    mode: str  # fwd / bwd / fwd+bwd, "copy" for the copy baseline, "-" for per-problem facts (check, compile time)
    metric: str  # time, bandwidth, copy_fraction, peak_mem, speedup_vs_<baseline>, loss_err, ...
    median: float
    p20: float = NAN
    p80: float = NAN
    unit: str = ""
    note: str = ""


class Results:
    def __init__(self):
        self.rows: list[Row] = []
        self._index: dict[tuple, Row] = {}

    def add(self, row: Row):
        self.rows.append(row)
        self._index[(row.provider, row.family, row.shape, row.dtype, row.mode, row.metric)] = row

    def get(self, provider, case, mode, metric) -> Row | None:
        return self._index.get((provider, case.family, case.label, case.dtype_name, mode, metric))

    def value(self, provider, case, mode, metric) -> float:
        row = self.get(provider, case, mode, metric)
        return row.median if row else NAN


def _fmt(value: float, digits: int = 1, suffix: str = "") -> str:
    """Fixed decimals for ordinary values, two significant digits below 1, "-" for missing."""
    if value is None or math.isnan(value):
        return "-"
    if abs(value) < 1 and value != 0:
        return f"{value:.2g}{suffix}"
    return (f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}") + suffix


def _verdict(results: Results, provider: str, case) -> str:
    row = results.get(provider, case, "-", "verdict")
    return row.note if row else "ok"


def case_heading(results: Results, case) -> str:
    copy_ms = results.value("copy", case, "copy", "time")
    copy_bw = results.value("copy", case, "copy", "bandwidth")
    return (f"{case.family} {case.label} {case.dtype_name}: logits {case.logits_bytes / 1e6:.3g} MB; "
            f"copy {_fmt(copy_ms, 2)} ms ({_fmt(copy_bw)} GB/s)")


def _mode_verdict(results: Results, provider: str, case, mode: str) -> str | None:
    row = results.get(provider, case, mode, "verdict")
    return row.note if row else None


def _baselines(providers: list[str]) -> list[str]:
    return [name for name in BASELINES if name in providers]


def console_table(results: Results, case, providers: list[str], modes: list[str]) -> str:
    """Medians with speedups (baseline time / provider time; > 1 is faster) and peak memory above inputs."""
    baselines = _baselines(providers)
    header = ["provider"] + [f"{mode} {what}" for mode in modes
                             for what in ("ms", *(f"/{b}" for b in baselines), "MB")]
    table, untimed = [header], []
    for name in providers:
        verdict = _verdict(results, name, case)
        if verdict != "ok":  # WRONG / FAILED / SKIPPED: not timed
            untimed.append(f"{name}: {verdict}")
            continue
        cells = [name]
        for mode in modes:
            cells += [_fmt(results.value(name, case, mode, "time"), 2),
                      *(_fmt(results.value(name, case, mode, f"speedup_vs_{b}"), 2, "x") for b in baselines),
                      _fmt(results.value(name, case, mode, "peak_mem"), 0)]
            failure = _mode_verdict(results, name, case, mode)
            if failure:
                untimed.append(f"{name} {mode}: {failure}")
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(line, widths, strict=True))) for line in table]
    return "\n".join([case_heading(results, case), *lines, *untimed])


def write_csv(path: Path, results: Results, env: dict[str, str]):
    shared = {"device_name": env["device"], "torch_version": env["torch"], "git_commit": env["commit"],
              "date": env["date"], "allocator": env["allocator"], "threads": env["threads"]}
    fields = list(Row.__dataclass_fields__)
    order = fields[:10] + list(shared) + ["note"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=order)
        writer.writeheader()
        for row in results.rows:
            values = {k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else "" if isinstance(v, float)
                          else v) for k, v in asdict(row).items()}
            writer.writerow({**values, **shared})


def write_markdown(path: Path, results: Results, env: dict[str, str], cases, providers: list[str],
                   modes: list[str], notes: list[str], title: str):
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    lines += ["", "## Method", ""] + [f"- {note}" for note in notes]
    baselines = _baselines(providers)
    header = ["provider", "mode", "median ms", "p20-p80 ms", *(f"vs {b}" for b in baselines), "GB/s", "% of copy",
              "peak MB"]
    blank = " |" * (len(header) - 3)
    for case in cases:
        lines += ["", f"## {case_heading(results, case)}", "", "| " + " | ".join(header) + " |",
                  "|---|---|" + "--:|" * (len(header) - 2)]
        for name in providers:
            verdict = _verdict(results, name, case)
            if verdict != "ok":
                lines.append(f"| {name} | all | {verdict} |{blank}")
                continue
            for mode in modes:
                time_row = results.get(name, case, mode, "time")
                if time_row is None:
                    failure = _mode_verdict(results, name, case, mode)
                    if failure:
                        lines.append(f"| {name} | {mode} | {failure} |{blank}")
                    continue
                cells = [
                    name, mode, _fmt(time_row.median, 2), f"{_fmt(time_row.p20, 2)}-{_fmt(time_row.p80, 2)}",
                    *(_fmt(results.value(name, case, mode, f"speedup_vs_{b}"), 2) for b in baselines),
                    _fmt(results.value(name, case, mode, "bandwidth")),
                    _fmt(results.value(name, case, mode, "copy_fraction"), 0),
                    _fmt(results.value(name, case, mode, "peak_mem"), 0),
                ]
                lines.append("| " + " | ".join(cells) + " |")
        compile_s = results.value("compile", case, "-", "compile_time")
        if not math.isnan(compile_s):
            lines += ["", f"torch.compile warm-up (compile) time, excluded above: {compile_s:.1f} s"]
    path.write_text("\n".join(lines) + "\n")


def write_plots(stem: Path, results: Results, cases, providers: list[str], modes: list[str]) -> list[Path]:
    """One PNG per plot group and dtype: median time (top) and peak memory (bottom) against the swept size."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list] = {}
    for case in cases:
        groups.setdefault((case.plot_group, case.dtype_name), []).append(case)
    written = []
    for (group, dtype), members in groups.items():
        members = sorted(members, key=lambda c: c.sweep_value)
        fig, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 7), squeeze=False)
        for column, mode in enumerate(modes):
            for row, (metric, label) in enumerate((("time", "median time (ms)"), ("peak_mem", "peak memory (MB)"))):
                ax = axes[row][column]
                for name in providers + ["copy"]:
                    use_mode = "copy" if name == "copy" else mode
                    if name == "copy" and metric != "time":
                        continue
                    points = [(c.sweep_value, results.value(name, c, use_mode, metric)) for c in members]
                    points = [(x, y) for x, y in points if not math.isnan(y)]
                    if points:
                        style = ":" if name == "copy" else "-"
                        ax.plot(*zip(*points, strict=True), style, marker="o", label=name)
                ax.set_xscale("log")
                ax.set_yscale("log")
                # Ticks at the swept sizes only: over a short range the log axis labels its minor ticks on top of
                # each other.
                ax.set_xticks([c.sweep_value for c in members], [f"{c.sweep_value:g}" for c in members])
                ax.minorticks_off()
                ax.set_xlabel(members[0].sweep_axis)
                ax.set_ylabel(label)
                ax.set_title(f"{group} {dtype} {mode}")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{group}-{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
