"""Launchers of the Triton kernels (fused_xent/triton_kernels.py): the block table, the grids, and the op functions
that fused_xent/_triton_ops.py registers.

The op functions take the arguments of the C++ op schemas (csrc/fused_xent.cpp), in the same order, and return the
same outputs: logits are an (N, C, S) view, target is (N, S) int64 class indices or (N, C, S) probabilities, weight
is an optional (C,) tensor, reduction is 0 (none), 1 (mean) or 2 (sum).
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._grad_modes import is_leaf_that_requires_grad
from ._layout import input_in_logits_memory, is_dense, kernel_logits
from ._triton_env import INTERPRET, TRITON_CPU_HINT, interpreter_problem
from ._validate import has_no_values
from .reference import REDUCTION_MEAN, REDUCTION_NONE, REDUCTION_SUM, accumulation_dtype, reduce_loss
from .triton_kernels import (
    xent_backward_kernel,
    xent_forward_kernel,
    xent_scale_unit_grad_kernel,
    xent_split_combine_kernel,
    xent_split_statistics_kernel,
    xent_target_weight_kernel,
)

# Why the interpreter cannot run the kernels with the NumPy installed (None where it can, or is not asked for).
INTERPRETER_PROBLEM = interpreter_problem(triton.__version__) if INTERPRET else None

# The block table (deterministic, no autotuning). Rows: a program walks a row in column blocks of up to 16 KB (32 KB
# of float64), 16 elements per thread (8 float64); the per-row max and sums reduce across the warps of the block.
# Rows of up to 512 classes take one warp (two in float64), and rows of up to 256 (128 in float64) share it. Triton lays
# a tile's warps and lanes along the class axis first, so each thread holds a piece of every row of the tile and that
# row's running state: at most 4 rows per thread (the old 4096-element multi-row tiles held 16-32, took 255 registers on
# sm_90 and spilled).
ROW_TILE = 4096  # float32 elements per loop step; 16-bit logits take twice as many classes
ROW_ELEMENTS_PER_THREAD = 16  # 8 float64 values (16 spilled on sm_90 with Triton 3.6)
MAX_ROW_STATES_PER_THREAD = 4
# Spatial: a program takes up to 128 16-byte vectors of consecutive positions and walks the classes a few at a time.
# Warps are added until each thread holds 32 float32 registers of logits (16 float64 values): 64 16-bit values per
# thread took 255 registers and spilled up to 412 bytes on sm_90 with Triton 3.6 (probability targets, the split
# statistics with smoothing). 32-bit tiles put every warp on the positions, so a position's reductions over the
# classes stay inside one thread; 16-bit tiles (1024 positions, 8 classes a step) put two of their eight warps on
# the classes, whose partial max and sums meet in shared memory (about 20 barriers in the forward's sm_90 PTX).
# Tiles without that (4 classes a step, or 512 positions on 2 warps) took more registers where the gradient is
# written (138-214 against 121-128 with Triton 3.6): not timed yet (benchmarks/RESULTS.md).
SPATIAL_POSITION_VECTORS = 128
SPATIAL_REGISTERS_PER_THREAD = 32
MAX_SPATIAL_WARPS = 8
SPATIAL_TILE = 4096
MIN_SPATIAL_CLASSES = 8
# Class ranges (few positions, many classes): never shorter than this nor than one column block, so that a range's
# state (three numbers per position, written and read back) stays a few percent of the logits it reads. The split
# aims at two waves of programs, counting the warps a multiprocessor holds (gpu_capacity).
MIN_SPLIT_CLASSES = 128
# The combine merges a position's ranges one after another: more than this many would cost more than they save
# (and the second grid axis stays far below its limit of 65535). It takes them in groups (see
# xent_split_combine_kernel): one chain of 500 merges lost 1e-5 of the loss with smoothing and a class masked at -1e9.
MAX_SPLITS = 512
MERGE_GROUP = 16


@dataclass(frozen=True)
class TileConfig:
    block_p: int  # positions per program
    block_c: int  # classes per loop step
    num_warps: int


def _values_per_thread(float32_values: int, element_size: int) -> int:
    """Values of a dtype that take the registers of float32_values float32 values (float64 half as many)."""
    return float32_values // max(1, element_size // 4)


def tile_config(num_classes: int, positions_per_n: int, spatial: bool, element_size: int) -> TileConfig:
    """Block sizes and warps from C, S (positions per batch entry), the layout and the dtype width."""
    next_pow2 = triton.next_power_of_2
    if spatial:
        vector = max(1, 16 // element_size)  # positions per 16-byte load
        block_p = min(next_pow2(positions_per_n), SPATIAL_POSITION_VECTORS * vector)
        # Few positions (small S) take more classes per step instead.
        block_c = min(next_pow2(num_classes), max(MIN_SPATIAL_CLASSES, SPATIAL_TILE // block_p))
        values_per_thread = _values_per_thread(SPATIAL_REGISTERS_PER_THREAD, element_size)
        num_warps = max(1, min(MAX_SPATIAL_WARPS, block_p * block_c // (32 * values_per_thread)))
        return TileConfig(block_p, block_c, num_warps)
    block_c = min(next_pow2(num_classes), ROW_TILE * max(1, 4 // element_size))
    lanes_per_warp = 32
    values_per_thread = _values_per_thread(ROW_ELEMENTS_PER_THREAD, element_size)
    if block_c >= lanes_per_warp * values_per_thread:
        return TileConfig(1, block_c, min(16, block_c // (lanes_per_warp * values_per_thread)))
    # One warp. A row of fewer than 32 classes takes block_c lanes, so 32 // block_c rows sit side by side in it;
    # longer rows each span all 32 lanes, and every lane holds a piece of every row.
    rows_side_by_side = max(1, lanes_per_warp // block_c)
    block_p = min(lanes_per_warp * values_per_thread // block_c, MAX_ROW_STATES_PER_THREAD * rows_side_by_side)
    return TileConfig(block_p, block_c, 1)


def class_splits(num_classes: int, position_programs: int, tile: TileConfig, device: torch.device) -> tuple[int, int]:
    """(splits, split_len): each position's classes cut into `splits` ranges of split_len classes (whole column
    blocks; the last range may be shorter) when the programs over positions alone would fill less than half of the
    GPU's resident programs; (1, C) otherwise. Asks the device for its size only when C could be split at all."""
    if num_classes // max(tile.block_c, MIN_SPLIT_CLASSES) < 2 or position_programs == 0:
        return 1, num_classes
    gpu = gpu_capacity(device)
    resident = gpu.multiprocessors * max(1, gpu.warps_per_multiprocessor // tile.num_warps)
    if 2 * position_programs >= resident:
        return 1, num_classes
    # Counted in column blocks, the last of which may be partial. A cap of C // block_c would cut 128256 bfloat16
    # classes (15.7 blocks of 8192) into at most 15 ranges, which ranges of whole blocks then make 8.
    blocks = triton.cdiv(num_classes, tile.block_c)
    most = blocks // triton.cdiv(MIN_SPLIT_CLASSES, tile.block_c)
    splits = min(triton.cdiv(2 * resident, position_programs), most, MAX_SPLITS)
    split_len = triton.cdiv(blocks, splits) * tile.block_c
    return triton.cdiv(num_classes, split_len), split_len


@dataclass(frozen=True)
class GpuCapacity:
    """What the plans size grids by: the multiprocessors, and the warps each holds at once as the device reports
    them (64 on sm_80 and sm_90, 48 on sm_86 and sm_89); a kernel's registers may allow fewer."""

    multiprocessors: int
    warps_per_multiprocessor: int


def gpu_capacity(device: torch.device) -> GpuCapacity:
    """The capacity of a CUDA device; the interpreter's CPU counts as one multiprocessor of 64 warps."""
    if device.type != "cuda":
        return GpuCapacity(1, 64)
    properties = _cuda_properties(device)
    warp_size = getattr(properties, "warp_size", 32)  # 64 on AMD GPUs, where a Triton warp is a wavefront
    return GpuCapacity(properties.multi_processor_count, properties.max_threads_per_multi_processor // warp_size)


def _cuda_properties(device: torch.device):
    return _cuda_properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_properties_of(index: int):
    return torch.cuda.get_device_properties(index)


def check_device(device: torch.device) -> None:
    """Raises unless the kernels can run on `device`: CUDA, or CPU under the Triton interpreter."""
    if INTERPRETER_PROBLEM is not None:
        raise RuntimeError(f"fused_xent: {INTERPRETER_PROBLEM}")
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return
    if device.type == "cpu":
        raise RuntimeError(f"fused_xent: {TRITON_CPU_HINT}")
    raise RuntimeError(f"fused_xent: the triton backend runs on CUDA tensors, got a tensor on {device}")


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launches through torch.library.wrap_triton, so that torch.compile captures the kernel inside the triton ops.

    Under TRITON_INTERPRET=1 the interpreted kernel is launched directly (torch 2.14's wrap_triton hands it back
    unwrapped; torch 2.11's refuses it) and cannot be captured: on fake tensors (the ops' fake kernels, which only
    need output shapes) the launch is skipped, and functionalization (torch.compile with a graph-capturing backend,
    aot_autograd) gets a clear error instead of a graph without the kernel."""
    if INTERPRET:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        if any(isinstance(t, FunctionalTensor) for t in tensors):
            raise RuntimeError(
                "fused_xent: Triton-interpreter kernels cannot be captured into a graph (torch.library.wrap_triton "
                "does not wrap them); use torch.compile(backend='eager') on CPU, or CUDA tensors without "
                "TRITON_INTERPRET"
            )
        if not any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors):
            kernel[grid](*args, **kwargs)
        return
    wrapped = wrap_triton(kernel)
    if wrapped is kernel:
        # Eager call: Triton launches on the *current* CUDA device, not on the tensors' device.
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        wrapped[grid](*args, **kwargs)


@dataclass
class _Problem:
    """Op arguments brought to what the kernels read (the same rules as csrc/common/xent_problem.cpp)."""

    logits: torch.Tensor  # dense, unit class stride (rows) or unit position stride (spatial)
    target: torch.Tensor  # (N, S) contiguous int64, or probabilities with the strides of `logits`
    weight: torch.Tensor | None  # (C,) contiguous, accumulation dtype
    weight_sum: torch.Tensor | None  # 0-d sum of weight: the smoothing term's W, the one place that reads it
    spatial: bool
    prob_target: bool
    acc_dtype: torch.dtype
    tile: TileConfig
    splits: int  # class ranges per position (class_splits), 1 for probability targets
    split_len: int

    @property
    def num_positions(self) -> int:
        return self.logits.shape[0] * self.logits.shape[2]

    @property
    def position_programs(self) -> int:
        N, _, S = self.logits.shape
        if self.spatial:
            return N * triton.cdiv(S, self.tile.block_p)
        return triton.cdiv(N * S, self.tile.block_p)


def check_on_device_of(anchor: torch.Tensor, anchor_name: str, **tensors) -> None:
    """As the compiled ops refuse, for callers of the ops themselves (the front end checks this earlier): a kernel
    handed another device's pointer would read it through unified addressing, or fault and leave the CUDA context
    unusable."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != anchor.device:
            raise RuntimeError(f"fused_xent: {name} is on {tensor.device}, not on the device of {anchor_name} "
                               f"({anchor.device})")


def _problem(logits, target, weight, reduction, label_smoothing) -> _Problem:
    check_device(logits.device)
    check_on_device_of(logits, "logits", target=target, weight=weight)
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"fused_xent: logits must be a floating (N, C, S) view, got {logits.dtype} {logits.shape}")
    if reduction not in (REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM):
        raise ValueError(f"fused_xent: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    N, C, S = logits.shape
    if C == 0:
        raise ValueError("fused_xent: logits need at least one class")

    work, spatial = kernel_logits(logits)

    prob_target = target.is_floating_point()
    if prob_target:
        if target.shape != logits.shape or target.dtype != logits.dtype:
            raise ValueError(f"fused_xent: probability target must be {logits.dtype} {tuple(logits.shape)}, got "
                             f"{target.dtype} {tuple(target.shape)}")
        if target.stride() != work.stride():
            target = torch.empty_like(work).copy_(target)
    else:
        if target.dtype != torch.int64 or target.shape != (N, S):
            raise ValueError(f"fused_xent: class-index target must be int64 ({N}, {S}), got {target.dtype} "
                             f"{tuple(target.shape)}")
        target = target.contiguous()

    acc_dtype = accumulation_dtype(logits.dtype)
    weight_sum = None
    if weight is not None:
        if weight.shape != (C,):
            raise ValueError(f"fused_xent: weight must be ({C},), got {tuple(weight.shape)}")
        weight = weight.to(acc_dtype).contiguous()
        if label_smoothing > 0:  # without smoothing no kernel reads W: no launch to sum it
            weight_sum = weight.sum()
    tile = tile_config(C, S, spatial, work.element_size())
    p = _Problem(work, target, weight, weight_sum, spatial, prob_target, acc_dtype, tile, 1, C)
    if not prob_target:
        p.splits, p.split_len = class_splits(C, p.position_programs, tile, work.device)
    return p


def _shape_args(p: _Problem) -> tuple:
    _, C, S = p.logits.shape
    stride_n, stride_c, stride_s = p.logits.stride()
    return p.num_positions, S, C, stride_n, stride_c, stride_s


def _total_weight(p: _Problem, ignore_index: int) -> torch.Tensor:
    """The mean's denominator (0-d, accumulation dtype): sum of w[y] over counted positions, or N*S for
    probabilities. A per-position buffer and torch's sum keep it deterministic and free of host syncs."""
    if p.prob_target:
        # The count itself, not float() of it: under torch.compile that would pin a dynamic batch size to a constant.
        return torch.full((), p.num_positions, dtype=p.acc_dtype, device=p.logits.device)
    position_weight = torch.empty(p.num_positions, dtype=p.acc_dtype, device=p.logits.device)
    if p.num_positions > 0:
        block = 1024
        _launch(
            xent_target_weight_kernel, (triton.cdiv(p.num_positions, block),), p.target, p.weight, position_weight,
            p.num_positions, p.logits.shape[1], ignore_index, HAS_WEIGHT=p.weight is not None, BLOCK=block, num_warps=4,
        )
    return position_weight.sum()


def _split_float(value: float) -> tuple[float, float]:
    """value as hi + lo, two float32 kernel arguments (Triton passes Python floats as float32): their float64 sum
    recovers value to ~1e-16, so float64 problems see label_smoothing exactly."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, value - hi


def wide_class_loop(num_classes: int, block_c: int) -> bool:
    """Whether the loops over the classes of a row must count in 64 bits. Triton passes a C below 2**31 as int32, and
    a loop from 0 to C in steps of BLOCK_C then counts in int32: for C within BLOCK_C of 2**31, its step past the
    last block wraps to a negative class, still below C, and the loop would go on reading and writing there. (Rows
    cut into class ranges start their loops from an int64 class already.) The gradient's compare of each class
    with the target is then made in int64 too: a class index past 2**31 does not fit the int32 one."""
    return num_classes > 2**31 - 1 - block_c


def _launch_forward(p, total_weight, loss_buffer, lse, grad, reduction, ignore_index, label_smoothing):
    if p.num_positions == 0:
        return
    if p.splits > 1:
        # The ranges' combine gives the lse; a fused forward then writes the gradient from it, as the backward does.
        split_lse = lse if grad is None else _empty_lse(p)
        _launch_split_forward(p, loss_buffer, split_lse, ignore_index, label_smoothing)
        if grad is not None:
            one = torch.ones((), dtype=p.acc_dtype, device=p.logits.device)
            _launch_backward(p, one, (0, 0), split_lse, total_weight, grad, reduction, ignore_index, label_smoothing)
        return
    # Pointers a specialization never reads (no weight; lse when writing the gradient, or the gradient) are None.
    _launch(
        xent_forward_kernel, (p.position_programs,), p.logits, p.target, p.weight, p.weight_sum, total_weight,
        loss_buffer, lse, grad,
        *_shape_args(p), ignore_index, *_split_float(label_smoothing),
        SPATIAL=p.spatial, PROB_TARGET=p.prob_target, HAS_WEIGHT=p.weight is not None,
        HAS_SMOOTHING=label_smoothing > 0, REDUCTION=reduction, WRITE_GRAD=grad is not None,
        WIDE_CLASS_LOOP=wide_class_loop(p.logits.shape[1], p.tile.block_c),
        BLOCK_P=p.tile.block_p, BLOCK_C=p.tile.block_c, num_warps=p.tile.num_warps,
    )


def _launch_split_forward(p, loss_buffer, lse, ignore_index, label_smoothing):
    """Per-position loss and lse of split positions: range statistics, then their combine."""
    has_smoothing = label_smoothing > 0
    stats = torch.empty((4 if has_smoothing else 2, p.splits, p.num_positions), dtype=p.acc_dtype,
                        device=p.logits.device)
    _launch(
        xent_split_statistics_kernel, (p.position_programs, p.splits), p.logits, p.target, p.weight, stats,
        *_shape_args(p), ignore_index, p.split_len, SPATIAL=p.spatial, HAS_WEIGHT=p.weight is not None,
        HAS_SMOOTHING=has_smoothing, BLOCK_P=p.tile.block_p, BLOCK_C=p.tile.block_c, num_warps=p.tile.num_warps,
    )
    block = 512
    _launch(
        xent_split_combine_kernel, (triton.cdiv(p.num_positions, block),), stats, p.logits, p.target, p.weight,
        p.weight_sum, loss_buffer, lse, *_shape_args(p), ignore_index, *_split_float(label_smoothing), p.splits,
        HAS_WEIGHT=p.weight is not None, HAS_SMOOTHING=has_smoothing, BLOCK=block, MERGE_GROUP=MERGE_GROUP,
        num_warps=4,
    )


def _launch_backward(p, grad_loss, grad_loss_strides, lse, total_weight, grad, reduction, ignore_index,
                     label_smoothing):
    _launch(
        xent_backward_kernel, (p.position_programs, p.splits), grad_loss, *grad_loss_strides, p.logits, p.target,
        p.weight, p.weight_sum, lse, total_weight, grad, *_shape_args(p), ignore_index,
        *_split_float(label_smoothing), p.split_len,
        SPATIAL=p.spatial, PROB_TARGET=p.prob_target, HAS_WEIGHT=p.weight is not None,
        HAS_SMOOTHING=label_smoothing > 0, REDUCTION=reduction, SPLIT=p.splits > 1,
        WIDE_CLASS_LOOP=wide_class_loop(p.logits.shape[1], p.tile.block_c),
        BLOCK_P=p.tile.block_p, BLOCK_C=p.tile.block_c, num_warps=p.tile.num_warps,
    )


def _empty_lse(p: _Problem) -> torch.Tensor:
    """(N, S, 2): see _store_lse."""
    N, _, S = p.logits.shape
    return torch.empty((N, S, 2), dtype=p.acc_dtype, device=p.logits.device)


def _loss_buffer(p: _Problem) -> torch.Tensor:
    """Where the kernel writes per-position losses, in the accumulation dtype: the output itself for reduction
    none, else what reduce_loss sums."""
    N, _, S = p.logits.shape
    return torch.empty((N, S), dtype=p.acc_dtype, device=p.logits.device)


def cross_entropy_fwd(logits, target, weight, reduction, ignore_index, label_smoothing):
    """-> (loss, lse, total_weight), all in the accumulation dtype: loss (N, S) or 0-d, lse (N, S, 2) and
    total_weight 0-d."""
    p = _problem(logits, target, weight, reduction, label_smoothing)
    total_weight = _total_weight(p, ignore_index)
    loss_buffer = _loss_buffer(p)
    lse = _empty_lse(p)
    _launch_forward(p, total_weight, loss_buffer, lse, None, reduction, ignore_index, label_smoothing)
    return reduce_loss(loss_buffer, total_weight, reduction, label_smoothing), lse, total_weight


def cross_entropy_bwd(grad_loss, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing):
    """-> d(loss)/d(logits), in the logits dtype with the strides of the kernel's view of the logits."""
    p = _problem(logits, target, weight, reduction, label_smoothing)
    check_on_device_of(logits, "logits", grad_loss=grad_loss, lse=lse, total_weight=total_weight)
    grad = torch.empty_like(p.logits)
    if p.num_positions == 0:
        return grad
    N, _, S = p.logits.shape
    expected = (N, S) if reduction == REDUCTION_NONE else ()
    if tuple(grad_loss.shape) != expected or tuple(lse.shape) != (N, S, 2) or lse.dtype != p.acc_dtype:
        raise ValueError(f"fused_xent: grad_loss must be {expected} and lse ({N}, {S}, 2) {p.acc_dtype}, got "
                         f"{tuple(grad_loss.shape)} and {tuple(lse.shape)} {lse.dtype}")
    grad_loss_strides = grad_loss.stride() if reduction == REDUCTION_NONE else (0, 0)
    _launch_backward(p, grad_loss, grad_loss_strides, lse.contiguous(), total_weight.to(p.acc_dtype), grad,
                     reduction, ignore_index, label_smoothing)
    return grad


def _forward_with_grad(p, grad, reduction, ignore_index, label_smoothing):
    # The gradient of a mean needs its denominator before the pass; none and sum never read it (the tensor only
    # gives the kernel its accumulation dtype), so they skip the extra pass over the targets.
    if reduction == REDUCTION_MEAN:
        total_weight = _total_weight(p, ignore_index)
    else:
        total_weight = torch.empty((), dtype=p.acc_dtype, device=p.logits.device)
    loss_buffer = _loss_buffer(p)
    _launch_forward(p, total_weight, loss_buffer, None, grad, reduction, ignore_index, label_smoothing)
    return reduce_loss(loss_buffer, total_weight, reduction, label_smoothing)


def cross_entropy_fwd_grad(logits, target, weight, reduction, ignore_index, label_smoothing):
    """-> (loss, grad): the loss and d(loss)/d(logits) for grad_loss = 1 (per position for reduction none), written
    while each row is on chip."""
    p = _problem(logits, target, weight, reduction, label_smoothing)
    grad = torch.empty_like(p.logits)
    return _forward_with_grad(p, grad, reduction, ignore_index, label_smoothing), grad


def _refuse_a_write_into_a_leaf(tensor, what):
    """As the compiled ops' autograd (and PyTorch's in-place ops) refuse, for callers of the ops themselves: a leaf's
    .grad would be meaningless once its values are overwritten. Whatever the grad mode, which a triton_op's body
    cannot see (torch.library runs it inside an autograd Function's forward); the front end never passes a leaf.
    Not on the fake tensors a trace runs this on (torch.compile, make_fx), whose autograd metadata may not be read
    here, below autograd: the traced op checks its real tensors when it runs."""
    if not has_no_values(tensor) and is_leaf_that_requires_grad(tensor):
        raise RuntimeError(f"fused_xent: a leaf Variable that requires grad (or a view of one) is being used in an "
                           f"in-place operation: {what}; pass the output of an operation, or a detached tensor")


def cross_entropy_fwd_grad_(logits, target, weight, reduction, ignore_index, label_smoothing):
    """-> loss; the gradient of cross_entropy_fwd_grad is written over `logits`, so neither the weight nor the
    target may share memory with them (the compiled ops' check_inputs_apart_from_logits; here only where the tensors
    have memory to compare, not on the fake tensors a torch.compile trace runs this on)."""
    _refuse_a_write_into_a_leaf(logits, "the in-place op writes the gradient over the logits")
    shared = input_in_logits_memory(logits, weight, target)
    if shared is not None:
        raise ValueError(f"fused_xent: the in-place op writes the gradient over the logits, but the {shared}'s memory "
                         f"range intersects theirs (it could be read after it was overwritten): pass {shared}.clone(), "
                         "or use the op that returns the gradient (grad_mode='in_forward')")
    p = _problem(logits, target, weight, reduction, label_smoothing)
    loss = _forward_with_grad(p, p.logits, reduction, ignore_index, label_smoothing)
    if p.logits is not logits:  # the kernel worked on a dense copy
        logits.copy_(p.logits)
    return loss


SCALE_TILE = 4096
SCALE_PROGRAMS_PER_MULTIPROCESSOR = 8


def scale_unit_grad_(grad, grad_loss, target, ignore_index) -> None:
    """grad *= grad_loss in place, decided on the device: a grad_loss of exactly 1 (the usual loss.backward())
    leaves the gradient unread and needs no host sync. grad: a dense (N, C, S) gradient made by the forward;
    grad_loss: 0-d, of grad's dtype; target: (N, S) int64 class indices (positions equal to ignore_index stay +0
    whatever the scale), or None for probability targets. The twin of csrc/cuda/xent_scale.cu."""
    check_device(grad.device)
    check_on_device_of(grad, "grad", grad_loss=grad_loss, target=target)
    _refuse_a_write_into_a_leaf(grad, "scale_unit_grad_ scales the gradient in place")
    if grad.dim() != 3 or not is_dense(grad) or grad_loss.dim() != 0 or grad_loss.dtype != grad.dtype:
        raise ValueError(f"fused_xent: scale_unit_grad_ needs a dense (N, C, S) gradient and a 0-d grad_loss of its "
                         f"dtype, got {tuple(grad.shape)} strides {grad.stride()} and {grad_loss.dtype} "
                         f"{tuple(grad_loss.shape)}")
    N, _, S = grad.shape
    if target is not None and (target.dtype != torch.int64 or tuple(target.shape) != (N, S)):
        raise ValueError(f"fused_xent: scale_unit_grad_ needs an int64 ({N}, {S}) target, got {target.dtype} "
                         f"{tuple(target.shape)}")
    if grad.numel() == 0:
        return
    programs = min(triton.cdiv(grad.numel(), SCALE_TILE),
                   gpu_capacity(grad.device).multiprocessors * SCALE_PROGRAMS_PER_MULTIPROCESSOR)
    # A size-1 dimension's stride may be anything: 1 gives it its only coordinate, 0.
    _launch(
        xent_scale_unit_grad_kernel, (programs,), grad, grad_loss, None if target is None else target.contiguous(),
        grad.numel(), ignore_index, grad.stride(0) if N > 1 else 1, N, grad.stride(2) if S > 1 else 1, S,
        HAS_TARGET=target is not None, ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32,
        BLOCK=SCALE_TILE, num_warps=4,
    )
