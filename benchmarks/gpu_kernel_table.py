"""Times the ops of each GPU backend (compiled CUDA, Triton) against eager F.cross_entropy and a device copy on
shapes that exercise each kernel path, and prints a short markdown table (also written to OUT/gpu_kernel_table.md).
The ops are called directly, so the numbers are kernel time without the front end's target check.

GB/s counts the least traffic each mode needs: the forward reads the logits once (L); forward+backward reads them,
and writes the gradient (2L) when the gradient is made in the forward; a recomputing backward reads the logits again
(3L); rows of ignored positions are counted too, so skipping them shows as a higher rate. Copy = dst.copy_(src) of
the logits (2L), measured on the same tensor. Each timed call starts from a cold L2 (timing.CacheFlusher overwrites
a 256 MiB buffer before it, outside the timed region); the calls are queued back to back (bench.py's default timing).
"""

import argparse
import contextlib
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_xent
from fused_xent._backends import backend_ops

import env_info
import timing

MEAN = 1


def _variants(label, shape, element_size):
    """{mode: (backends, plan)}: modes timed once more under another plan, for the backends that plan concerns, so
    that one run compares the plans: for rows longer than 96 KiB (the LLM vocabularies), the CUDA fused forward with
    thread-block clusters of up to 16 blocks (by default a cluster is one block, csrc/cuda/xent_rows_cluster.cu; the
    setting changes the plan only for such rows) and, on the block-per-row shapes (not split across blocks), its
    L2-resident plan (rows in flight held to L2, the gradient sweep streaming: FUSED_XENT_L2_RESIDENT_ROWS_PERCENT;
    on the H200 half of L2 was slower, and the hints alone no better). Triton's versions of the L2-resident plan and
    of pipelined row-statistics loads did not pay on the H200 and were removed. Rows a block or more would own
    (block and split rows), once more with their slices brought by the copy engine into double-buffered clusters
    (FUSED_XENT_BULK_ROW_SLICES=1, csrc/cuda/xent_rows_cluster.cu), where each row spans a multiple of 16 bytes: the
    forward and the fused forward in slices of up to 100 KiB (one block per SM), and the fused forward again in
    slices of up to 48 KiB (FUSED_XENT_BULK_SLICE_KIB, two blocks per SM) and with three buffers a block instead of
    two (FUSED_XENT_BULK_BUFFERS, fetching two positions ahead). Rows of a few classes, one after another (a thread
    per row), once more with their gradient stored by each thread instead of by its warp from shared memory
    (FUSED_XENT_STAGED_ROW_STORES=0)."""
    variants = {}
    if label in ("rows thread", "channels_last"):
        for mode in ("fwd+bwd recompute", "fwd+bwd in_forward"):
            variants[f"{mode}, row stores unstaged"] = (("cuda",), _settings(FUSED_XENT_STAGED_ROW_STORES="0"))
    if label.startswith(("rows block", "rows split")) and shape[1] * element_size % 16 == 0:
        for mode in ("fwd", "fwd+bwd in_forward"):
            variants[f"{mode}, bulk row slices"] = (("cuda",), _settings(FUSED_XENT_BULK_ROW_SLICES="1"))
        variants["fwd+bwd in_forward, bulk row slices <= 48 KiB"] = (
            ("cuda",), _settings(FUSED_XENT_BULK_ROW_SLICES="1", FUSED_XENT_BULK_SLICE_KIB="48"))
        variants["fwd+bwd in_forward, bulk row slices, 3 buffers"] = (
            ("cuda",), _settings(FUSED_XENT_BULK_ROW_SLICES="1", FUSED_XENT_BULK_BUFFERS="3"))
    if label.startswith("rows") and shape[1] * element_size > 96 * 1024:
        variants["fwd+bwd in_forward, clusters <= 16"] = (("cuda",), _settings(FUSED_XENT_MAX_CLUSTER_BLOCKS="16"))
        if label.startswith("rows block"):
            variants["fwd+bwd in_forward, rows in flight <= L2"] = (
                ("cuda",), _settings(FUSED_XENT_L2_RESIDENT_ROWS_PERCENT="100"))
    return variants


def _settings(**values):
    """A plan: a context in which each environment variable named has its value, every one restored after it."""

    @contextlib.contextmanager
    def plan():
        with contextlib.ExitStack() as stack:
            for name, value in values.items():
                stack.enter_context(env_info.environment_variable(name, value))
            yield

    return plan


# (label, shape, dtype, layout, fraction of targets ignored): thread rows, warp rows, block rows, split rows, spatial
# NCHW, NCHW with few positions (split across threads: vocabulary logits laid out (N, C, T)), channels_last; and block
# rows of which half are ignored (a padded or prompt-masked batch), whose logits the kernels skip.
PROBLEMS = [
    ("rows thread", (2097152, 10), torch.float32, "contiguous", 0.0),
    ("rows warp", (16384, 1000), torch.float32, "contiguous", 0.0),
    ("rows block", (4096, 32000), torch.bfloat16, "contiguous", 0.0),
    ("rows block", (8192, 128256), torch.bfloat16, "contiguous", 0.0),
    ("rows block", (4096, 256000), torch.bfloat16, "contiguous", 0.0),
    ("rows split", (512, 256000), torch.bfloat16, "contiguous", 0.0),
    ("spatial", (16, 19, 512, 1024), torch.float32, "contiguous", 0.0),
    ("spatial", (16, 19, 512, 1024), torch.bfloat16, "contiguous", 0.0),
    ("spatial split", (8, 32000, 256), torch.bfloat16, "contiguous", 0.0),
    ("channels_last", (8, 19, 512, 512), torch.bfloat16, "channels_last", 0.0),
    ("rows block, half ignored", (8192, 128256), torch.bfloat16, "contiguous", 0.5),
]


def median_ms(fn, repeats, flusher, timer):
    """Median ms of `repeats` calls after 3 untimed ones, queued as bench.py queues them (timing.timed_runs)."""
    warm_up = 3
    seconds = timing.timed_runs(lambda _: fn(), warm_up + repeats, timer, flusher, queued=True)
    return 1e3 * statistics.median(seconds[warm_up:])


def gpu_backends():
    """{name: fused_xent._backends.Backend} for the GPU backends available here."""
    return {name: backend_ops(name) for name in ("cuda", "triton") if name in fused_xent.available_backends()}


def mode_calls(ops, x3, t2, scratch, one):
    fwd, bwd, fwd_grad, fwd_grad_ = ops.fwd, ops.bwd, ops.fwd_grad, ops.fwd_grad_

    def recompute():
        _, lse, total_weight = fwd(x3, t2, None, MEAN, -100, 0.0)
        bwd(one, x3, t2, None, lse, total_weight, MEAN, -100, 0.0)

    return {
        "fwd": (lambda: fwd(x3, t2, None, MEAN, -100, 0.0), 1),
        "fwd+bwd recompute": (recompute, 3),
        "fwd+bwd in_forward": (lambda: fwd_grad(x3, t2, None, MEAN, -100, 0.0), 2),
        # Overwrites `scratch` at every step; the time does not depend on the values.
        "fwd+bwd inplace": (lambda: fwd_grad_(scratch, t2, None, MEAN, -100, 0.0), 2),
    }


def measure(label, shape, dtype, layout, ignored, repeats, backends, device="cuda"):
    """Rows of the table for one problem: each backend's four modes, eager, and the copy rate. (device="cpu" with
    the CPU backend checks this script without a GPU: tests/test_benchmarks.py.)"""
    flusher, timer = timing.CacheFlusher(device), timing.Timer(device)
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], device=device)
    target[torch.rand(target.shape, device=device) < ignored] = -100
    x3 = x.view(shape[0], shape[1], -1) if x.dim() > 2 else x.unsqueeze(2)
    t2 = target.view(shape[0], -1)
    scratch = x3.clone()
    leaf = x.detach().clone().requires_grad_(True)
    one = torch.ones((), device=device, dtype=dtype)
    nbytes = x.numel() * x.element_size()

    def eager_fwd():
        with torch.no_grad():
            F.cross_entropy(x, target)

    def eager_fwd_bwd():
        F.cross_entropy(leaf, target).backward()
        leaf.grad = None

    copy_into = torch.empty_like(x)
    copy_gbs = 2 * nbytes / median_ms(lambda: copy_into.copy_(x), repeats, flusher, timer) / 1e6
    eager = {mode: median_ms(fn, repeats, flusher, timer) for mode, fn in (("fwd", eager_fwd),
                                                                          ("fwd+bwd", eager_fwd_bwd))}
    shape_text = "x".join(map(str, shape)) + (" (channels_last)" if layout == "channels_last" else "")
    rows = []
    variants = {mode: plan for mode, plan in _variants(label, shape, x.element_size()).items()
                if set(plan[0]) & set(backends)}
    for mode in ["fwd", "fwd+bwd recompute", "fwd+bwd in_forward", "fwd+bwd inplace", *variants]:
        times = {}
        for name, ops in backends.items():
            fn, passes = mode_calls(ops, x3, t2, scratch, one)[mode.split(",")[0]]
            if mode in variants and name not in variants[mode][0]:
                times[name] = (float("nan"), passes)
                continue
            plan = variants[mode][1]() if mode in variants else contextlib.nullcontext()
            try:
                with plan:
                    times[name] = (median_ms(fn, repeats, flusher, timer), passes)
            except Exception as error:  # reported in the table; the other backends and problems still run
                print(f"{name} {label} {shape} {mode}: {type(error).__name__}: {error}")
                times[name] = (float("nan"), passes)
        eager_mode = mode.split(",")[0].split(" ")[0]  # "fwd" or "fwd+bwd"
        rows.append((label, shape_text, str(dtype)[6:], mode, times, eager[eager_mode], nbytes, copy_gbs))
    return rows


def render(rows, backends, repeats, device_name):
    names = list(backends)
    lines = [
        f"GPU kernels vs eager on {device_name} (median of {repeats}, mean reduction; the ops "
        "called directly, eager through F.cross_entropy and autograd, so the ratios favour the kernels on small "
        "problems (bench.py times both through the public API); GB/s = least traffic / time, see the docstring of "
        "benchmarks/gpu_kernel_table.py)",
        "",
        "| path | shape | dtype | mode | " + " | ".join(f"{n} ms" for n in names) + " | eager ms | "
        + " | ".join(f"{n} vs eager" for n in names) + " | " + " | ".join(f"{n} GB/s" for n in names)
        + " | copy GB/s |",
        "|---|---|---|---|" + "---:|" * (3 * len(names) + 2),
    ]
    for label, shape, dtype, mode, times, eager_ms, nbytes, copy_gbs in rows:
        ms = [times[n][0] for n in names]
        gbs = [times[n][1] * nbytes / times[n][0] / 1e6 for n in names]
        lines.append(
            f"| {label} | {shape} | {dtype} | {mode} | " + " | ".join(f"{t:.3f}" for t in ms) + f" | {eager_ms:.3f} | "
            + " | ".join(f"{eager_ms / t:.2f}x" for t in ms) + " | " + " | ".join(f"{g:.0f}" for g in gbs)
            + f" | {copy_gbs:.0f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    backends = gpu_backends()
    if not backends:
        raise SystemExit(f"no GPU backend available here: {fused_xent.available_backends()}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for problem in PROBLEMS:
        rows += measure(*problem, args.repeats, backends)
        torch.cuda.empty_cache()
        # Rewritten after each problem, so a run stopped by its time limit still leaves the rows it finished.
        text = render(rows, backends, args.repeats, torch.cuda.get_device_name())
        (args.out / "gpu_kernel_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
