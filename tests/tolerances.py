"""Tolerances of results against PyTorch, with no import of fused_xent (test_cpu_ops.py loads only the
compiled library)."""

import torch

# (rtol, atol) of fused results against PyTorch evaluated in float64 on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 2e-4),
    torch.bfloat16: (1.6e-2, 2e-3),
}
# The atol of gradients, relative to the size of their terms (assert_grad_close). Every kernel computes a half-
# precision gradient in float32 and rounds it to its dtype once (twice in in_forward and inplace): an error relative
# to the entry, which rtol bounds. So atol is float32's: the dtype's own (2e-3 of the largest entry in bfloat16)
# would pass any value at all for the entries of p < 1e-3, 99.6% of a 32000-class row.
GRAD_ATOL = {
    torch.float64: 1e-11,
    torch.float32: 2e-6,
    torch.float16: 2e-6,
    torch.bfloat16: 2e-6,
}

def _compare(actual, expected, rtol, atol, what):
    # Round the float64 reference to the result's dtype first: a float16 sum past 65504 is inf in PyTorch too.
    expected = expected.to(actual.dtype).double()
    torch.testing.assert_close(
        actual.double().cpu(), expected.cpu(), rtol=rtol, atol=atol, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def assert_close(actual, expected, dtype, what="", magnitude=1.0):
    """Losses (and other values). `magnitude` scales the absolute tolerance: lse - x loses digits in proportion to
    |x| (and to the weights), in PyTorch as in any float implementation."""
    rtol, atol = TOLERANCES[dtype]
    _compare(actual, expected, rtol, atol * max(1.0, float(magnitude)), what)


def assert_grad_close(actual, expected, dtype, what="", terms=None):
    """Gradients. The absolute tolerance is a fraction of the size of the terms each entry is a difference of
    (`terms`, by default the largest expected entry): a mean over many positions makes every entry small (about
    p / N), below any fixed atol, so a fixed one would pass a gradient of zeros. Pass `terms` where entries cancel,
    as with full label smoothing over near-uniform probabilities, where W p[c] - w[c] ~ 0. An expected gradient of
    exact zeros (one class: p - 1 = 0) keeps the fixed atol, for the rounding of p - 1. Never below the spacing of
    the output dtype at 0 (float16: 6e-8): a value that lies halfway between two subnormals rounds either way."""
    rtol, atol = TOLERANCES[dtype][0], GRAD_ATOL[dtype]
    if terms is None:
        terms = expected.detach().abs().nan_to_num(0.0, 0.0, 0.0).max().item() if expected.numel() else 0.0
    info = torch.finfo(actual.dtype)
    _compare(actual, expected, rtol, max(atol * terms if terms > 0 else atol, info.smallest_normal * info.eps), what)
