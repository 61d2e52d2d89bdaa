"""The gate before timing: each provider's loss and gradient on the benchmark's own inputs against PyTorch in fp64."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shapes import IGNORE_INDEX

# Relative error allowed: |loss - ref| / max(1, |ref|); for the gradient, the larger of max |grad - ref| / max |ref|
# (a few units in the last place of the input dtype, to which the gradient is rounded) and |grad - ref| / |ref| in
# the 2-norm. The first alone is blind to the small entries of wide rows: on 512x32000 a gradient that drops every
# entry below 9e-5 of the largest (97% of them, 13% of each row's mass) passes it in float32, but is 2e-3 off in
# norm. bfloat16: about twice eager's own error, whose loss came 1.04e-2 off on 65536x10 with 1% of the targets
# ignored (its mean of bfloat16 losses), its gradient up to 9e-3 in the first measure on 2x19x128x128: a bfloat16
# error under 2% passes this gate, which is there to keep grossly wrong providers out of the timings; the tests
# hold the kernels to far tighter bounds. float16: gradients of a mean over 65536 positions are subnormal (eager
# 3e-3 in both measures, fused 2e-3 and 3e-3).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # fp64 reference and error reductions in slices of about 128 MB


def _row_chunks(shape: tuple[int, ...]):
    per_row = math.prod(shape[1:]) or 1
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // per_row)
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


class Reference:
    """F.cross_entropy in float64 on the same (rounded) inputs, mean reduction, computed a slice of rows at a time
    (sum per slice, divided by the count of targets that are not ignored) so that a 16 GB problem needs no 32 GB
    fp64 copy."""

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, with_grad: bool):
        count = int((target != IGNORE_INDEX).sum())
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        grad_squares = torch.zeros((), dtype=torch.float64, device=logits.device)
        self.grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device) if with_grad else None
        for rows in _row_chunks(logits.shape):
            x = logits[rows].double().requires_grad_(with_grad)
            loss = F.cross_entropy(x, target[rows], reduction="sum", ignore_index=IGNORE_INDEX)
            if with_grad:
                loss.backward()
                self.grad[rows] = x.grad / count
                grad_squares += (x.grad / count).square().sum()
            total += loss.detach()
        self.loss = (total / count).item()
        self.grad_scale = self.grad.abs().max().item() if with_grad else 0.0
        self.grad_norm = grad_squares.sqrt().item()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    loss_err: float
    grad_err: float | None
    message: str


def check(provider, logits: torch.Tensor, target: torch.Tensor, reference: Reference, dtype_name: str,
          with_grad: bool) -> Verdict:
    """One call of the provider on fresh logits, plus backward and a check of the gradient if `with_grad` (the
    reference must then have one)."""
    x = logits.detach().requires_grad_(True)
    loss = provider(x.clone() if provider.overwrites_logits else x, target)  # a copy to overwrite (see timing)
    loss_err = abs(loss.double().item() - reference.loss) / max(1.0, abs(reference.loss))
    grad_err = None
    if with_grad:
        loss.backward()
        worst, squares = 0.0, 0.0
        for rows in _row_chunks(x.shape):
            error = x.grad[rows].double() - reference.grad[rows]
            worst = max(worst, error.abs().max().item())
            squares += error.square().sum().item()
        grad_err = max(worst / reference.grad_scale, math.sqrt(squares) / reference.grad_norm)
    tolerance = TOLERANCE[dtype_name]
    failures = [
        f"{what} error {err:.2e} > {tolerance:.0e}"
        for what, err in (("loss", loss_err), ("grad", grad_err))
        if err is not None and not err <= tolerance  # `not <=` also catches NaN
    ]
    return Verdict(not failures, loss_err, grad_err, "; ".join(failures) or "ok")
