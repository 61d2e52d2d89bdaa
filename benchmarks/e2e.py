"""End-to-end check: train a small transformer LM and a small segmentation net twice from the same initial weights
and data, once with fused_xent's loss and once with torch.nn.functional.cross_entropy, and compare the loss curves
and the time spent in the loss.

The backward stops at the logits first: the loss's forward and its gradient with respect to the logits
(torch.autograd.grad) are timed alone, and that gradient is then pushed through the model. Both runs take the same
path, so the comparison is of the loss alone. Writes <out>/e2e-<device>-<date>[-<settings>].{md,csv}, the settings
being those that differ from the defaults (output_stem).
"""

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_xent
from fused_xent._backends import backends_serving
from fused_xent._triton_env import triton_interpreter_requested

import env_info
from bench import positive_int

SEG_IGNORE = 255  # Cityscapes' "void" label


class TinyLM(nn.Module):
    def __init__(self, vocab=4096, width=128, layers=2, heads=4, seq=128):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(torch.randn(seq, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        hidden = self.blocks(self.embed(tokens) + self.position, mask=self.causal, is_causal=True)
        # (batch * seq, vocab), flattened before the head so that the logits are its output rather than a view of it,
        # which grad_mode='inplace' may overwrite and torch.autograd.grad can still differentiate with respect to.
        return self.head(self.norm(hidden).flatten(0, 1))


def tiny_segmenter(classes=19, width=32):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, classes, 1),
    )


def lm_batch(generator, vocab=4096, batch=8, seq=128):
    """Token streams from a fixed random successor table (followed 80% of the time), so the loss can fall."""
    successor = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    tokens = torch.empty(batch, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
    for t in range(seq):
        follow = torch.rand(batch, generator=generator) < 0.8
        tokens[:, t + 1] = torch.where(follow, successor[tokens[:, t]], torch.randint(0, vocab, (batch,),
                                                                                      generator=generator))
    return tokens[:, :-1], tokens[:, 1:].flatten()


def seg_batch(generator, classes=19, batch=8, size=64):
    """Smooth random images labelled by a fixed projection of their blurred colours; 5% of pixels are void."""
    projection = torch.randn(classes, 3, generator=torch.Generator().manual_seed(4321))
    images = F.avg_pool2d(torch.randn(batch, 3, size, size, generator=generator), 5, stride=1, padding=2) * 3
    labels = torch.einsum("kc,bchw->bkhw", projection, images).argmax(1)
    labels[torch.rand(labels.shape, generator=generator) < 0.05] = SEG_IGNORE
    return images, labels


TASKS = {
    "lm": (lambda: TinyLM(), lm_batch, {}),
    "seg": (lambda: tiny_segmenter(), seg_batch, {"ignore_index": SEG_IGNORE}),
}


def train(task, use_fused, args, device):
    build, make_batch, loss_kwargs = TASKS[task]
    torch.manual_seed(0)
    model = build().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = torch.Generator().manual_seed(1)
    losses, same_input_diffs, loss_seconds = [], [], 0.0
    started = time.perf_counter()
    for step in range(args.steps):
        inputs, target = (tensor.to(device) for tensor in make_batch(data))
        logits = model(inputs)
        if use_fused:  # the same logits through PyTorch's loss, untimed: agreement without trajectory drift
            reference = F.cross_entropy(logits.detach(), target, **loss_kwargs).item()
        _sync(device)
        loss_started = time.perf_counter()
        if use_fused:
            loss = fused_xent.cross_entropy(logits, target, backend=args.backend, grad_mode=args.grad_mode,
                                            **loss_kwargs)
        else:
            loss = F.cross_entropy(logits, target, **loss_kwargs)
        (logits_grad,) = torch.autograd.grad(loss, logits)
        _sync(device)
        if step >= untimed_steps(args.steps):
            loss_seconds += time.perf_counter() - loss_started
        logits.backward(logits_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if use_fused:
            same_input_diffs.append(abs(losses[-1] - reference))
    return losses, same_input_diffs, loss_seconds, time.perf_counter() - started


def untimed_steps(steps: int) -> int:
    """Steps left out of the loss time: the first, which pays one-time costs (Triton's compile, the process's first
    autograd backward, the value check's first pinned buffer), in whichever run comes first; none of a 1-step run."""
    return 1 if steps > 1 else 0


def output_stem(args, device: str) -> str:
    """e2e-<device>-<date>, then every setting that differs from the default run's, so that runs with other
    settings never overwrite its tables."""
    parts = ["e2e", device, datetime.date.today().isoformat()]
    parts += [args.tasks.replace(",", "+")] if args.tasks != "lm,seg" else []
    parts += [args.grad_mode] if args.grad_mode != "recompute" else []
    parts += [args.backend] if args.backend not in (None, "auto") else []
    parts += [f"steps{args.steps}"] if args.steps != 300 else []
    parts += [f"threads{args.threads}"] if args.threads else []
    return "-".join(parts)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps per run, >= 1 (default: 300)")
    parser.add_argument("--tasks", default="lm,seg", help="comma list of lm, seg (default: both)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", help="fused_xent backend that runs on --device here (default: auto)")
    parser.add_argument("--grad-mode", default="recompute", choices=("recompute", "in_forward", "inplace"))
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads, >= 1 (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = args.device
    # Checked here, not by the first training step: a bad value is an argparse error (status 2), not a traceback.
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks or any(task not in TASKS for task in tasks):
        parser.error(f"--tasks {args.tasks!r}: a comma list of {', '.join(TASKS)} is needed")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    backends = backends_serving(device)
    if args.backend not in (None, "auto", *backends):
        parser.error(f"--backend {args.backend}: choose one that runs on {device} tensors here: "
                     f"{', '.join(backends)} or auto")
    chosen = args.backend if args.backend not in (None, "auto") else backends[0]
    if chosen == "triton" and triton_interpreter_requested():
        # The loss time per step is what this check reports; the interpreter's says nothing about the kernels.
        parser.error("TRITON_INTERPRET is set: the triton backend would run in Triton's Python interpreter and be "
                     "timed as its kernels; unset TRITON_INTERPRET or choose another --backend")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = env_info.describe(device)
    rows, summary = [], []
    timed_steps = args.steps - untimed_steps(args.steps)
    for task in tasks:
        fused_losses, same_input, fused_loss_s, fused_total_s = train(task, True, args, device)
        torch_losses, _, torch_loss_s, torch_total_s = train(task, False, args, device)
        curve_diff = [abs(a - b) for a, b in zip(fused_losses, torch_losses, strict=True)]
        rows += [[task, step, a, b, d, s] for step, (a, b, d, s) in
                 enumerate(zip(fused_losses, torch_losses, curve_diff, same_input, strict=True))]
        summary.append([
            task, args.steps, f"{torch_losses[0]:.4f} -> {torch_losses[-1]:.4f}", f"{fused_losses[-1]:.4f}",
            f"{curve_diff[0]:.1e}", f"{max(curve_diff):.1e}", f"{max(same_input):.1e}",
            f"{1e3 * torch_loss_s / timed_steps:.2f}", f"{1e3 * fused_loss_s / timed_steps:.2f}",
            f"{torch_loss_s / fused_loss_s:.2f}x", f"{torch_total_s:.1f} / {fused_total_s:.1f}",
        ])
        print(f"{task}: max |loss diff| {max(curve_diff):.2e} over {args.steps} steps; loss time per step "
              f"{1e3 * torch_loss_s / timed_steps:.2f} ms (PyTorch) vs {1e3 * fused_loss_s / timed_steps:.2f} ms "
              "(fused_xent)", file=sys.stderr)
    header = ["task", "steps", "PyTorch loss first -> last", "fused last", "step-0 diff", "max curve diff",
              "max same-input diff", "PyTorch loss ms/step", "fused loss ms/step", "loss speedup",
              "total s PyTorch / fused"]
    lines = [f"# fused_xent end-to-end check, {device}, {env['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [
        f"- fused_xent.cross_entropy(backend={args.backend or 'auto'}, grad_mode={args.grad_mode!r}) vs "
        "F.cross_entropy; same initial weights, data and optimizer (AdamW, lr 2e-3) in both runs.",
        "- lm: 2-layer transformer, width 128, vocabulary 4096, batch 8 x 128 tokens. seg: 4 convolutions, 19 "
        "classes, 8 x 64 x 64 images, 5% void pixels (ignore_index=255).",
        "- max curve diff: largest |loss difference| at the same step of the two runs (includes drift of the two "
        "trajectories); max same-input diff: largest |fused loss - PyTorch loss| on the same logits.",
        "- Loss time: forward + backward of the loss alone (its gradient with respect to the logits), "
        "time.perf_counter"
        + (" after cuda.synchronize" if device == "cuda" else "")
        + "; per step, over every step but the first (its one-time costs fall on whichever run comes first).",
        "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ] + ["| " + " | ".join(map(str, line)) + " |" for line in summary]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / output_stem(args, device)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "step", "fused_loss", "torch_loss", "abs_diff", "same_input_abs_diff"])
        writer.writerows(rows)
    print("\n".join(lines[-len(summary) - 2:]))
    print(f"wrote {stem.with_suffix('.md')}, {stem.with_suffix('.csv')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
