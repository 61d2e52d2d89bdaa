"""Every GPU kernel path once, on small inputs, for `compute-sanitizer` (run by benchmarks/gpu_check.sh):

    compute-sanitizer --tool memcheck python3 benchmarks/gpu_sanitize.py

Each op of each GPU backend runs on rows with a warp per position, a block per position, rows split across blocks,
a cluster per position, NCHW and channels_last positions, misaligned rows, probability targets, weights,
smoothing, every reduction, and out-of-range class indices (which must give NaN without touching memory out of
bounds); so does the CUDA backend's value check, and its forward ops with the copy engine filling cluster slices
(FUSED_XENT_BULK_ROW_SLICES=1). The sanitizer reports any out-of-bounds or misaligned access; this script only
checks that the results are finite where they should be. `--device cpu` runs the same calls through
the CPU kernel (which raises on out-of-range indices instead, so those are left out): a check of this script
itself, without a GPU.
"""

import argparse
import itertools

import torch

import fused_xent
from fused_xent._backends import backend_ops, backends_serving

import env_info

# (shape, layout): C <= 2048 (warp per row), C > 2048 (block per row), few rows with a huge C (split rows), rows
# whose fused forward outgrows L2 (a cluster of 11 blocks per row on sm_90 in float32), NCHW, NCHW with few positions
# and C = 1001 (split across threads, a short last range), channels_last with C <= 32 and with C > 32, and a row
# stride that is not a multiple of 16 bytes.
PROBLEMS = [
    ((37, 1000), "contiguous"),
    ((9, 5003), "contiguous"),
    ((2, 70001), "contiguous"),
    ((40, 256000), "contiguous"),
    ((3, 7, 5, 9), "contiguous"),
    ((2, 1001, 3, 3), "contiguous"),
    ((2, 19, 6, 7), "channels_last"),
    ((2, 40, 3, 5), "channels_last"),
    ((5, 2049), "offset"),
]


def backends_on(device):
    """{name: fused_xent._backends.Backend} for the backends available here that run on `device`."""
    return {name: backend_ops(name) for name in backends_serving(device) if name != "torch"}


def make_logits(shape, layout, dtype, device):
    x = torch.randn(shape, device=device).mul_(3).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "offset":
        flat = torch.empty(x.numel() + 1, device=device, dtype=dtype)[1:]
        return flat.view(shape).copy_(x)
    return x


def as_ops_view(x):
    return x.view(x.shape[0], x.shape[1], -1) if x.dim() > 2 else x.unsqueeze(2)


def run_backend(ops, device):
    calls = 0
    for (shape, layout), dtype in itertools.product(PROBLEMS, (torch.float32, torch.bfloat16)):
        x = as_ops_view(make_logits(shape, layout, dtype, device))
        n, c, s = x.shape
        index_target = torch.randint(0, c, (n, s), device=device)
        index_target.view(-1)[::5] = -100
        bad_target = index_target.clone()
        bad_target.view(-1)[1::7] = c  # out of range: NaN, never an out-of-bounds read
        prob_target = torch.rand_like(x, dtype=torch.float32).softmax(1).to(dtype)
        weight = torch.rand(c, device=device, dtype=dtype) + 0.5
        targets = (index_target, prob_target) + ((bad_target,) if device == "cuda" else ())
        # Every reduction, with and without weights and smoothing, in four combinations rather than all twelve:
        # the sanitizer slows each launch down, and these already reach every kernel and branch.
        options = ((None, 0, 0.0), (weight, 1, 0.1), (weight, 2, 0.0), (None, 1, 0.1))
        for target, (w, reduction, smoothing) in itertools.product(targets, options):
            loss, lse, total_weight = ops.fwd(x, target, w, reduction, -100, smoothing)
            grad_loss = torch.ones_like(loss)
            ops.bwd(grad_loss, x, target, w, lse, total_weight, reduction, -100, smoothing)
            ops.fwd_grad(x, target, w, reduction, -100, smoothing)
            ops.fwd_grad_(x.clone(), target, w, reduction, -100, smoothing)
            case = (shape, layout, dtype, reduction, smoothing)
            if target is not bad_target:
                # An ignored position's row is skipped: its lse is that of no classes, (0, -inf).
                counted = target != -100 if target is index_target else torch.ones_like(lse[..., 0], dtype=torch.bool)
                assert torch.isfinite(lse[counted]).all(), case
                assert (lse[~counted] == lse.new_tensor([0.0, -torch.inf])).all(), case
            elif reduction == 0:
                assert loss.view(-1)[1::7].isnan().all(), case
            calls += 4
        if ops.name == "cuda":
            # The front end's value check (csrc/cuda/xent_checks.cu): targets with and without bad classes, the
            # weight with and without a NaN.
            nan_weight = weight.clone()
            nan_weight[-1] = float("nan")
            for target, w in ((index_target, None), (bad_target, weight), (None, nan_weight)):
                flags = torch.ops.fused_xent.value_check(target, w, -100, c)
                torch.cuda.synchronize()
                assert flags.tolist() == [int(target is bad_target), int(w is nan_weight)], case
                calls += 1
    if ops.name == "cuda":
        calls += bulk_slice_calls(ops)
    if device == "cuda":
        torch.cuda.synchronize()
    return calls


def bulk_slice_calls(ops):
    """The forward ops with FUSED_XENT_BULK_ROW_SLICES=1 on rows the copy engine can slice, more rows than clusters
    fit (else the kernel leaves them to others): clusters of 1 and 2 blocks (32000 classes) and of 5 and 10 (256000
    bfloat16 and float32), every fifth position ignored (never fetched), some class indices out of range."""
    calls = 0
    with env_info.environment_variable("FUSED_XENT_BULK_ROW_SLICES", "1"):
        for shape, dtype in itertools.product(((140, 32000), (40, 256000)), (torch.float32, torch.bfloat16)):
            x = as_ops_view(make_logits(shape, "contiguous", dtype, "cuda"))
            target = torch.randint(0, shape[1], (shape[0], 1), device="cuda")
            target.view(-1)[::5] = -100
            target.view(-1)[1::7] = shape[1]
            weight = torch.rand(shape[1], device="cuda", dtype=dtype) + 0.5
            for w, reduction, smoothing in ((None, 0, 0.0), (weight, 1, 0.1)):
                loss, _ = ops.fwd_grad(x, target, w, reduction, -100, smoothing)
                ops.fwd_grad_(x.clone(), target, w, reduction, -100, smoothing)
                ops.fwd(x, target, w, reduction, -100, smoothing)
                assert loss.isnan().any() and (reduction == 1 or loss.view(-1)[2].isfinite()), (shape, dtype)
                calls += 3
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", help="comma list of backends to run (default: every one available here); "
                                           "Triton's many specializations each compile under the sanitizer")
    args = parser.parse_args()
    device = args.device
    backends = backends_on(device)
    if args.backends:
        backends = {name: ops for name, ops in backends.items() if name in args.backends.split(",")}
    if not backends:
        raise SystemExit(f"no {device} backend here: {fused_xent.available_backends()}")
    for name, ops in backends.items():
        print(f"{name}: {run_backend(ops, device)} op calls, no error raised")


if __name__ == "__main__":
    main()
