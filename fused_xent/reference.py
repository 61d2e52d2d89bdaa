"""Pure-PyTorch implementation of the fused_xent op contract (see csrc/fused_xent.cpp).

It is the `"torch"` backend: the last fallback on any device and an independent statement of the semantics,
written from PyTorch's own definition (log_softmax followed by nll / smoothing terms) rather than from the algebra
the kernels share, so that it and the kernels check each other. Every tensor is (N, C, S) / (N, S) as in the ops.
"""

import torch

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _class_weights(weight, num_classes, like):
    if weight is None:  # a broadcast 1, not C of them in memory: 8 GB at 2^31 classes
        return torch.ones((), dtype=like.dtype, device=like.device).expand(num_classes)
    return weight.to(like.dtype)


def _target_weights(target, w, ignore_index):
    """(class index safe to gather with, weight of each position's target). An ignored position weighs 0; a class
    index out of range (reachable only with the value checks off) weighs NaN, which makes its loss and gradient
    row NaN as in the kernels, instead of an indexing error or a device assert."""
    valid = target != ignore_index
    in_range = (target >= 0) & (target < w.numel())
    safe_target = torch.where(valid & in_range, target, 0)
    target_weight = torch.where(in_range, w[safe_target], float("nan"))
    return safe_target, torch.where(valid, target_weight, 0)


def log_softmax(x):
    """(log-probabilities over dim 1, lse as the ops save it: (N, S, 2), each position's max (0 for a row of -inf)
    and the log-sum-exp of its logits shifted by it). Shifted by the max first: x - lse would carry the float32
    rounding of an lse of ~1e4 (~1e-3) into every log-probability, and torch.log_softmax sums 256K exps less
    accurately."""
    row_max = x.amax(dim=1, keepdim=True)
    # A row of -inf stays -inf, not NaN, until the end; a +inf logit makes the row NaN, as in PyTorch.
    shift = torch.where(row_max == -torch.inf, 0, row_max)
    shifted = x - shift
    shifted_lse = torch.logsumexp(shifted, dim=1, keepdim=True)
    return shifted - shifted_lse, torch.stack((shift.squeeze(1), shifted_lse.squeeze(1)), dim=-1)


def _per_position(logits, target, weight, ignore_index, label_smoothing):
    """Per-position losses (N, S), lse (N, S, 2) and the mean's denominator."""
    x = logits.to(accumulation_dtype(logits.dtype))
    num_classes = x.shape[1]
    log_probs, lse = log_softmax(x)
    w = _class_weights(weight, num_classes, x).view(1, num_classes, 1)
    if target.is_floating_point():
        smoothed = target.to(x.dtype) * (1.0 - label_smoothing) + label_smoothing / num_classes
        loss = -(w * smoothed * log_probs).sum(1)
        total_weight = torch.full((), float(loss.numel()), dtype=x.dtype, device=x.device)  # no host-to-device copy
        return loss, lse, total_weight
    safe_target, target_weight = _target_weights(target, w.view(-1), ignore_index)
    nll = -target_weight * log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing > 0:
        loss = loss + (label_smoothing / num_classes) * -(w * log_probs).sum(1)
    kept = target != ignore_index
    loss = torch.where(kept, loss, 0)
    # The kernels do not read an ignored position's row: its lse is that of no classes.
    lse = torch.where(kept.unsqueeze(-1), lse, lse.new_tensor([0.0, -torch.inf]))
    return loss, lse, target_weight.sum()


def cast(result, dtype):
    """result in dtype, never as an alias of itself: torch 2.11's torch.compile drops the gradient of an
    autograd.Function whose output is a same-dtype .to() of an intermediate (it returns zeros)."""
    return result if result.dtype == dtype else result.to(dtype)


def _mean_of(total, total_weight, label_smoothing):
    """total / total_weight, as PyTorch divides (0/0 NaN; ±inf over negative weights that cancel), except that with
    label smoothing a zero denominator gives NaN: PyTorch's mean there adds two quotients, of which the NLL one is
    0/0 whenever the counted targets weigh 0 each (the usual way to a zero denominator)."""
    if label_smoothing > 0:
        return torch.where(total_weight == 0, torch.nan, total / total_weight)
    return total / total_weight


def reduce_loss(loss, total_weight, reduction, label_smoothing):
    """The per-position losses (N, S) as `reduction` asks (the Triton backend's too)."""
    if reduction == REDUCTION_NONE:
        return loss
    total = loss.sum()
    return _mean_of(total, total_weight, label_smoothing) if reduction == REDUCTION_MEAN else total


def cross_entropy_fwd(logits, target, weight, reduction, ignore_index, label_smoothing):
    """-> (loss, lse, total_weight), all in the accumulation dtype, as the ops return them."""
    loss, lse, total_weight = _per_position(logits, target, weight, ignore_index, label_smoothing)
    return reduce_loss(loss, total_weight, reduction, label_smoothing), lse, total_weight


def cross_entropy_bwd(grad_loss, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing):
    x = logits.to(lse.dtype)
    num_classes = x.shape[1]
    probs = torch.exp(log_softmax(x)[0])  # as in the forward, rather than from lse
    w = _class_weights(weight, num_classes, x).view(1, num_classes, 1)
    scale = grad_loss.to(x.dtype)
    if reduction == REDUCTION_MEAN:  # non-finite over zero target weight, as the forward's loss
        scale = _mean_of(scale, total_weight, label_smoothing)
    scale = scale.view(x.shape[0], 1, x.shape[2]) if reduction == REDUCTION_NONE else scale
    if target.is_floating_point():
        smoothed = w * (target.to(x.dtype) * (1.0 - label_smoothing) + label_smoothing / num_classes)
        grad = smoothed.sum(1, keepdim=True) * probs - smoothed
        return cast(scale * grad, logits.dtype)
    safe_target, target_weight = (t.unsqueeze(1) for t in _target_weights(target, w.view(-1), ignore_index))
    one_hot = torch.zeros_like(x).scatter_(1, safe_target, 1.0)
    grad = (1.0 - label_smoothing) * target_weight * (probs - one_hot)
    if label_smoothing > 0:
        grad = grad + (label_smoothing / num_classes) * (w.sum() * probs - w)
    kept = (target != ignore_index).unsqueeze(1)
    # The scale of an ignored position is zeroed too, not only its gradient: a double backward differentiates
    # scale * grad, where a scale that is not finite (a mean over zero target weight) would reach the ignored rows.
    return cast(torch.where(kept, torch.where(kept, scale, 0) * grad, 0), logits.dtype)


def _unit_grad_loss(loss, reduction):
    if reduction == REDUCTION_NONE:
        return torch.ones(loss.shape, dtype=loss.dtype, device=loss.device)
    return torch.ones((), dtype=loss.dtype, device=loss.device)


def cross_entropy_fwd_grad(logits, target, weight, reduction, ignore_index, label_smoothing):
    loss, lse, total_weight = cross_entropy_fwd(logits, target, weight, reduction, ignore_index, label_smoothing)
    grad = cross_entropy_bwd(
        _unit_grad_loss(lse[..., 0], reduction), logits, target, weight, lse, total_weight, reduction, ignore_index,
        label_smoothing,
    )
    return loss, grad


def cross_entropy_fwd_grad_(logits, target, weight, reduction, ignore_index, label_smoothing):
    loss, grad = cross_entropy_fwd_grad(logits, target, weight, reduction, ignore_index, label_smoothing)
    logits.copy_(grad)
    return loss
