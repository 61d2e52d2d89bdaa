"""Triton kernels for fused_xent and their launchers (plain functions; autograd and op registration live in
fused_xent/_triton_ops.py).

The launchers take the arguments of the C++ op schemas (csrc/fused_xent.cpp), in the same order, and return the same
outputs: logits are an (N, C, S) view, target is (N, S) int64 class indices or (N, C, S) probabilities, weight is an
optional (C,) tensor, reduction is 0 (none), 1 (mean) or 2 (sum). The per-position algebra mirrors
csrc/common/xent_math.h term by term so that the CPU, CUDA and Triton backends agree.

Layouts. A "position" is one (n, s) pair; its C logits are
  - rows (class stride 1: (N, C) inputs and channels_last): contiguous, so a program takes a block of positions
    and walks along the classes in column blocks;
  - spatial (position stride 1: NCHW): a program takes a block of consecutive positions of one n, so every load of
    a class is a contiguous run of positions, and walks over the classes.
Logits with neither unit stride are copied once (as the C++ backends do).

Few positions with many classes (a few rows of a huge vocabulary, or NCHW logits such as (N, C, T) with small N*T)
would leave most of the GPU idle, so their classes are cut into ranges of whole column blocks and a second grid
axis takes the ranges (class-index targets, as in the CUDA kernel): each program writes its range's online-softmax
state, a combine kernel merges them per position in range order, and the gradient kernel writes one range per
program.

Accumulation is float32 (float64 for float64 logits, with label_smoothing passed as a float32 hi + lo pair so that
it keeps float64 precision). Triton specializes integer arguments equal to 1, so the unit stride of each
layout is a compile-time constant and the compiler sees which axis of a tile is contiguous.

Determinism: every program writes its own positions' losses; reductions are torch .sum() calls over those
per-position buffers (fixed order), never atomics. No host synchronization happens anywhere.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._layout import input_in_logits_memory, is_dense, is_leaf_that_requires_grad, kernel_logits
from ._triton_env import interpreter_problem, triton_interpreter_requested
from ._validate import has_no_values
from .reference import REDUCTION_MEAN, REDUCTION_NONE, REDUCTION_SUM, reduce_loss

# Read once, like Triton itself: the interpreter must be chosen before the kernels below are decorated.
INTERPRET = triton_interpreter_requested()
INTERPRETER_PROBLEM = interpreter_problem(triton.__version__) if INTERPRET else None

# Constants the kernels read (Triton kernels may only read globals that are constexpr).
# Float constants are written as float("...") inside the kernels: Inductor re-emits constexpr globals as
# `NAME = tl.constexpr(<repr>)`, and repr gives a bare `nan` / `-inf` that its generated module cannot resolve.
# exp(z) is computed as exp2(z * LOG2E), which compiles to the fast ex2.approx.ftz (tl.exp adds a slower guard
# sequence per element). Keep the product outside: x * LOG2E - shift * LOG2E would be fused into one FMA on the GPU
# and lose ~1e-4 relative for logits near 1e4 (the interpreter rounds both products and would not show it).
LOG2E = tl.constexpr(1.4426950408889634)
_NONE = tl.constexpr(REDUCTION_NONE)
_MEAN = tl.constexpr(REDUCTION_MEAN)


# ---------------------------------------------------------------------------------------------------------------
# Kernel building blocks
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _position_block(pid, num_positions, S, stride_n, stride_s, BLOCK_P: tl.constexpr, SPATIAL: tl.constexpr):
    """Program pid's BLOCK_P positions: their (n, s), flat index n*S + s into (N, S) buffers, the element offset of
    their first logit, and which of them exist. All in int64, so offsets never wrap past 2**31 elements."""
    pid = pid.to(tl.int64)
    if SPATIAL:
        # One n per program and consecutive s, so offsets along the block stay contiguous (stride_s == 1). Not
        # tl.cdiv: S below 2**31 arrives as int32, where S + BLOCK_P - 1 wraps for S within BLOCK_P of 2**31.
        blocks_per_n = (S - 1) // BLOCK_P + 1
        n = pid // blocks_per_n
        s = (pid % blocks_per_n) * BLOCK_P + tl.arange(0, BLOCK_P)
        in_range = s < S
        index = n * S + s
    else:
        # Rows: positions are flattened over (N, S); with S == 1 (specialized) the division folds away.
        index = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        n = index // S
        s = index % S
        in_range = index < num_positions
    offset = n * stride_n + s * stride_s
    return n, s, index, offset, in_range


@triton.jit
def _class_target(target_ptr, weight_ptr, index, in_range, C, ignore_index, HAS_WEIGHT: tl.constexpr, ACC):
    """Class-index target of each position: a safe index (0 when out of range, so it can always be dereferenced),
    whether the position counts (exists and is not ignored), and its weight: w[y], 0 when it does not count, NaN
    when y is out of range (the front end rejects such targets; a kernel must still never read out of bounds)."""
    y = tl.load(target_ptr + index, mask=in_range, other=0)
    counted = in_range & (y != ignore_index)
    in_bounds = (y >= 0) & (y < C)
    safe_y = tl.where(in_bounds, y, 0)
    if HAS_WEIGHT:
        weight_of_target = tl.load(weight_ptr + safe_y, mask=counted & in_bounds, other=0.0).to(ACC)
    else:
        weight_of_target = tl.full(y.shape, 1.0, ACC)
    weight_of_target = tl.where(counted, tl.where(in_bounds, weight_of_target, float("nan")), 0.0)
    return safe_y, counted, weight_of_target


@triton.jit
def _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT: tl.constexpr, ACC):
    """W = sum_c w[c] (summed once by the launcher), or C without weights."""
    if HAS_WEIGHT:
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
    else:
        weight_sum = tl.cast(C, ACC)
    return weight_sum


@triton.jit
def _class_weight_tile(weight_ptr, cols, C, ACC):
    """w[cols] as a (1, BLOCK_C) tile, 0 past C. Loaded straight into the 2-D layout: a 1-D load broadcast with
    [None, :] afterwards goes through shared memory and barriers at every step."""
    return tl.load(weight_ptr + cols[None, :], mask=(cols < C)[None, :], other=0.0).to(ACC)


@triton.jit
def _weighted_smoothed_target(target_ptr, weight_ptr, ptrs, mask, cols, label_smoothing, C,
                              HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC):
    """w[c] * t'[c] for one tile of probability targets, t' = (1-eps) t + eps/C; 0 outside the tile's mask."""
    t = tl.load(target_ptr + ptrs, mask=mask, other=0.0).to(ACC)
    if HAS_SMOOTHING:
        t = (1.0 - label_smoothing) * t + label_smoothing / C
    if HAS_WEIGHT:
        t = t * _class_weight_tile(weight_ptr, cols, C, ACC)
    return tl.where(mask, t, 0.0)


@triton.jit
def _range_statistics(logits_ptr, target_ptr, weight_ptr, offset, read, counted, c_begin, c_stop, C, stride_c,
                      label_smoothing, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_SMOOTHING: tl.constexpr, READS_UNCOUNTED: tl.constexpr, ACC, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """One pass over the classes [c_begin, c_stop) of a block of positions (online softmax; c_stop - c_begin is a
    multiple of BLOCK_C or reaches C). Returns the running max, sum_c exp(x[c] - max), and with a[c] = w[c] t'[c]
    (probability targets) or w[c] (class indices with smoothing) A = sum_c a[c] and sum_c a[c] (x[c] - m), m the
    max (0 while -inf): relative to it, the loss adds two non-negative parts (xent_math.h); moved by A (m - m')
    whenever the max rises to m'. The positions `read` (_positions_read) are loaded; those that do not count keep
    the state of no classes (with READS_UNCOUNTED: read holds more positions than counted).
    One column block in flight (num_stages=1, no cp.async in the sm_90 PTX): each block's loads wait for the
    previous block's cross-warp reductions. Loads pipelined three stages deep measured no faster on the H200."""
    running_max = tl.full([BLOCK_P], float("-inf"), ACC)
    scaled_sum = tl.zeros([BLOCK_P], ACC)  # sum_c exp(x[c] - running_max)
    term_weights = tl.zeros([BLOCK_P], ACC)  # A
    relative_dot = tl.zeros([BLOCK_P], ACC)
    for c0 in tl.range(c_begin, c_stop, BLOCK_C, num_stages=1):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = read[:, None] & (cols < C)[None, :]
        ptrs = offset[:, None] + cols.to(tl.int64)[None, :] * stride_c
        x = tl.load(logits_ptr + ptrs, mask=mask, other=float("-inf")).to(ACC)
        if READS_UNCOUNTED:
            mask = counted[:, None] & (cols < C)[None, :]
            x = tl.where(mask, x, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # While a row has seen only -inf, shift by 0 instead: exp(-inf - -inf) would be NaN.
        previous_shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        scaled_sum = (scaled_sum * tl.exp2((running_max - shift) * LOG2E)
                      + tl.sum(tl.exp2((x - shift[:, None]) * LOG2E), axis=1))
        running_max = new_max
        if PROB_TARGET or HAS_SMOOTHING:
            if PROB_TARGET:
                term_weight = _weighted_smoothed_target(target_ptr, weight_ptr, ptrs, mask, cols, label_smoothing, C,
                                                        HAS_WEIGHT, HAS_SMOOTHING, ACC)
            elif HAS_WEIGHT:
                term_weight = tl.where(mask, _class_weight_tile(weight_ptr, cols, C, ACC), 0.0)
            else:
                term_weight = tl.where(mask, 1.0, 0.0)
            # Masked lanes hold x = -inf; keep them out of the product (0 * -inf is NaN).
            terms = tl.where(mask, term_weight * (x - shift[:, None]), 0.0)
            relative_dot = relative_dot + term_weights * (previous_shift - shift) + tl.sum(terms, axis=1)
            term_weights += tl.sum(term_weight, axis=1)
    return running_max, scaled_sum, term_weights, relative_dot


@triton.jit
def _weighted_target_sum(target_ptr, weight_ptr, offset, in_range, C, stride_c, label_smoothing,
                         HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """T = sum_c w[c] t'[c] for probability targets (backward needs it before it can write any gradient)."""
    total = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = in_range[:, None] & (cols < C)[None, :]
        ptrs = offset[:, None] + cols.to(tl.int64)[None, :] * stride_c
        total += tl.sum(_weighted_smoothed_target(target_ptr, weight_ptr, ptrs, mask, cols, label_smoothing, C,
                                                  HAS_WEIGHT, HAS_SMOOTHING, ACC), axis=1)
    return total


@triton.jit
def _positions_read(counted, in_range, SPATIAL: tl.constexpr):
    """The positions of a block whose logits a program loads. Rows: those that count (an ignored row is not read).
    Spatial: every position of the block when any counts, none when none does. A load mask that changes from one
    position to the next keeps Triton from vectorizing loads along the positions (its sm_90 PTX then loads 2-4 bytes
    per instruction instead of 16), so a spatial block skips its ignored positions only when all are ignored."""
    if SPATIAL:
        return in_range & (tl.max(counted.to(tl.int32), axis=0) > 0)
    return counted


@triton.jit
def _lse_parts(running_max, scaled_sum):
    """(reference, log_sum) of the online-softmax state: lse = reference + log_sum, with reference the max (0 while
    it is -inf) that the sum is relative to. They stay apart, in the saved lse too: lse - x is taken as
    (x - reference) - log_sum, since lse itself is rounded to the spacing of floats around it, ~1e-3 at logits of
    1e4 (xent_math.h target_gap and split_lse)."""
    return tl.where(running_max == float("-inf"), 0.0, running_max), tl.log(scaled_sum)


@triton.jit
def _store_lse(lse_ptr, index, in_range, reference, log_sum):
    """lse (positions, 2) as the ops save it: each position's reference and log_sum."""
    tl.store(lse_ptr + 2 * index, reference, mask=in_range)
    tl.store(lse_ptr + 2 * index + 1, log_sum, mask=in_range)


@triton.jit
def _index_target_loss(log_sum, target_gap, weight_of_target, weight_sum, relative_weighted_logit_sum,
                       label_smoothing, C, HAS_SMOOTHING: tl.constexpr):
    """(1-eps) w[y] (lse - x[y]) + (eps/C) (W log_sum - sum_c w[c] (x[c] - m)), m the reference of log_sum;
    xent_math.h index_target_loss."""
    loss = (1.0 - label_smoothing) * weight_of_target * target_gap
    if HAS_SMOOTHING:
        loss += label_smoothing / C * (weight_sum * log_sum - relative_weighted_logit_sum)
    return loss


@triton.jit
def _index_grad_coeffs(weight_of_target, weight_sum, scale, label_smoothing, C, HAS_SMOOTHING: tl.constexpr):
    """dloss/dx[c] = prob_coef p[c] - class_coef w[c] - [c == y] target_coef; xent_math.h index_grad_coeffs."""
    target_coef = (1.0 - label_smoothing) * weight_of_target
    if HAS_SMOOTHING:
        smooth_coef = label_smoothing / C
        return scale * (target_coef + smooth_coef * weight_sum), scale * smooth_coef, scale * target_coef
    return scale * target_coef, scale * 0.0, scale * target_coef  # class_coef is not read without smoothing


@triton.jit
def _store_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, offset, in_range, keep, read, reference, log_sum, safe_y,
                prob_coef, class_coef, target_coef, c_begin, c_stop, C, stride_c, label_smoothing,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC,
                WIDE_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second pass over the classes [c_begin, c_stop) (as in _range_statistics): read each logit once and write its
    gradient (grad_ptr may be logits_ptr: each element is read before it is overwritten, and nothing else of the
    row is read afterwards), with p = exp((x - reference) - log_sum) (see _lse_parts).
      class indices:  prob_coef p[c] - class_coef w[c] - [c == y] target_coef
      probabilities:  prob_coef p[c] - class_coef w[c] t'[c]   (prob_coef = scale T, class_coef = scale)
    Positions that do not `keep` (ignored targets) get exactly 0, whatever their logits, which are loaded only
    where `read` (_positions_read) says. exp(-log_sum) is folded into prob_coef, once per position, as the CUDA
    kernels fold it (xent_device.cuh LseParts): one subtraction per class instead of two."""
    prob_coef = prob_coef * tl.exp2(-log_sum * LOG2E)
    for c0 in range(c_begin, c_stop, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = in_range[:, None] & (cols < C)[None, :]
        ptrs = offset[:, None] + cols.to(tl.int64)[None, :] * stride_c
        x = tl.load(logits_ptr + ptrs, mask=mask & read[:, None], other=0.0).to(ACC)
        grad = prob_coef[:, None] * tl.exp2((x - reference[:, None]) * LOG2E)
        if PROB_TARGET:
            weighted_target = _weighted_smoothed_target(target_ptr, weight_ptr, ptrs, mask, cols, label_smoothing, C,
                                                        HAS_WEIGHT, HAS_SMOOTHING, ACC)
            grad -= class_coef[:, None] * weighted_target
        else:
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    grad -= class_coef[:, None] * _class_weight_tile(weight_ptr, cols, C, ACC)
                else:
                    grad -= class_coef[:, None]
            # Only a column block that holds some position's target compares its classes with it: in a long row
            # one block of many, where the test costs a compare and a select per class.
            holds_target = (safe_y >= c0) & (safe_y < c0 + BLOCK_C)
            if tl.max(holds_target.to(tl.int32), axis=0) > 0:
                # In int32, the cheaper compare, unless classes reach past it (then cols counts in int64 too).
                target_class = safe_y if WIDE_CLASSES else safe_y.to(tl.int32)
                grad -= tl.where(cols[None, :] == target_class[:, None], target_coef[:, None], 0.0)
        grad = tl.where(keep[:, None], grad, 0.0)
        tl.store(grad_ptr + ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _target_weight_kernel(target_ptr, weight_ptr, position_weight_ptr, num_positions, C, ignore_index,
                          HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """w[y] of every position (0 if ignored, NaN if out of range): summed, the mean's denominator."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = index < num_positions
    _, _, weight_of_target = _class_target(target_ptr, weight_ptr, index, in_range, C, ignore_index, HAS_WEIGHT,
                                           position_weight_ptr.dtype.element_ty)
    tl.store(position_weight_ptr + index, weight_of_target, mask=in_range)


@triton.jit
def _forward_kernel(logits_ptr, target_ptr, weight_ptr, weight_sum_ptr, total_weight_ptr, loss_ptr, lse_ptr, grad_ptr,
                    num_positions, S, C, stride_n, stride_c, stride_s, ignore_index, smoothing_hi, smoothing_lo,
                    SPATIAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr, REDUCTION: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    WIDE_CLASS_LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-position loss (into loss_ptr, in the accumulation dtype: the output for reduction none, else what
    reduce_loss sums) and lse (_store_lse); with WRITE_GRAD, the gradient for grad_loss = 1 instead of lse
    (total_weight must then already hold the mean's denominator). A program takes one block of positions.
    WIDE_CLASS_LOOP: see wide_class_loop."""
    if WIDE_CLASS_LOOP:
        C = C.to(tl.int64)
    pid = tl.program_id(0)
    ACC = total_weight_ptr.dtype.element_ty
    label_smoothing = tl.cast(smoothing_hi, ACC) + tl.cast(smoothing_lo, ACC)
    _, _, index, offset, in_range = _position_block(pid, num_positions, S, stride_n, stride_s, BLOCK_P, SPATIAL)
    safe_y = index  # only read for class-index targets
    rows_counted = in_range
    if not PROB_TARGET:
        safe_y, counted, weight_of_target = _class_target(target_ptr, weight_ptr, index, in_range, C, ignore_index,
                                                          HAS_WEIGHT, ACC)
        # Gathered before the row pass: when the gradient overwrites the logits, x[y] is gone by the second pass.
        target_logit = tl.load(logits_ptr + offset + safe_y * stride_c, mask=counted, other=0.0).to(ACC)
        # An ignored position counts no classes: its lse is that of none, (0, -inf).
        rows_counted = counted
    read = _positions_read(rows_counted, in_range, SPATIAL)
    running_max, scaled_sum, term_weights, relative_dot = _range_statistics(
        logits_ptr, target_ptr, weight_ptr, offset, read, rows_counted, 0, C, C, stride_c, label_smoothing,
        PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, SPATIAL and not PROB_TARGET, ACC, BLOCK_P, BLOCK_C)
    weight_sum = _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT, ACC)
    reference, log_sum = _lse_parts(running_max, scaled_sum)
    if PROB_TARGET:
        # xent_math.h prob_target_loss: T log_sum - sum_c w[c] t'[c] (x[c] - reference), T = term_weights
        loss = term_weights * log_sum - relative_dot
    else:
        loss = _index_target_loss(log_sum, (reference - target_logit) + log_sum, weight_of_target, weight_sum,
                                  relative_dot, label_smoothing, C, HAS_SMOOTHING)
        loss = tl.where(counted, loss, 0.0)  # stays NaN for an out-of-range target: its weight is NaN
    tl.store(loss_ptr + index, loss, mask=in_range)

    if WRITE_GRAD:
        scale = tl.full([BLOCK_P], 1.0, ACC)
        if REDUCTION == _MEAN:
            scale = scale / tl.load(total_weight_ptr).to(ACC)
        if PROB_TARGET:
            # (prob_coef, class_coef) = (scale T, scale); safe_y and target_coef are not read for probabilities.
            _store_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, offset, in_range, in_range, in_range, reference,
                        log_sum, safe_y, scale * term_weights, scale, scale, 0, C, C, stride_c, label_smoothing,
                        PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC, WIDE_CLASS_LOOP, BLOCK_C)
        else:
            prob_coef, class_coef, target_coef = _index_grad_coeffs(weight_of_target, weight_sum, scale,
                                                                    label_smoothing, C, HAS_SMOOTHING)
            _store_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, offset, in_range, counted, read, reference,
                        log_sum, safe_y, prob_coef, class_coef, target_coef, 0, C, C, stride_c, label_smoothing,
                        PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC, WIDE_CLASS_LOOP, BLOCK_C)
    else:
        _store_lse(lse_ptr, index, in_range, reference, log_sum)


@triton.jit
def _split_statistics_kernel(logits_ptr, target_ptr, weight_ptr, stats_ptr, num_positions, S, C, stride_n, stride_c,
                             stride_s, ignore_index, split_len, SPATIAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_SMOOTHING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (position block, k): the online-softmax state of classes [k split_len, (k+1) split_len) of its
    positions (class-index targets) into stats[0 / 1 / 2 / 3, k, position] = running max, scaled sum, and with
    smoothing sum_c w[c] and sum_c w[c] (x[c] - m), m the range's max (see _range_statistics). An ignored position
    is not read: its state is that of no classes."""
    ACC = stats_ptr.dtype.element_ty
    _, _, index, offset, in_range = _position_block(
        tl.program_id(0), num_positions, S, stride_n, stride_s, BLOCK_P, SPATIAL
    )
    counted = in_range & (tl.load(target_ptr + index, mask=in_range, other=0) != ignore_index)
    split = tl.program_id(1).to(tl.int64)
    c_begin = split * split_len
    running_max, scaled_sum, term_weights, relative_dot = _range_statistics(
        logits_ptr, None, weight_ptr, offset, _positions_read(counted, in_range, SPATIAL), counted, c_begin,
        tl.minimum(c_begin + split_len, C), C, stride_c, 0.0, False, HAS_WEIGHT, HAS_SMOOTHING, SPATIAL, ACC, BLOCK_P,
        BLOCK_C)
    plane = tl.num_programs(1).to(tl.int64) * num_positions
    at = split * num_positions + index
    tl.store(stats_ptr + at, running_max, mask=in_range)
    tl.store(stats_ptr + plane + at, scaled_sum, mask=in_range)
    if HAS_SMOOTHING:
        tl.store(stats_ptr + 2 * plane + at, term_weights, mask=in_range)
        tl.store(stats_ptr + 3 * plane + at, relative_dot, mask=in_range)


@triton.jit
def _load_range_state(stats_ptr, at, plane, in_range, HAS_SMOOTHING: tl.constexpr):
    """One range's state as _split_statistics_kernel stored it; masked positions read as an empty range."""
    range_max = tl.load(stats_ptr + at, mask=in_range, other=float("-inf"))
    range_sum = tl.load(stats_ptr + plane + at, mask=in_range, other=0.0)
    if HAS_SMOOTHING:
        term_weights = tl.load(stats_ptr + 2 * plane + at, mask=in_range, other=0.0)
        relative_dot = tl.load(stats_ptr + 3 * plane + at, mask=in_range, other=0.0)
    else:
        term_weights = tl.zeros_like(range_sum)
        relative_dot = tl.zeros_like(range_sum)
    return range_max, range_sum, term_weights, relative_dot


@triton.jit
def _merge_range_states(max_a, sum_a, weights_a, dot_a, max_b, sum_b, weights_b, dot_b,
                        HAS_SMOOTHING: tl.constexpr):
    """The state of two disjoint class ranges together (each relative to its own max, as in _range_statistics)."""
    new_max = tl.maximum(max_a, max_b)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # as in _range_statistics
    merged_sum = sum_a * tl.exp2((max_a - shift) * LOG2E) + sum_b * tl.exp2((max_b - shift) * LOG2E)
    merged_weights, merged_dot = weights_a, dot_a  # both 0 without smoothing
    if HAS_SMOOTHING:
        reference_a = tl.where(max_a == float("-inf"), 0.0, max_a)
        reference_b = tl.where(max_b == float("-inf"), 0.0, max_b)
        merged_dot = (dot_a + weights_a * (reference_a - shift)) + (dot_b + weights_b * (reference_b - shift))
        merged_weights = weights_a + weights_b
    return new_max, merged_sum, merged_weights, merged_dot


@triton.jit
def _split_combine_kernel(stats_ptr, logits_ptr, target_ptr, weight_ptr, weight_sum_ptr, loss_ptr, lse_ptr,
                          num_positions, S, C, stride_n, stride_c, stride_s, ignore_index, smoothing_hi,
                          smoothing_lo, splits, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                          BLOCK: tl.constexpr, MERGE_GROUP: tl.constexpr):
    """Merges the ranges' states of each position in a fixed order (bitwise reproducible): groups of MERGE_GROUP
    consecutive ranges, then the groups, since rounding grows with the length of a chain of merges. Then lse and
    the loss as in _forward_kernel."""
    ACC = stats_ptr.dtype.element_ty
    label_smoothing = tl.cast(smoothing_hi, ACC) + tl.cast(smoothing_lo, ACC)
    _, _, index, offset, in_range = _position_block(
        tl.program_id(0), num_positions, S, stride_n, stride_s, BLOCK, False
    )
    plane = splits.to(tl.int64) * num_positions
    running_max = tl.full([BLOCK], float("-inf"), ACC)
    scaled_sum = tl.zeros([BLOCK], ACC)
    term_weights = tl.zeros([BLOCK], ACC)
    relative_dot = tl.zeros([BLOCK], ACC)
    at = index  # range k's entry: k * num_positions + index, advanced in int64 (the loop counters are int32)
    for group in range(0, splits, MERGE_GROUP):
        group_max, group_sum, group_weights, group_dot = _load_range_state(stats_ptr, at, plane, in_range,
                                                                           HAS_SMOOTHING)
        at += num_positions
        for _range_index in range(group + 1, tl.minimum(group + MERGE_GROUP, splits)):
            range_max, range_sum, range_weights, range_dot = _load_range_state(stats_ptr, at, plane, in_range,
                                                                               HAS_SMOOTHING)
            group_max, group_sum, group_weights, group_dot = _merge_range_states(
                group_max, group_sum, group_weights, group_dot, range_max, range_sum, range_weights, range_dot,
                HAS_SMOOTHING)
            at += num_positions
        running_max, scaled_sum, term_weights, relative_dot = _merge_range_states(
            running_max, scaled_sum, term_weights, relative_dot, group_max, group_sum, group_weights, group_dot,
            HAS_SMOOTHING)
    safe_y, counted, weight_of_target = _class_target(target_ptr, weight_ptr, index, in_range, C, ignore_index,
                                                      HAS_WEIGHT, ACC)
    target_logit = tl.load(logits_ptr + offset + safe_y * stride_c, mask=counted, other=0.0).to(ACC)
    reference, log_sum = _lse_parts(running_max, scaled_sum)
    weight_sum = _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT, ACC)
    loss = _index_target_loss(log_sum, (reference - target_logit) + log_sum, weight_of_target, weight_sum,
                              relative_dot, label_smoothing, C, HAS_SMOOTHING)
    tl.store(loss_ptr + index, tl.where(counted, loss, 0.0), mask=in_range)
    _store_lse(lse_ptr, index, in_range, reference, log_sum)


@triton.jit
def _backward_kernel(grad_loss_ptr, grad_loss_stride_n, grad_loss_stride_s, logits_ptr, target_ptr, weight_ptr,
                     weight_sum_ptr, lse_ptr, total_weight_ptr, grad_ptr,
                     num_positions, S, C, stride_n, stride_c, stride_s, ignore_index, smoothing_hi, smoothing_lo,
                     split_len, SPATIAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_SMOOTHING: tl.constexpr, REDUCTION: tl.constexpr, SPLIT: tl.constexpr,
                     WIDE_CLASS_LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gradient from the saved lse (_store_lse): one read of the logits (plus the targets) and one write. With SPLIT
    (class-index targets), program (position block, k) writes classes [k split_len, (k+1) split_len).
    WIDE_CLASS_LOOP: see wide_class_loop."""
    if WIDE_CLASS_LOOP:
        C = C.to(tl.int64)
    ACC = total_weight_ptr.dtype.element_ty
    label_smoothing = tl.cast(smoothing_hi, ACC) + tl.cast(smoothing_lo, ACC)
    n, s, index, offset, in_range = _position_block(
        tl.program_id(0), num_positions, S, stride_n, stride_s, BLOCK_P, SPATIAL
    )
    if SPLIT:
        c_begin = tl.program_id(1).to(tl.int64) * split_len
        c_stop = tl.minimum(c_begin + split_len, C)
    else:
        c_begin = 0
        c_stop = C
    reference = tl.load(lse_ptr + 2 * index, mask=in_range, other=0.0)
    log_sum = tl.load(lse_ptr + 2 * index + 1, mask=in_range, other=0.0)
    # Upstream-gradient scale per position (xent_math.h grad_scale); grad_loss may be an expanded (stride 0) view.
    if REDUCTION == _NONE:
        scale = tl.load(grad_loss_ptr + n * grad_loss_stride_n + s * grad_loss_stride_s, mask=in_range,
                        other=0.0).to(ACC)
    elif REDUCTION == _MEAN:
        scale = tl.full([BLOCK_P], 1.0, ACC) * (tl.load(grad_loss_ptr).to(ACC) / tl.load(total_weight_ptr).to(ACC))
    else:
        scale = tl.full([BLOCK_P], 1.0, ACC) * tl.load(grad_loss_ptr).to(ACC)
    if PROB_TARGET:
        weighted_target_sum = _weighted_target_sum(target_ptr, weight_ptr, offset, in_range, C, stride_c,
                                                   label_smoothing, HAS_WEIGHT, HAS_SMOOTHING, ACC, BLOCK_P, BLOCK_C)
        # As in the forward: (prob_coef, class_coef) = (scale T, scale); safe_y and target_coef are not read.
        _store_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, offset, in_range, in_range, in_range, reference,
                    log_sum, index, scale * weighted_target_sum, scale, scale, c_begin, c_stop, C, stride_c,
                    label_smoothing, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC, WIDE_CLASS_LOOP, BLOCK_C)
    else:
        safe_y, counted, weight_of_target = _class_target(target_ptr, weight_ptr, index, in_range, C, ignore_index,
                                                          HAS_WEIGHT, ACC)
        weight_sum = _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT, ACC)
        prob_coef, class_coef, target_coef = _index_grad_coeffs(weight_of_target, weight_sum, scale, label_smoothing,
                                                                C, HAS_SMOOTHING)
        _store_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, offset, in_range, counted,
                    _positions_read(counted, in_range, SPATIAL), reference, log_sum, safe_y, prob_coef, class_coef,
                    target_coef, c_begin, c_stop, C, stride_c, label_smoothing,
                    PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC, WIDE_CLASS_LOOP, BLOCK_C)


@triton.jit
def _scale_unit_grad_kernel(grad_ptr, grad_loss_ptr, target_ptr, numel, ignore_index, stride_n, N, stride_s, S,
                            HAS_TARGET: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= grad_loss in place over a dense gradient, nothing done when grad_loss is exactly 1 (see
    scale_unit_grad_, and csrc/cuda/xent_scale.cu for the rule on zeros). A finite scale keeps exact zeros as they
    are (+0: ignored positions, underflowed probabilities); an infinite or NaN one keeps the positions whose target
    is ignore_index, each element finding its position from its offset, (offset / stride) % size along n and along
    s. Loads and stores keep the plain in-range mask, so that they stay 16-byte vectors."""
    scale = tl.load(grad_loss_ptr).to(ACC)
    if scale != 1:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
            offsets = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
            in_range = offsets < numel
            x = tl.load(grad_ptr + offsets, mask=in_range)
            value = x.to(ACC)
            scaled = (value * scale).to(x.dtype)
            if scale - scale == 0:  # finite
                scaled = tl.where(value == 0, x, scaled)
            elif HAS_TARGET:
                position = (offsets // stride_n) % N * S + (offsets // stride_s) % S
                target = tl.load(target_ptr + position, mask=in_range, other=ignore_index)
                scaled = tl.where(target == ignore_index, x, scaled)
            tl.store(grad_ptr + offsets, scaled, mask=in_range)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------

# The block table (deterministic, no autotuning). Rows: a program walks a row in column blocks of up to 16 KB, 16
# elements per thread; the per-row max and sums reduce across the warps of the block. Rows shorter than 512 classes
# share a one-warp program. Triton lays a tile's warps and lanes along the class axis first, so each thread holds a
# piece of every row of the tile and that row's running state: at most 4 rows per thread (the old 4096-element
# multi-row tiles held 16-32, took 255 registers on sm_90 and spilled).
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
# _split_combine_kernel): one chain of 500 merges lost 1e-5 of the loss with smoothing and a class masked at -1e9.
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
        from ._backends import TRITON_CPU_HINT  # here, not at the top: _backends imports this module

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
    weight_sum: torch.Tensor | None  # 0-d sum of weight (the smoothing term's W)
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


def _problem(logits, target, weight, reduction) -> _Problem:
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

    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weight_sum = None
    if weight is not None:
        if weight.shape != (C,):
            raise ValueError(f"fused_xent: weight must be ({C},), got {tuple(weight.shape)}")
        weight = weight.to(acc_dtype).contiguous()
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
            _target_weight_kernel, (triton.cdiv(p.num_positions, block),), p.target, p.weight, position_weight,
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
        if grad is None:
            _launch_split_forward(p, loss_buffer, lse, ignore_index, label_smoothing)
            return
        lse = _empty_lse(p)
        _launch_split_forward(p, loss_buffer, lse, ignore_index, label_smoothing)
        one = torch.ones((), dtype=p.acc_dtype, device=p.logits.device)
        _launch_backward(p, one, (0, 0), lse, total_weight, grad, reduction, ignore_index, label_smoothing)
        return
    # Pointers a specialization never reads (no weight; lse when writing the gradient, or the gradient) are None.
    _launch(
        _forward_kernel, (p.position_programs,), p.logits, p.target, p.weight, p.weight_sum, total_weight, loss_buffer,
        lse, grad,
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
        _split_statistics_kernel, (p.position_programs, p.splits), p.logits, p.target, p.weight, stats,
        *_shape_args(p), ignore_index, p.split_len, SPATIAL=p.spatial, HAS_WEIGHT=p.weight is not None,
        HAS_SMOOTHING=has_smoothing, BLOCK_P=p.tile.block_p, BLOCK_C=p.tile.block_c, num_warps=p.tile.num_warps,
    )
    block = 512
    _launch(
        _split_combine_kernel, (triton.cdiv(p.num_positions, block),), stats, p.logits, p.target, p.weight,
        p.weight_sum, loss_buffer, lse, *_shape_args(p), ignore_index, *_split_float(label_smoothing), p.splits,
        HAS_WEIGHT=p.weight is not None, HAS_SMOOTHING=has_smoothing, BLOCK=block, MERGE_GROUP=MERGE_GROUP,
        num_warps=4,
    )


def _launch_backward(p, grad_loss, grad_loss_strides, lse, total_weight, grad, reduction, ignore_index,
                     label_smoothing):
    _launch(
        _backward_kernel, (p.position_programs, p.splits), grad_loss, *grad_loss_strides, p.logits, p.target,
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
    p = _problem(logits, target, weight, reduction)
    total_weight = _total_weight(p, ignore_index)
    loss_buffer = _loss_buffer(p)
    lse = _empty_lse(p)
    _launch_forward(p, total_weight, loss_buffer, lse, None, reduction, ignore_index, label_smoothing)
    return reduce_loss(loss_buffer, total_weight, reduction, label_smoothing), lse, total_weight


def cross_entropy_bwd(grad_loss, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing):
    """-> d(loss)/d(logits), in the logits dtype with the strides of the kernel's view of the logits."""
    p = _problem(logits, target, weight, reduction)
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
    p = _problem(logits, target, weight, reduction)
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
    p = _problem(logits, target, weight, reduction)
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
        _scale_unit_grad_kernel, (programs,), grad, grad_loss, None if target is None else target.contiguous(),
        grad.numel(), ignore_index, grad.stride(0) if N > 1 else 1, N, grad.stride(2) if S > 1 else 1, S,
        HAS_TARGET=target is not None, ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32,
        BLOCK=SCALE_TILE, num_warps=4,
    )
