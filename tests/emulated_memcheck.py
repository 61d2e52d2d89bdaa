"""Every op of the emulated CUDA kernels on every launch plan, in a build with AddressSanitizer: an access outside
a tensor (past a row, past a split's range, at an out-of-range class index) or outside a block's dynamic shared
memory (the cluster kernel's slice of a row) ends the process with ASan's report, as compute-sanitizer's memcheck
would on a GPU. Run by tests/test_cuda_emulated.py, with libasan preloaded:

    LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python tests/emulated_memcheck.py
"""

import itertools
import os
import tempfile

import emulated_kernels
import torch
from emulated_kernels import CASES
from helpers import make_class_target, make_logits, make_prob_target
from op_checks import as_ncs, unit_grad_cases


def main():
    ops = emulated_kernels.build("asan", ["-fsanitize=address", "-fno-omit-frame-pointer"])
    torch.manual_seed(0)
    calls = 0
    for shape, layout in CASES:
        logits = make_logits(shape, layout, torch.float32)
        classes = make_class_target((shape[0], *shape[2:]), shape[1], ignore_index=-100)
        out_of_range = classes.clone()
        out_of_range.view(-1)[1::7] = shape[1]
        out_of_range.view(-1)[2::11] = -5
        probabilities = make_prob_target(logits)
        weight = torch.rand(shape[1]) + 0.5
        for target, (w, reduction, smoothing) in itertools.product(
                (classes, out_of_range, probabilities), ((None, 0, 0.0), (weight, 1, 0.1))):
            x, y = as_ncs(logits, target)
            loss, lse, total_weight = ops.cross_entropy_fwd(x, y, w, reduction, -100, smoothing)
            ops.cross_entropy_bwd(torch.ones_like(loss), x, y, w, lse, total_weight, reduction, -100, smoothing)
            ops.cross_entropy_fwd_grad(x, y, w, reduction, -100, smoothing)
            ops.cross_entropy_fwd_grad_(x.clone(), y, w, reduction, -100, smoothing)
            calls += 4
    for grad, target in unit_grad_cases(torch.float32):
        for factor in (0.5, float("inf")):  # the vector path, and the one that reads each element's target
            ops.scale_unit_grad_(grad.clone(), torch.tensor(factor), target, -100)
            calls += 1
    calls += cluster_kernel_calls(ops)
    print(f"{calls} op calls, no AddressSanitizer report")


def cluster_kernel_calls(ops):
    """The fused forward ops on an emulated sm_90 device of 4 multiprocessors whose L2 the rows outgrow: clusters of
    1, 2 and 3 blocks, each block staging its slice of a row in dynamic shared memory of the size the launch asks
    for, in place over logits one element into their buffer too; then the same with the copy engine filling the
    slices (FUSED_XENT_BULK_ROW_SLICES=1) of rows that start 16-byte aligned, for the plain forward as well, the
    offset logits left to the blocks' own loads. Fails unless each call took the cluster kernel."""
    calls = 0
    shapes = {"0": (((3, 3001), torch.float32), ((3, 30001), torch.float32), ((2, 30001), torch.float64)),
              "1": (((17, 3008), torch.float32), ((3, 30000), torch.float32), ((2, 30000), torch.float64))}
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "launches")
        os.environ.update(FUSED_XENT_EMULATED_CC_MAJOR="9", FUSED_XENT_EMULATED_L2_BYTES=str(64 * 1024),
                          FUSED_XENT_EMULATED_SMS="4", FUSED_XENT_MAX_CLUSTER_BLOCKS="3",
                          FUSED_XENT_EMULATED_LAUNCH_LOG=log)
        for bulk, (shape, dtype) in ((bulk, case) for bulk, cases in shapes.items() for case in cases):
            os.environ["FUSED_XENT_BULK_ROW_SLICES"] = bulk
            weight = (torch.rand(shape[1]) + 0.5).to(dtype)
            target = make_class_target(shape[:1], shape[1])
            target[1] = -100
            for layout in ("contiguous", "offset"):
                x, y = as_ncs(make_logits(shape, layout, dtype), target)
                if layout == "contiguous":  # a fresh gradient is in the phase of these logits only
                    ops.cross_entropy_fwd_grad(x, y, weight, 1, -100, 0.1)
                    calls += 1
                    if bulk == "1":  # the bulk-copy kernel serves the plain forward too
                        ops.cross_entropy_fwd(x, y, weight, 2, -100, 0.0)
                        calls += 1
                ops.cross_entropy_fwd_grad_(x, y, weight, 0, -100, 0.0)
                calls += 1
        with open(log) as lines:
            clustered = sum(len(line.split()) == 4 for line in lines)  # grid, threads, blocks, shared memory
    if clustered != calls:
        raise AssertionError(f"{clustered} of {calls} fused forward calls took the cluster kernel")
    return calls


if __name__ == "__main__":
    main()
