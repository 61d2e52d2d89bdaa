"""No N×C intermediate: the forward keeps O(N·S) memory, forward+backward adds only the gradient itself."""

import subprocess
import sys

import pytest

import fused_xent

_SCRIPT = """
import re, torch, fused_xent

def rss_kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def peak_growth_mib(step):
    step()  # warm up: thread pools, code paths
    base = rss_kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark from the current RSS
    step()
    return (rss_kib("VmHWM") - base) / 1024

rows = (2048, 32000) if "{layout}" == "rows" else (8, 19, 256, 256)
leaf = torch.randn(rows, dtype=torch.{dtype}).requires_grad_(True)
x = leaf.clone()  # logits are the output of an op (grad_mode='inplace' refuses leaves)
target = torch.randint(0, rows[1], rows[:1] + rows[2:])
logits_mib = x.numel() * x.element_size() / 2**20
# Autocast runs cross entropy in float32: no float32 copy of bfloat16 logits (nor a float32 gradient) may be made.
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled={autocast})

def forward():
    with torch.no_grad(), autocast:
        fused_xent.cross_entropy(x, target, backend="cpu", label_smoothing=0.1)

def forward_backward():
    with autocast:
        loss = fused_xent.cross_entropy(x, target, backend="cpu", label_smoothing=0.1, grad_mode="{grad_mode}")
    loss.backward()
    leaf.grad = None  # so that the next step's baseline holds no gradient

print(logits_mib, peak_growth_mib(forward), peak_growth_mib(forward_backward))
"""


@pytest.mark.skipif("cpu" not in fused_xent.available_backends(), reason="compiled extension missing")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("layout", ["rows", "spatial"])
@pytest.mark.parametrize("grad_mode, dtype, autocast", [
    ("recompute", "float32", False), ("in_forward", "float32", False), ("inplace", "float32", False),
    # in_forward and inplace keep PyTorch's float32 copy under autocast (_autocast.autocast_arguments)
    ("recompute", "bfloat16", True),
], ids=["recompute", "in_forward", "inplace", "recompute-autocast"])
def test_peak_memory(layout, grad_mode, dtype, autocast):
    script = _SCRIPT.replace("{layout}", layout).replace("{grad_mode}", grad_mode)
    script = script.replace("{dtype}", dtype).replace("{autocast}", str(autocast))
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    logits_mib, forward_mib, forward_backward_mib = map(float, out.split())
    assert forward_mib < 0.05 * logits_mib + 8, f"forward grew RSS by {forward_mib:.0f} MiB"
    gradient_mib = 0 if grad_mode == "inplace" else logits_mib
    assert forward_backward_mib < gradient_mib + 0.05 * logits_mib + 8, (
        f"forward+backward grew RSS by {forward_backward_mib:.0f} MiB for {logits_mib:.0f} MiB of logits"
    )
