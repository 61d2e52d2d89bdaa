"""Times the compiled CUDA ops against eager F.cross_entropy on a few shapes that exercise each kernel path, and
prints a short markdown table (also written to OUT/cuda_kernel_table.md). The ops are called directly, so the
numbers are kernel time without the front end's target check.

GB/s counts the least traffic each mode needs: one read of the logits for the forward, one read and one gradient
write for forward+backward (a recomputing backward reads the logits twice, so it can not reach the copy rate).
"""

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_xent  # noqa: F401  (loads the extension)

OPS = torch.ops.fused_xent
MEAN = 1

# (label, shape, dtype, layout): warp rows, block rows, split rows, spatial NCHW, channels_last.
PROBLEMS = [
    ("rows warp", (16384, 1000), torch.float32, "contiguous"),
    ("rows block", (4096, 32000), torch.bfloat16, "contiguous"),
    ("rows block", (8192, 128256), torch.bfloat16, "contiguous"),
    ("rows split", (512, 256000), torch.bfloat16, "contiguous"),
    ("spatial", (8, 19, 512, 512), torch.bfloat16, "contiguous"),
    ("channels_last", (8, 19, 512, 512), torch.bfloat16, "channels_last"),
]


def median_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def as_ncs(x):
    return x.view(x.shape[0], x.shape[1], -1) if x.dim() > 2 else x.unsqueeze(2)


def measure(label, shape, dtype, layout, repeats):
    """Rows of the table for one problem: our four modes against eager."""
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], device="cuda")
    x3, t2 = as_ncs(x), target.view(shape[0], -1)
    scratch = x3.clone()  # overwritten by the in-place mode at every step (timing does not depend on the values)
    leaf = x.detach().clone().requires_grad_(True)
    one = torch.ones((), device="cuda", dtype=dtype)
    nbytes = x.numel() * x.element_size()

    def ours_fwd():
        OPS.cross_entropy_fwd(x3, t2, None, MEAN, -100, 0.0)

    def ours_fwd_bwd():
        _, lse, total_weight = OPS.cross_entropy_fwd(x3, t2, None, MEAN, -100, 0.0)
        OPS.cross_entropy_bwd(one, x3, t2, None, lse, total_weight, MEAN, -100, 0.0)

    def ours_fwd_grad():
        OPS.cross_entropy_fwd_grad(x3, t2, None, MEAN, -100, 0.0)

    def ours_inplace():
        OPS.cross_entropy_fwd_grad_(scratch, t2, None, MEAN, -100, 0.0)

    def eager_fwd():
        with torch.no_grad():
            F.cross_entropy(x, target)

    def eager_fwd_bwd():
        F.cross_entropy(leaf, target).backward()
        leaf.grad = None

    eager = {"fwd": median_ms(eager_fwd, repeats), "fwd+bwd": median_ms(eager_fwd_bwd, repeats)}
    rows = []
    for mode, fn, traffic, baseline in (
        ("fwd", ours_fwd, nbytes, "fwd"),
        ("fwd+bwd recompute", ours_fwd_bwd, 2 * nbytes, "fwd+bwd"),
        ("fwd+bwd in_forward", ours_fwd_grad, 2 * nbytes, "fwd+bwd"),
        ("fwd+bwd inplace", ours_inplace, 2 * nbytes, "fwd+bwd"),
    ):
        ms = median_ms(fn, repeats)
        shape_text = "x".join(map(str, shape))
        rows.append((label, shape_text, str(dtype)[6:], mode, ms, eager[baseline], traffic / ms / 1e6))
    return rows


def run(repeats):
    rows = []
    for problem in PROBLEMS:
        rows += measure(*problem, repeats)
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = run(args.repeats)
    lines = [
        f"CUDA kernel vs eager on {torch.cuda.get_device_name()} (median of {args.repeats}, mean reduction)",
        "",
        "| path | shape | dtype | mode | fused ms | eager ms | speedup | fused GB/s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for label, shape, dtype, mode, ms, eager_ms, gbs in rows:
        lines.append(f"| {label} | {shape} | {dtype} | {mode} | {ms:.3f} | {eager_ms:.3f} | {eager_ms / ms:.2f}x | "
                     f"{gbs:.0f} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_kernel_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
