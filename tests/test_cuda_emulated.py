"""The CUDA kernels (csrc/cuda/) run on the host, without a GPU (tests/emulated_kernels.py builds them): every
kernel path the launcher plans (a thread, a warp or a block per row, rows split across blocks, a cluster of blocks
per row on sm_90, NCHW positions with and without class ranges, channels_last) is checked against F.cross_entropy in
float64, through the same four ops as the CPU kernel, and run under AddressSanitizer. Out of reach here: timing,
registers.
"""

import functools
import os
import re
import subprocess
import sys

import emulated_kernels
import pytest
import torch
from emulated_kernels import CASES
from helpers import (
    make_class_target,
    make_logits,
    make_prob_target,
    run_pytest_with_poisoned_allocations,
    run_under_address_sanitizer,
)
from op_checks import (
    as_ncs,
    assert_same_bits_under,
    check_all_ops,
    check_scale_unit_grad,
    every_op_output,
    reference,
    value_check_cases,
)
from tolerances import assert_close, assert_grad_close


@pytest.fixture(scope="module")
def ops():
    return emulated_kernels.build()


def index_target(shape, ignore_index):
    return make_class_target((shape[0], *shape[2:]), shape[1], ignore_index=ignore_index)


def case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + ("" if layout == "contiguous" else f"-{layout}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_class_index_targets(ops, case, dtype):
    torch.manual_seed(0)
    shape, layout = case
    x = make_logits(shape, layout, dtype)
    weight = torch.rand(shape[1]) + 0.5
    for reduction, weighted, smoothing in (("mean", True, 0.0), ("none", False, 0.1), ("sum", True, 0.2)):
        check_all_ops(ops, x, index_target(shape, -100), weight if weighted else None, reduction, -100, smoothing)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ignored_positions_are_skipped(ops, case):
    """Every other position ignored, the first included, so that every kernel path meets one: check_all_ops wants
    the lse of no classes, (0, -inf), for those, which only a kernel that skips their logits reports."""
    torch.manual_seed(3)
    shape, layout = case
    x = make_logits(shape, layout, torch.float32)
    target = index_target(shape, None)
    target.view(-1)[::2] = -100
    for reduction, smoothing in (("mean", 0.0), ("none", 0.1)):
        check_all_ops(ops, x, target, None, reduction, -100, smoothing)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes")
def test_ignored_logits_are_never_read(ops):
    """The logits of ignored positions lie on pages that cannot be read (tests/unread_ignored_logits.py): every
    op on warp, block and split rows, NCHW positions and NCHW class ranges finishes, so no kernel touched them."""
    (library,) = (emulated_kernels.ROOT / "build" / "emulated_cuda").glob("fused_xent_emulated_cuda*.so")
    script = os.path.join(os.path.dirname(__file__), "unread_ignored_logits.py")
    run = subprocess.run([sys.executable, script, str(library), "fused_xent_emulated"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_probability_targets(ops, case):
    torch.manual_seed(1)
    shape, layout = case
    x = make_logits(shape, layout, torch.float32)
    check_all_ops(ops, x, make_prob_target(x), torch.rand(shape[1]) + 0.5, "mean", -100, 0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_float64_and_float16(ops, dtype):
    torch.manual_seed(2)
    for shape in ((9, 423), (3, 12000), (2, 600, 13), (2, 19, 8, 8)):
        x = make_logits(shape, "contiguous", dtype)
        check_all_ops(ops, x, index_target(shape, 1), torch.rand(shape[1]) + 0.5, "mean", 1, 0.1)
        if dtype == torch.float16:  # the weight autocast passes with half-precision logits
            check_all_ops(ops, x, index_target(shape, 1), torch.rand(shape[1]) + 0.5, "sum", 1, 0.1, torch.float32)
    x = make_logits((2, 23, 8, 8), "contiguous", dtype)  # NCHW probabilities: two chunks of the rest in 16-bit
    check_all_ops(ops, x, make_prob_target(x), torch.rand(23) + 0.5, "mean", -100, 0.1)


def test_probability_targets_over_32000_classes(ops):
    """One thread sums all 32000 classes of an NCHW position with probability targets: the sums keep float32
    precision (they are taken in blocks of 256 merged into the running statistics)."""
    torch.manual_seed(3)
    shape = (2, 32000, 3)
    x = make_logits(shape, "contiguous", torch.float32)
    check_all_ops(ops, x, torch.softmax(torch.randn(shape) * 3, 1), torch.rand(32000) + 0.5, "none", -100, 0.2)


@pytest.mark.parametrize("shape", [(37, 10), (9, 423), (3, 12000), (2, 600, 13), (2, 19, 8, 8)], ids=str)
def test_infinite_weight_of_an_absent_class(ops, shape):
    """Inverse-frequency weights are inf for a class that no target names; without smoothing, as in PyTorch, the
    loss and gradient stay finite (the sum of all weights is read only by the smoothing term)."""
    torch.manual_seed(5)
    target = make_class_target((shape[0], *shape[2:]), shape[1] - 1)  # the last class never occurs
    weight = 1.0 / torch.bincount(target.flatten(), minlength=shape[1]).float()
    assert weight.isinf().any()
    check_all_ops(ops, make_logits(shape, "contiguous", torch.float32), target, weight, "mean", -100, 0.0)


@pytest.mark.parametrize("shape", [(6, 10), (4, 12000), (2, 20, 3)], ids=str)
def test_mean_over_cancelling_weights(ops, shape):
    """Counted targets whose negative weights cancel: PyTorch's mean is the nonzero sum over 0, ±inf, and so is the
    reduce kernel's (forward and fused forward); with label smoothing, NaN (README)."""
    torch.manual_seed(6)
    x, y = as_ncs(make_logits(shape, "contiguous", torch.float32), index_target(shape, -100))
    y.view(-1)[:4] = torch.tensor([0, 1, 0, 1])
    y.view(-1)[4:] = -100
    weight = torch.ones(shape[1])
    weight[1] = -1.0
    expected = torch.nn.functional.cross_entropy(x.double(), y, weight.double())
    assert expected.isinf()
    for smoothing, want in ((0.0, expected.float()), (0.1, torch.tensor(float("nan")))):
        for op in (ops.cross_entropy_fwd, ops.cross_entropy_fwd_grad):
            loss = op(x, y, weight, 1, -100, smoothing)[0]
            torch.testing.assert_close(loss, want, equal_nan=True, atol=0, rtol=0, msg=f"{op} {smoothing}")


@pytest.mark.parametrize("shape", [(37, 10), (9, 423), (3, 12000), (2, 600, 13), (2, 300, 32, 32)], ids=str)
def test_out_of_range_targets_give_nan(ops, shape):
    """Without the front end's check, a class index outside [0, C) gives NaN for its position and leaves the others
    alone, on every path."""
    torch.manual_seed(4)
    x, y = as_ncs(make_logits(shape, "contiguous", torch.float32), index_target(shape, -100))
    y[0, 0] = shape[1]
    loss, lse = ops.cross_entropy_fwd(x, y, None, 0, -100, 0.0)[:2]
    assert loss[0, 0].isnan() and not loss.view(-1)[1:].isnan().any()
    # Its row is read like any other (only ignored rows are skipped): the lse is that of its logits.
    torch.testing.assert_close(lse[0, 0].sum(), torch.logsumexp(x[0, :, 0], 0), rtol=1e-5, atol=1e-5)
    grad = ops.cross_entropy_fwd_grad(x, y, None, 0, -100, 0.0)[1]
    assert grad[0, :, 0].isnan().all() and not grad[1:].isnan().any()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_threads_in_random_order(ops, monkeypatch, case):
    """The fibers take turns in a random order (FUSED_XENT_EMULATED_SCHEDULE_SEED) instead of thread order, warps
    running ahead of each other, so that a barrier missing between one thread's write and another's read shows
    whichever thread would run first; on the default device, and on one that holds a single 512-thread block, where
    every grid-stride kernel walks several positions per thread, warp or block and so reuses its shared memory. The
    results are bitwise those of thread order: every reduction's order is set by the code, not by arrival."""
    torch.manual_seed(4)
    shape, layout = case
    x = make_logits(shape, layout, torch.bfloat16)
    target = index_target(shape, None)
    target.view(-1)[1::3] = -100
    args = (*as_ncs(x, target), torch.rand(shape[1]) + 0.5, 1, -100, 0.1)
    both_forwards = lambda: (*ops.cross_entropy_fwd(*args), *ops.cross_entropy_fwd_grad(*args))  # noqa: E731
    # A few seeds on the small device: with one of the block reductions' barriers removed, half of them see it.
    for device, seeds in (({}, "1"), ({"FUSED_XENT_EMULATED_SMS": "1", "FUSED_XENT_EMULATED_THREADS_PER_SM": "512"},
                                      "1234")):
        for name, value in device.items():
            monkeypatch.setenv(name, value)
        assert_same_bits_under(monkeypatch, both_forwards, "FUSED_XENT_EMULATED_SCHEDULE_SEED", seeds)
    check_all_ops(ops, x, make_prob_target(x), None, "none", -100, 0.1)


def test_plans_change_with_the_multiprocessor_count_results_do_not(ops, monkeypatch, tmp_path):
    """20 rows of 9000 classes: a block per row on 1 multiprocessor, each row split in two ranges on 4 (the launch
    log shows it); the losses agree."""
    log = tmp_path / "launches"
    monkeypatch.setenv("FUSED_XENT_EMULATED_LAUNCH_LOG", str(log))
    x = make_logits((20, 9000), "contiguous", torch.float32).unsqueeze(-1)
    y = torch.randint(0, 9000, (20, 1))
    losses, plans = {}, {}
    for sms in ("1", "4"):
        monkeypatch.setenv("FUSED_XENT_EMULATED_SMS", sms)
        losses[sms] = ops.cross_entropy_fwd(x, y, None, 0, -100, 0.0)[0]
        plans[sms] = launches(log)
    # (grid, threads) of each launch: the rows, then the blocks' target weights summed; on 4, the ranges' combine
    # in between.
    assert plans == {"1": [(20, 512), (1, 1024)], "4": [(40, 512), (1, 256), (1, 1024)]}
    torch.testing.assert_close(losses["4"], losses["1"], rtol=2e-6, atol=0)


def test_grids_follow_the_threads_a_multiprocessor_holds(ops, monkeypatch, tmp_path):
    """The plans count the threads a multiprocessor holds as the device reports them (2048 on sm_80/sm_90, 1536 on
    sm_86/sm_89, 1024 on sm_75): 1000 rows of 40 classes (a warp per row, 256-thread blocks) get 8 waves of the
    blocks one multiprocessor holds; 4 rows of 20000 classes on 2 multiprocessors are cut into as many ranges as
    fill twice the 512-thread blocks they hold (8, 6 or 4). The losses are the same on every device."""
    log = tmp_path / "launches"
    monkeypatch.setenv("FUSED_XENT_EMULATED_LAUNCH_LOG", str(log))
    short_rows = as_ncs(make_logits((1000, 40), "contiguous", torch.float32), make_class_target((1000,), 40))
    long_rows = as_ncs(make_logits((4, 20000), "contiguous", torch.float32), make_class_target((4,), 20000))
    losses = []
    for threads_per_sm, ranges in ((2048, 4), (1536, 3), (1024, 2)):
        monkeypatch.setenv("FUSED_XENT_EMULATED_THREADS_PER_SM", str(threads_per_sm))
        monkeypatch.setenv("FUSED_XENT_EMULATED_SMS", "1")
        short_loss = ops.cross_entropy_fwd(*short_rows, None, 0, -100, 0.0)[0]
        assert launches(log)[0] == (8 * (threads_per_sm // 256), 256)
        monkeypatch.setenv("FUSED_XENT_EMULATED_SMS", "2")
        long_loss = ops.cross_entropy_fwd(*long_rows, None, 0, -100, 0.0)[0]
        assert launches(log)[0] == (4 * ranges, 512)
        losses.append(torch.cat([short_loss.view(-1), long_loss.view(-1)]))
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=2e-6, atol=0)


def test_in_place_op_refuses_inputs_in_the_logits_memory(ops):
    """The CUDA in-place op (check_inputs_apart_from_logits) refuses a weight or target whose memory range
    intersects the logits', through the same storage or another (a NumPy view), and leaves the logits as they were;
    a weight in the same buffer past the logits is accepted."""
    buffer = torch.randn(33, 40)
    x = buffer[:32].unsqueeze(-1)
    classes = torch.randint(0, 40, (32, 1))
    for name, target, weight in [
        ("weight", classes, buffer[0]),
        ("weight", classes, torch.from_numpy(buffer.numpy()[5])),
        ("target", buffer[1:33].unsqueeze(-1), None),
    ]:
        before = x.clone()
        with pytest.raises(ValueError, match=f"the {name}'s memory range intersects theirs"):
            ops.cross_entropy_fwd_grad_(x, target, weight, 1, -100, 0.1)
        assert torch.equal(x, before)
    expected = ops.cross_entropy_fwd(x.clone(), classes, buffer[32].clone(), 1, -100, 0.1)[0]
    torch.testing.assert_close(ops.cross_entropy_fwd_grad_(x, classes, buffer[32], 1, -100, 0.1), expected)


def launches(log):
    """(grid, threads) of each launch the emulation logged (FUSED_XENT_EMULATED_LAUNCH_LOG), then a fresh log."""
    shapes = [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_l2_resident_plan_of_the_fused_forward(ops, monkeypatch, tmp_path, dtype):
    """FUSED_XENT_L2_RESIDENT_ROWS_PERCENT caps the block-per-row fused forward's grid at that share of L2 in rows
    (here 25% of an emulated 48 KiB L2: one row of 3000 float32 classes, two of bfloat16) and hints its gradient
    sweep; every block then walks several rows. The gradient is bitwise that of the plain plan, the loss PyTorch's;
    other plans and ops keep their grids, and a bad setting is an error that names the variable."""
    torch.manual_seed(11)
    x = make_logits((16, 3000), "offset", dtype)
    y = make_class_target((16,), 3000, ignore_index=-100)
    weight = torch.rand(3000) + 0.5
    log = tmp_path / "launches"
    monkeypatch.setenv("FUSED_XENT_EMULATED_LAUNCH_LOG", str(log))
    monkeypatch.setenv("FUSED_XENT_EMULATED_L2_BYTES", str(48 * 1024))
    x3, y3 = as_ncs(x, y)
    w = weight.to(dtype)
    plain = ops.cross_entropy_fwd_grad(x3, y3, w, 2, -100, 0.1)
    assert launches(log)[0] == (16, 256)  # a block per row
    plain_in_place = x3.clone()
    ops.cross_entropy_fwd_grad_(plain_in_place, y3, w, 2, -100, 0.1)
    launches(log)

    monkeypatch.setenv("FUSED_XENT_L2_RESIDENT_ROWS_PERCENT", "25")
    capped = ops.cross_entropy_fwd_grad(x3, y3, w, 2, -100, 0.1)
    assert launches(log)[0] == (48 * 1024 // 4 // (3000 * x.element_size()), 256)
    assert torch.equal(capped[1], plain[1])
    torch.testing.assert_close(capped[0], plain[0], rtol=1e-6, atol=0)
    in_place = x3.clone()
    torch.testing.assert_close(ops.cross_entropy_fwd_grad_(in_place, y3, w, 2, -100, 0.1), plain[0], rtol=1e-6, atol=0)
    assert torch.equal(in_place, plain_in_place)
    check_all_ops(ops, x, y, weight, "mean", -100, 0.1)

    launches(log)
    ops.cross_entropy_fwd(x3, y3, w, 2, -100, 0.1)  # no gradient in the forward: the plain grid
    assert launches(log)[0] == (16, 256)

    for bad in ("101", "-1", "half", " 50", "+50", "99999999999999999999"):
        monkeypatch.setenv("FUSED_XENT_L2_RESIDENT_ROWS_PERCENT", bad)
        with pytest.raises(ValueError, match=re.escape(f"ROWS_PERCENT={bad} is not a whole")):
            ops.cross_entropy_fwd_grad(x3, y3, w, 2, -100, 0.1)


# (shape, dtype, FUSED_XENT_MAX_CLUSTER_BLOCKS or None for its default, blocks per cluster): class-index rows that
# miss a 64 KiB L2 on an emulated sm_90 device of 2 multiprocessors, each block of a cluster holding up to 96 KiB of
# a row. Rows of an odd length start mid-vector after the first; clusters walk several rows where the multiprocessors
# hold fewer clusters than there are rows (8 of one block for 10 rows, 3 of two blocks for 7, 1 of three blocks).
CLUSTER_CASES = [
    ((10, 3001), torch.float32, None, 1),
    ((5, 40001), torch.float16, None, 1),
    ((7, 30001), torch.float32, "2", 2),
    ((3, 50001), torch.bfloat16, "16", 2),  # the setting a bound, not a size
    ((3, 30001), torch.float64, "3", 3),
]


def cluster_case_id(case):
    shape, dtype, _, blocks = case
    return f"{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}-{blocks}"


@pytest.fixture
def sm90(monkeypatch, tmp_path):
    """An emulated sm_90 device whose L2 the fused forward's rows outgrow; returns the launch log."""
    monkeypatch.setenv("FUSED_XENT_EMULATED_CC_MAJOR", "9")
    monkeypatch.setenv("FUSED_XENT_EMULATED_L2_BYTES", str(64 * 1024))
    log = tmp_path / "launches"
    monkeypatch.setenv("FUSED_XENT_EMULATED_LAUNCH_LOG", str(log))
    return log


def cluster_launches(log):
    """(blocks per cluster, dynamic shared memory bytes) of each cluster launch logged since the last call (plain
    launches log neither)."""
    return [shape[2:] for shape in launches(log) if len(shape) == 4]


def cluster_sizes(log):
    """The blocks per cluster of each cluster launch logged since the last call."""
    return [blocks for blocks, _ in cluster_launches(log)]


def cluster_rows(shape, dtype, seed):
    """Logits, class indices with about a third ignored (the second row always, the first never) and weights."""
    torch.manual_seed(seed)
    x = make_logits(shape, "contiguous", dtype)
    target = make_class_target(shape[:1], shape[1], ignore_index=-100)
    target[0], target[1] = 5, -100
    return x, target, torch.rand(shape[1]) + 0.5


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=cluster_case_id)
def test_cluster_kernel(ops, monkeypatch, sm90, case):
    """csrc/cuda/xent_rows_cluster.cu: the fused forward ops (out of place, and in place) of rows that miss L2 on
    sm_90 take a cluster of blocks per row, each block holding its slice of the row in shared memory and the blocks
    combining their statistics through distributed shared memory; checked against PyTorch (check_all_ops) with and
    without weights and label smoothing, over every reduction, and in place over logits one element into their
    buffer, whose every row starts mid-vector."""
    shape, dtype, max_blocks, blocks = case
    if max_blocks is not None:
        monkeypatch.setenv("FUSED_XENT_MAX_CLUSTER_BLOCKS", max_blocks)
    *by_reduction, offset = checked_cluster_launches(ops, sm90, shape, dtype)
    # cross_entropy_fwd_grad and its in-place form, then the in-place form alone
    assert [[size for size, _ in launched] for launched in by_reduction] == [[blocks, blocks]] * 3
    assert [size for size, _ in offset] == [blocks]


def checked_cluster_launches(ops, log, shape, dtype):
    """check_all_ops on cluster_rows with and without weights and label smoothing, over every reduction; then the
    in-place op over the same logits one element into their buffer (every row starts mid-vector) against PyTorch.
    Returns the cluster launches (cluster_launches) of each reduction's calls, and of the in-place call."""
    x, target, weight = cluster_rows(shape, dtype, 7)
    launched = []
    for reduction, weighted, smoothing in (("mean", True, 0.1), ("none", False, 0.0), ("sum", True, 0.2)):
        check_all_ops(ops, x, target, weight if weighted else None, reduction, -100, smoothing)
        launched.append(cluster_launches(log))
    offset = make_logits(shape, "offset", dtype)
    expected_loss, expected_grad = reference(offset, target, weight.to(dtype), "mean", -100, 0.1)
    loss = ops.cross_entropy_fwd_grad_(*as_ncs(offset, target), weight.to(dtype), 1, -100, 0.1)
    launched.append(cluster_launches(log))
    assert_close(loss, expected_loss, loss.dtype, "loss")
    assert_grad_close(offset, expected_grad, dtype, "gradient")
    return launched


def test_cluster_kernel_only_where_planned(ops, monkeypatch, sm90):
    """The cluster kernel serves the fused forward of class-index rows that miss L2, on sm_90, in clusters of at most
    FUSED_XENT_MAX_CLUSTER_BLOCKS blocks, with a gradient in the logits' address phase; other ops, targets, devices
    and settings take the block-per-row kernels, whose results the cluster kernel's match."""
    monkeypatch.setenv("FUSED_XENT_MAX_CLUSTER_BLOCKS", "2")
    x, target, weight = cluster_rows((7, 30001), torch.float32, 8)
    x3, y3 = as_ncs(x, target)
    rest = (weight, 1, -100, 0.1)
    clustered = ops.cross_entropy_fwd_grad(x3, y3, *rest)
    assert cluster_sizes(sm90) == [2]
    offset = as_ncs(make_logits((7, 30001), "offset", torch.float32).copy_(x), target)[0]
    calls = {"forward only": lambda: ops.cross_entropy_fwd(x3, y3, *rest),
             "gradient out of phase": lambda: ops.cross_entropy_fwd_grad(offset, y3, *rest),
             "probabilities": lambda: ops.cross_entropy_fwd_grad(x3, make_prob_target(x3), *rest)}
    settings = (("FUSED_XENT_MAX_CLUSTER_BLOCKS", "1"), ("FUSED_XENT_MAX_CLUSTER_BLOCKS", "0"),
                ("FUSED_XENT_EMULATED_L2_BYTES", str(8 << 20)), ("FUSED_XENT_EMULATED_CC_MAJOR", "8"))
    assert_no_cluster_launch(monkeypatch, sm90, calls, settings, lambda: ops.cross_entropy_fwd_grad(x3, y3, *rest),
                             clustered)


def assert_no_cluster_launch(monkeypatch, log, calls, settings, forward, clustered):
    """None of `calls` ({why: call}) launches the cluster kernel, nor does forward() under any of `settings`
    ((name, value) of an environment variable), whose first two results match `clustered`, those it gave without
    them."""
    for why, call in calls.items():
        call()
        assert cluster_launches(log) == [], why
    for name, value in settings:
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            results = forward()
        assert cluster_launches(log) == [], (name, value)
        torch.testing.assert_close(clustered[0], results[0], rtol=1e-6, atol=0)  # the loss
        torch.testing.assert_close(clustered[1], results[1], rtol=1e-5, atol=1e-10)  # the gradient, or lse


@pytest.mark.parametrize("case", CLUSTER_CASES[2:], ids=cluster_case_id)
def test_cluster_blocks_in_random_order(ops, monkeypatch, sm90, case):
    """The cluster kernel with the fibers of all the blocks of a cluster taking turns at random: its results are
    bitwise those of thread order, so no block reads a slice's statistics before their owner has published them, or
    overwrites its own while another block may still read them."""
    shape, dtype, max_blocks, blocks = case
    monkeypatch.setenv("FUSED_XENT_MAX_CLUSTER_BLOCKS", max_blocks)
    x, target, weight = cluster_rows(shape, dtype, 9)
    args = (*as_ncs(x, target), weight.to(dtype), 1, -100, 0.1)
    assert_same_bits_under(monkeypatch, lambda: ops.cross_entropy_fwd_grad(*args), "FUSED_XENT_EMULATED_SCHEDULE_SEED",
                           "123")
    assert cluster_sizes(sm90) == [blocks] * 4


# (shape, dtype, multiprocessors, (FUSED_XENT_BULK_SLICE_KIB, FUSED_XENT_BULK_BUFFERS), blocks per cluster): rows
# that start 16-byte aligned and span a multiple of 16 bytes, whose slices the copy engine fills with
# FUSED_XENT_BULK_ROW_SLICES=1 (by default two buffers a block of up to 100 KiB each, one block per multiprocessor
# where they exceed half its shared memory). Clusters walk several rows, so each buffer is refilled: 8 clusters of
# one block for 10 rows of 12 KB, 2 of one block for 9 rows of 80 KB, 1 of two for 7, 1 of three for 3 float64 rows
# of 240 KB, 1 of three for 7 rows in slices of at most 48 KiB (two blocks per multiprocessor); three buffers, 2
# clusters of one block for 11 rows; four buffers of at most 50 KiB, 1 cluster of three blocks for 13 rows.
BULK_CASES = [
    ((10, 3008), torch.float32, 2, (None, None), 1),
    ((9, 40000), torch.bfloat16, 2, (None, None), 1),
    ((7, 30000), torch.float32, 2, (None, None), 2),
    ((3, 30000), torch.float64, 4, (None, None), 3),
    ((7, 30000), torch.float32, 2, ("48", None), 3),
    ((11, 12000), torch.float32, 2, (None, "3"), 1),
    ((13, 30000), torch.float32, 4, (None, "4"), 3),
]


def bulk_slice_bytes(shape, dtype, blocks, buffers=2):
    """The dynamic shared memory of a bulk-copy cluster launch: its buffers of a slice rounded up to 64 classes."""
    classes_per_block = -(-shape[1] // blocks)
    return buffers * -(-classes_per_block // 64) * 64 * dtype.itemsize


@pytest.fixture
def bulk_slices(monkeypatch, sm90):
    """An emulated sm_90 device with FUSED_XENT_BULK_ROW_SLICES=1; returns the launch log."""
    monkeypatch.setenv("FUSED_XENT_BULK_ROW_SLICES", "1")
    return sm90


def bulk_case_id(case):
    shape, dtype, _, _, blocks = case
    return f"{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}-{blocks}"


def bulk_setup(monkeypatch, multiprocessors, settings):
    """Sets the emulated multiprocessors and the case's settings; returns the buffers per block."""
    monkeypatch.setenv("FUSED_XENT_EMULATED_SMS", str(multiprocessors))
    for name, value in zip(("FUSED_XENT_BULK_SLICE_KIB", "FUSED_XENT_BULK_BUFFERS"), settings, strict=True):
        if value is not None:
            monkeypatch.setenv(name, value)
    return int(settings[1] or 2)


@pytest.mark.parametrize("case", BULK_CASES, ids=bulk_case_id)
def test_bulk_cluster_kernel(ops, monkeypatch, bulk_slices, case):
    """csrc/cuda/xent_rows_cluster.cu, rows_bulk_cluster_kernel: the copy engine (emulated) brings each block its
    slice of a later position while the block works on this one, in buffers it takes in turn, for the plain and
    the fused forward; checked against PyTorch (check_all_ops) with and without weights and label smoothing, over every
    reduction, with a third of the rows ignored (never fetched). Logits one element into their buffer start
    mid-vector, which the copy engine cannot copy: the blocks load those slices themselves."""
    shape, dtype, multiprocessors, settings, blocks = case
    buffers = bulk_setup(monkeypatch, multiprocessors, settings)
    monkeypatch.setenv("FUSED_XENT_MAX_CLUSTER_BLOCKS", "16")
    bulk = (blocks, bulk_slice_bytes(shape, dtype, blocks, buffers))
    *by_reduction, offset = checked_cluster_launches(ops, bulk_slices, shape, dtype)
    assert by_reduction == [[bulk] * 3] * 3  # cross_entropy_fwd, cross_entropy_fwd_grad and its in-place form
    assert bulk not in offset


@pytest.mark.parametrize("case", BULK_CASES[1:], ids=bulk_case_id)
def test_bulk_copies_early_late_and_in_random_order(ops, monkeypatch, bulk_slices, case):
    """The bulk-copy cluster kernel under random fiber orders: an even FUSED_XENT_EMULATED_SCHEDULE_SEED lands each
    copy when it starts (a buffer refilled while a thread still reads it would change what it reads), an odd one
    only when a thread waits for it (a read before the wait, or a wait on the wrong phase, would read the buffer's
    old contents). The results are bitwise those of thread order either way."""
    shape, dtype, multiprocessors, settings, blocks = case
    buffers = bulk_setup(monkeypatch, multiprocessors, settings)
    x, target, weight = cluster_rows(shape, dtype, 9)
    args = (*as_ncs(x, target), weight.to(dtype), 1, -100, 0.1)
    assert_same_bits_under(monkeypatch, lambda: ops.cross_entropy_fwd_grad(*args), "FUSED_XENT_EMULATED_SCHEDULE_SEED",
                           ("124", "123"))
    assert cluster_launches(bulk_slices) == [(blocks, bulk_slice_bytes(shape, dtype, blocks, buffers))] * 3


def test_bulk_cluster_kernel_on_channels_last_rows(ops, bulk_slices):
    """The pixels of a channels_last (N, C, H, W) input are rows too, each stride_s after the last: the bulk-copy
    kernel takes rows of more than 2048 classes there as well, each pixel's row 16-byte aligned."""
    torch.manual_seed(11)
    shape = (2, 3008, 2, 3)
    x = make_logits(shape, "channels_last", torch.float32)
    check_all_ops(ops, x, index_target(shape, -100), torch.rand(shape[1]) + 0.5, "mean", -100, 0.1)
    assert cluster_launches(bulk_slices) == [(1, bulk_slice_bytes(shape, torch.float32, 1))] * 3


def test_bulk_cluster_kernel_only_where_planned(ops, monkeypatch, bulk_slices):
    """FUSED_XENT_BULK_ROW_SLICES=1 gives the forward ops (plain and fused) of class-index rows of more than 2048
    classes that start 16-byte aligned and span a multiple of 16 bytes, on sm_90, at least as many as the clusters
    that fit, to the bulk-copy cluster kernel, whatever L2 holds; other rows, ops, targets and devices take the
    kernels they would without it, whose results its results match.
    Any setting but 0 and 1 is an error that names it, as is a FUSED_XENT_BULK_SLICE_KIB outside 16-100 and a
    FUSED_XENT_BULK_BUFFERS outside 2-4."""
    x, target, weight = cluster_rows((9, 3008), torch.float32, 8)
    x3, y3 = as_ncs(x, target)
    rest = (weight, 1, -100, 0.1)
    monkeypatch.setenv("FUSED_XENT_EMULATED_L2_BYTES", str(8 << 20))  # every row fits: the loads kernel never serves
    bulk = ops.cross_entropy_fwd_grad(x3, y3, *rest)
    bulk_forward = ops.cross_entropy_fwd(x3, y3, *rest)
    assert cluster_launches(bulk_slices) == [(1, bulk_slice_bytes((9, 3008), torch.float32, 1))] * 2
    odd = make_logits((9, 3007), "contiguous", torch.float32)
    short = make_logits((9, 2048), "contiguous", torch.float32)
    few = x[:7]  # 8 clusters of one block fit the 2 emulated multiprocessors
    y_short = target.clamp(max=2047)[:, None]
    unweighted = (None, 1, -100, 0.1)
    calls = {"backward": lambda: ops.cross_entropy_bwd(torch.ones(()), x3, y3, *rest[:1], *bulk_forward[1:], *rest[1:]),
             "probabilities": lambda: ops.cross_entropy_fwd_grad(x3, make_prob_target(x3), *rest),
             "rows of an odd size": lambda: ops.cross_entropy_fwd_grad(odd[..., None], y_short, *unweighted),
             "a warp per row": lambda: ops.cross_entropy_fwd_grad(short[..., None], y_short, *unweighted),
             "fewer rows than clusters": lambda: ops.cross_entropy_fwd_grad(few[..., None], y3[:7], *rest)}
    settings = (("FUSED_XENT_BULK_ROW_SLICES", "0"), ("FUSED_XENT_EMULATED_CC_MAJOR", "8"))
    assert_no_cluster_launch(monkeypatch, bulk_slices, calls, settings,
                             lambda: ops.cross_entropy_fwd_grad(x3, y3, *rest), bulk)
    assert_no_cluster_launch(monkeypatch, bulk_slices, {}, settings,
                             lambda: ops.cross_entropy_fwd(x3, y3, *rest), bulk_forward)
    for name, value, message in (("FUSED_XENT_BULK_SLICE_KIB", "15", "SLICE_KIB=15 is below 16"),
                                 ("FUSED_XENT_BULK_BUFFERS", "1", "BUFFERS=1 is below 2"),
                                 ("FUSED_XENT_BULK_BUFFERS", "5", "BUFFERS=5 is not a whole number from 0 to 4"),
                                 ("FUSED_XENT_BULK_SLICE_KIB", "101", "SLICE_KIB=101 is not a whole number from 0 to"),
                                 ("FUSED_XENT_BULK_ROW_SLICES", "2", "ROW_SLICES=2 is not a whole number from 0 to 1")):
        with monkeypatch.context() as patch, pytest.raises(ValueError, match=message):
            patch.setenv(name, value)
            ops.cross_entropy_fwd_grad(x3, y3, *rest)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_threads_that_take_several_positions(ops, monkeypatch, layout):
    """On one emulated multiprocessor the grid holds 16384 threads (8 waves of 8 blocks of 256), fewer than these
    18432 positions: threads of the thread-per-position kernels walk two positions each. Ignored targets here and
    there, weights, smoothing, probability targets."""
    torch.manual_seed(5)
    monkeypatch.setenv("FUSED_XENT_EMULATED_SMS", "1")
    shape = (2, 19, 96, 96)
    x = make_logits(shape, layout, torch.float32)
    target = index_target(shape, -100)
    weight = torch.rand(19) + 0.5
    check_all_ops(ops, x, target, weight, "mean", -100, 0.1)
    check_all_ops(ops, x, target, None, "none", -100, 0.0)
    check_all_ops(ops, x, make_prob_target(x), weight, "sum", -100, 0.2)


@pytest.mark.parametrize("shape", [(100, 300), (20, 3000), (20, 9000)], ids=str)
def test_warps_and_blocks_that_take_several_rows(ops, monkeypatch, shape):
    """On one emulated multiprocessor that holds 256 threads, the row kernels' grids hold 64 warps of warp rows and 8
    blocks of block rows, fewer than these rows: each warp or block walks several, and reads the next one's class
    index a row ahead. Ignored targets here and there, weights, smoothing, probability targets."""
    torch.manual_seed(6)
    monkeypatch.setenv("FUSED_XENT_EMULATED_SMS", "1")
    monkeypatch.setenv("FUSED_XENT_EMULATED_THREADS_PER_SM", "256")
    x = make_logits(shape, "contiguous", torch.float32)
    target = index_target(shape, -100)
    weight = torch.rand(shape[1]) + 0.5
    check_all_ops(ops, x, target, weight, "mean", -100, 0.1)
    check_all_ops(ops, x, target, None, "none", -100, 0.0)
    check_all_ops(ops, x, make_prob_target(x), weight, "sum", -100, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [((70, 7), "offset"), ((37, 32), "contiguous"), ((2, 19, 5, 7), "channels_last")],
                         ids=case_id)
def test_rows_stored_by_warps_are_those_stored_by_threads(ops, monkeypatch, case, dtype):
    """Rows of up to 32 classes one after another: a warp stores their gradient from shared memory (by default) or each
    thread its own (FUSED_XENT_STAGED_ROW_STORES=0), with the same bits, in every op, for rows that start mid-vector,
    ignored positions, weights, smoothing and probability targets; float64 rows are never staged."""
    torch.manual_seed(6)
    shape, layout = case
    x = make_logits(shape, layout, dtype)
    weight = (torch.rand(shape[1]) + 0.5).to(dtype)
    for y, w, reduction, smoothing in ((index_target(shape, -100), weight, "mean", 0.1),
                                       (make_prob_target(x), None, "none", 0.0)):
        outputs = functools.partial(every_op_output, ops, x, y, w, reduction, -100, smoothing)
        assert_same_bits_under(monkeypatch, outputs, "FUSED_XENT_STAGED_ROW_STORES", ["0"])
    monkeypatch.setenv("FUSED_XENT_STAGED_ROW_STORES", "2")
    with pytest.raises(ValueError, match="FUSED_XENT_STAGED_ROW_STORES=2 is not a whole number from 0 to 1"):
        ops.cross_entropy_fwd_grad(*as_ncs(x, index_target(shape, -100)), None, 1, -100, 0.0)


@pytest.mark.parametrize("shape", [(16, 1000), (3, 12000), (4, 300, 37), (2, 3000, 5), (1, 64000, 8)], ids=str)
def test_loss_sums_at_offset_logits_and_with_a_masked_class(ops, shape):
    """Label smoothing and probability targets at logits near 1.2e4, and with class 0 masked at -1e9: the kernels
    sum relative to each position's max, merging ranges as the max rises, so float32 precision holds. (1, 64000, 8)
    cuts each position into 500 ranges, which the combine merges in two levels (one chain of 500 lost 1.1e-5)."""
    generator = torch.Generator().manual_seed(9)
    offset = torch.randn(shape, generator=generator) * 2 + 1.2e4
    masked = torch.randn(shape, generator=generator)
    masked[:, 0] = -1e9
    weight = torch.rand(shape[1], generator=generator) + 0.5
    probabilities = torch.softmax(torch.randn(shape, generator=generator) * 3, 1)
    for x in (offset, masked):
        classes = torch.randint(1, shape[1], (shape[0], *shape[2:]), generator=generator)
        for target, smoothing in ((probabilities, 0.2), (classes, 0.3)):
            expected, _ = reference(x, target, weight, "none", -100, smoothing)
            x3, y3 = as_ncs(x, target)
            loss = ops.cross_entropy_fwd(x3, y3, weight, 0, -100, smoothing)[0]
            torch.testing.assert_close(loss.double(), expected.reshape(loss.shape), rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape", [(4, 5), (9, 423), (3, 3000), (3, 12000), (2, 300, 5), (2, 19, 8, 8)], ids=str)
def test_near_certain_target_at_huge_logits(ops, shape):
    """A target 8 above every other class at logits of 1.2e4, on every kernel path (a thread, a warp, a block per
    row, split rows, NCHW with and without class ranges): p - 1 = -(C - 1) e^-8 is below the rounding of a float32
    lse there (~7e-4), so the recomputing backward must take p from the max and log(sum) it saved apart, and the
    fused forward must do the same (tests/test_numerics.py holds the other backends to this)."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(shape, generator=g) * 0.5 + 11992.0
    target = make_class_target((shape[0], *shape[2:]), shape[1], generator=g)
    x.scatter_(1, target.unsqueeze(1), 12000.0)
    x3, y3 = as_ncs(x, target)
    for weight, smoothing in ((None, 0.0), (None, 0.05), (torch.rand(shape[1], generator=g) + 0.5, 0.0)):
        expected = reference(x, target, weight, "sum", -100, smoothing)[1].reshape(x3.shape)
        loss, lse, total_weight = ops.cross_entropy_fwd(x3, y3, weight, 2, -100, smoothing)
        recomputed = ops.cross_entropy_bwd(torch.ones(()), x3, y3, weight, lse, total_weight, 2, -100, smoothing)
        fused = ops.cross_entropy_fwd_grad(x3, y3, weight, 2, -100, smoothing)[1]
        for name, grad in (("backward", recomputed), ("fused forward", fused)):
            torch.testing.assert_close(grad.double(), expected, rtol=0, atol=1e-6, msg=f"{name} {smoothing}")


def test_every_output_element_is_written():
    """Every launch plan's four ops (class-index and probability targets, the cluster and bulk-copy kernels, threads,
    warps and blocks that take several rows or positions) again with every fresh allocation poisoned."""
    run_pytest_with_poisoned_allocations(
        __file__, "class_index_targets and float32 or probability_targets or cluster_kernel and not planned or several")


def test_no_access_outside_tensors_under_address_sanitizer():
    """tests/emulated_memcheck.py in a process of its own, with AddressSanitizer's runtime preloaded."""
    assert "no AddressSanitizer report" in run_under_address_sanitizer("emulated_memcheck.py")


def test_value_check_kernel(ops):
    """csrc/cuda/xent_checks.cu: flags [a class index neither ignore_index nor in range, a NaN weight] on every case,
    long targets looping over the whole grid included."""
    for target, weight, ignore_index, classes, expected in value_check_cases("cpu"):
        assert ops.value_check(target, weight, ignore_index, classes).tolist() == expected, (
            None if target is None else (target.dtype, target.numel()), weight is not None and weight.dtype,
            ignore_index, classes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_scale_unit_grad_kernel(ops, dtype):
    """csrc/cuda/xent_scale.cu: the in_forward and inplace modes' backward, bit for bit that of PyTorch's ops."""
    check_scale_unit_grad(ops.scale_unit_grad_, dtype)


@pytest.mark.parametrize("grad_mode", ["in_forward", "inplace"])
def test_front_end_scales_through_the_backend_kernel(ops, monkeypatch, grad_mode):
    """The backward of in_forward and inplace with the emulated scaling kernel serving the torch backend (as the CUDA
    one serves the CUDA backend on a GPU): it takes a 0-d upstream gradient on a dense buffer, with no read of the
    upstream gradient on the host, and gives PyTorch's gradient in the buffer it hands out. Per-position upstream
    gradients (reduction none) and logits with gaps (inplace over a slice) are scaled by PyTorch's ops instead (on
    the CPU after the host has read the upstream gradient, which costs nothing there)."""
    import dataclasses

    import fused_xent
    from fused_xent import _backends

    calls = []

    def kernel(grad, grad_loss, target, ignore_index):
        calls.append((grad.data_ptr(), grad_loss.shape, target is None))
        ops.scale_unit_grad_(grad, grad_loss, target, ignore_index)

    backend = _backends.backend_ops("torch")
    monkeypatch.setitem(_backends._AVAILABLE_BACKENDS, "torch", dataclasses.replace(backend, scale_unit_grad_=kernel))
    torch.manual_seed(4)
    wide = torch.randn(12, 60, dtype=torch.float64)
    target = torch.randint(0, 30, (12,))
    target[::4] = -100
    dense, with_gaps = slice(0, 60), slice(0, 60, 2)
    cases = [(dense, "mean", torch.tensor(0.5), True), (dense, "sum", torch.tensor(1.0), True),
             (dense, "none", torch.rand(12), False)]
    if grad_mode == "inplace":
        cases.append((with_gaps, "mean", torch.tensor(2.0), False))
    for columns, reduction, grad_output, served in cases:
        leaf = wide.clone().requires_grad_()
        logits = leaf.clone()[:, columns]  # clone's backward passes the gradient on as it is
        loss = fused_xent.cross_entropy(logits, target, reduction=reduction, backend="torch", grad_mode=grad_mode)
        before = len(calls)
        with pytest.MonkeyPatch.context() as patch:
            if served:
                patch.setattr(torch.Tensor, "item", lambda self: pytest.fail("the host read the upstream gradient"))
            loss.backward(grad_output)
        expected_leaf = wide.clone().requires_grad_()
        torch.nn.functional.cross_entropy(expected_leaf[:, columns], target, reduction=reduction).backward(grad_output)
        torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=1e-12, atol=1e-15)
        assert len(calls) - before == int(served), (columns, reduction)


@pytest.fixture
def value_check_calls(ops, monkeypatch):
    """The emulated value-check kernel serving the torch backend's calls (as the CUDA one serves the CUDA backend's
    on a GPU), recording each call's arguments in the list it returns."""
    import fused_xent._value_check as value_check

    calls = []

    def kernel(*args):
        calls.append(args)
        return ops.value_check(*args)

    monkeypatch.setitem(value_check.VALUE_CHECK_KERNELS, "torch", kernel)
    return calls


def test_front_end_reads_the_value_check_kernel(value_check_calls, monkeypatch):
    """fused_xent._value_check.ValueCheck with the kernel serving the torch backend's calls on CPU tensors (as it serves
    the CUDA backend's on a GPU): it is what runs for plain tensors, and only for that backend's calls, and its
    verdict gives PyTorch's loss, the IndexError that names the first bad target, and the NaN-weight error."""
    import fused_xent
    import fused_xent._value_check as value_check

    calls = value_check_calls
    x = torch.randn(64, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (64,))
    target[::5] = -100
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    loss = fused_xent.cross_entropy(x, target, weight, backend="torch")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, target, weight))
    assert len(calls) == 1 and calls[0][2:] == (-100, 7)
    # Only the calls of the backend it is registered for take it (on a GPU, the CUDA backend's).
    kernel = value_check.VALUE_CHECK_KERNELS["torch"]
    monkeypatch.delitem(value_check.VALUE_CHECK_KERNELS, "torch")
    monkeypatch.setitem(value_check.VALUE_CHECK_KERNELS, "cpu", kernel)
    fused_xent.cross_entropy(x, target, weight, backend="torch")
    assert len(calls) == 1
    monkeypatch.setitem(value_check.VALUE_CHECK_KERNELS, "torch", kernel)
    target[17] = 7
    with pytest.raises(IndexError, match="target 7 at position 17 is out of range for 7 classes"):
        fused_xent.cross_entropy(x, target, backend="torch")
    weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"weight contains NaN \(first at class 3\)"):
        fused_xent.cross_entropy(x, target.clamp(0, 6), weight, backend="torch")
    assert len(calls) == 3


def test_front_end_reads_the_value_check_kernel_for_parameter_weights(value_check_calls):
    """Class weights held as an nn.Parameter (frozen, for class indices; learned, for probabilities) are plain tensors
    to the dispatcher: the one-kernel check serves them (with the targets) rather than the PyTorch ops, and finds a
    NaN in them."""
    import fused_xent

    calls = value_check_calls
    x = torch.randn(16, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (16,))
    frozen = torch.nn.Parameter(torch.rand(5, dtype=torch.float64) + 0.5, requires_grad=False)
    loss = fused_xent.cross_entropy(x, target, frozen, backend="torch")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, target, frozen))
    assert len(calls) == 1 and calls[0][0] is not None
    target[9] = 5
    with pytest.raises(IndexError, match="target 5 at position 9 is out of range for 5 classes"):
        fused_xent.cross_entropy(x, target, frozen, backend="torch")
    learned = torch.nn.Parameter(torch.rand(5, dtype=torch.float64) + 0.5)
    probabilities = torch.rand(16, 5, dtype=torch.float64).softmax(1)
    loss = fused_xent.cross_entropy(x, probabilities, learned, backend="torch")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, probabilities, learned))
    assert len(calls) == 3 and calls[2][0] is None
    with torch.no_grad():
        learned[2] = float("nan")
    with pytest.raises(ValueError, match=r"weight contains NaN \(first at class 2\)"):
        fused_xent.cross_entropy(x, probabilities, learned, backend="torch")
    assert len(calls) == 4
