"""Triton kernels for fused_xent: the @triton.jit code alone. Their launchers (block table, grids, the op
functions) are in fused_xent/triton_launchers.py; autograd and op registration in fused_xent/_triton_ops.py. The
per-position algebra mirrors csrc/common/xent_math.h term by term so that the CPU, CUDA and Triton backends agree.

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

import triton
import triton.language as tl

from .reference import REDUCTION_MEAN, REDUCTION_NONE

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
def _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC):
    """W = sum_c w[c] (summed once by the launcher), or C without weights; only smoothing terms read it, and without
    smoothing the launcher passes no sum (C then stands in, unread)."""
    if HAS_WEIGHT and HAS_SMOOTHING:
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
    kernels fold it (xent_position.cuh LseParts): one subtraction per class instead of two."""
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
def xent_target_weight_kernel(target_ptr, weight_ptr, position_weight_ptr, num_positions, C, ignore_index,
                              HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """w[y] of every position (0 if ignored, NaN if out of range): summed, the mean's denominator."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = index < num_positions
    _, _, weight_of_target = _class_target(target_ptr, weight_ptr, index, in_range, C, ignore_index, HAS_WEIGHT,
                                           position_weight_ptr.dtype.element_ty)
    tl.store(position_weight_ptr + index, weight_of_target, mask=in_range)


@triton.jit
def xent_forward_kernel(logits_ptr, target_ptr, weight_ptr, weight_sum_ptr, total_weight_ptr, loss_ptr, lse_ptr,
                        grad_ptr, num_positions, S, C, stride_n, stride_c, stride_s, ignore_index, smoothing_hi,
                        smoothing_lo, SPATIAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        HAS_SMOOTHING: tl.constexpr, REDUCTION: tl.constexpr, WRITE_GRAD: tl.constexpr,
                        WIDE_CLASS_LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-position loss (into loss_ptr, in the accumulation dtype: the output for reduction none, else what
    reduce_loss sums) and lse (_store_lse); with WRITE_GRAD, the gradient for grad_loss = 1 instead of lse
    (total_weight must then already hold the mean's denominator). A program takes one block of positions.
    WIDE_CLASS_LOOP: see wide_class_loop in triton_launchers.py."""
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
    weight_sum = _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT, HAS_SMOOTHING, ACC)
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
            prob_coef, class_coef, target_coef = scale * term_weights, scale, scale
        else:
            prob_coef, class_coef, target_coef = _index_grad_coeffs(weight_of_target, weight_sum, scale,
                                                                    label_smoothing, C, HAS_SMOOTHING)
        _store_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, offset, in_range, rows_counted, read, reference,
                    log_sum, safe_y, prob_coef, class_coef, target_coef, 0, C, C, stride_c, label_smoothing,
                    PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC, WIDE_CLASS_LOOP, BLOCK_C)
    else:
        _store_lse(lse_ptr, index, in_range, reference, log_sum)


@triton.jit
def xent_split_statistics_kernel(logits_ptr, target_ptr, weight_ptr, stats_ptr, num_positions, S, C, stride_n, stride_c,
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
    """One range's state as xent_split_statistics_kernel stored it; masked positions read as an empty range."""
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
def xent_split_combine_kernel(stats_ptr, logits_ptr, target_ptr, weight_ptr, weight_sum_ptr, loss_ptr, lse_ptr,
                              num_positions, S, C, stride_n, stride_c, stride_s, ignore_index, smoothing_hi,
                              smoothing_lo, splits, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                              BLOCK: tl.constexpr, MERGE_GROUP: tl.constexpr):
    """Merges the ranges' states of each position in a fixed order (bitwise reproducible): groups of MERGE_GROUP
    consecutive ranges, then the groups, since rounding grows with the length of a chain of merges. Then lse and
    the loss as in xent_forward_kernel."""
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
    weight_sum = _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT, HAS_SMOOTHING, ACC)
    loss = _index_target_loss(log_sum, (reference - target_logit) + log_sum, weight_of_target, weight_sum,
                              relative_dot, label_smoothing, C, HAS_SMOOTHING)
    tl.store(loss_ptr + index, tl.where(counted, loss, 0.0), mask=in_range)
    _store_lse(lse_ptr, index, in_range, reference, log_sum)


@triton.jit
def xent_backward_kernel(grad_loss_ptr, grad_loss_stride_n, grad_loss_stride_s, logits_ptr, target_ptr, weight_ptr,
                         weight_sum_ptr, lse_ptr, total_weight_ptr, grad_ptr,
                         num_positions, S, C, stride_n, stride_c, stride_s, ignore_index, smoothing_hi, smoothing_lo,
                         split_len, SPATIAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         HAS_SMOOTHING: tl.constexpr, REDUCTION: tl.constexpr, SPLIT: tl.constexpr,
                         WIDE_CLASS_LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gradient from the saved lse (_store_lse): one read of the logits (plus the targets) and one write. With SPLIT
    (class-index targets), program (position block, k) writes classes [k split_len, (k+1) split_len).
    WIDE_CLASS_LOOP: see wide_class_loop in triton_launchers.py."""
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
        safe_y, counted = index, in_range
        prob_coef, class_coef, target_coef = scale * weighted_target_sum, scale, scale
    else:
        safe_y, counted, weight_of_target = _class_target(target_ptr, weight_ptr, index, in_range, C, ignore_index,
                                                          HAS_WEIGHT, ACC)
        weight_sum = _class_weight_sum(weight_sum_ptr, C, HAS_WEIGHT, HAS_SMOOTHING, ACC)
        prob_coef, class_coef, target_coef = _index_grad_coeffs(weight_of_target, weight_sum, scale, label_smoothing,
                                                                C, HAS_SMOOTHING)
    _store_grad(logits_ptr, target_ptr, weight_ptr, grad_ptr, offset, in_range, counted,
                _positions_read(counted, in_range, SPATIAL), reference, log_sum, safe_y, prob_coef, class_coef,
                target_coef, c_begin, c_stop, C, stride_c, label_smoothing,
                PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC, WIDE_CLASS_LOOP, BLOCK_C)


@triton.jit
def xent_scale_unit_grad_kernel(grad_ptr, grad_loss_ptr, target_ptr, numel, ignore_index, stride_n, N, stride_s, S,
                                HAS_TARGET: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= grad_loss in place over a dense gradient, nothing done when grad_loss is exactly 1 (see
    scale_unit_grad_ in triton_launchers.py, and csrc/cuda/xent_scale.cu for the rule on zeros). A finite scale keeps
    exact zeros as they are (+0: ignored positions, underflowed probabilities); an infinite or NaN one keeps the
    positions whose target is ignore_index, each element finding its position from its offset, (offset / stride) %
    size along n and along s. Loads and stores keep the plain in-range mask, so that they stay 16-byte vectors."""
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

