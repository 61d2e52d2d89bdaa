"""The cross-entropy implementations the benchmark compares, each as loss(logits, target) -> scalar mean loss."""

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fused_xent
from fused_xent._backends import backends_serving
from fused_xent._triton_env import triton_interpreter_requested
from fused_xent._value_check import CHECK_VALUES_ENV

import env_info

GRAD_MODE_SUFFIX = {"recompute": "", "in_forward": "-in_forward", "inplace": "-inplace"}


@dataclass
class Provider:
    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    traffic: str  # "recompute", "in_forward" or "inplace": the byte model of timing.bytes_moved that fits it
    overwrites_logits: bool = False  # writes the gradient over its input, so every call needs fresh logits
    rows_only: bool = False  # takes (N, C) logits only, no spatial dimensions
    compiles: bool = False  # needs a warm-up call whose time is compile time, reported apart
    triton: bool = False  # runs Triton kernels, which TRITON_INTERPRET turns into Python (see triton_interpreted)
    note: str = ""
    start_case: Callable[[], None] = field(default=lambda: None)  # called once before each new shape/dtype
    autocast: bool = False  # --autocast: every call runs under torch.autocast (see __call__)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss, under torch.autocast when asked: in the logits' half-precision dtype (bfloat16 for float32
        logits, which autocast leaves as they are), as a mixed-precision training step computes its loss."""
        if not self.autocast:
            return self.loss(logits, target)
        dtype = logits.dtype if logits.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        with torch.autocast(logits.device.type, dtype=dtype):
            return self.loss(logits, target)

    @property
    def grad_in_forward(self) -> bool:
        """Computes the gradient in the forward (in_forward, inplace, Liger), so even a fwd-only run makes one."""
        return self.traffic != "recompute"


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its Python interpreter (TRITON_INTERPRET, read as Triton reads it)."""
    return triton_interpreter_requested()


def fused_backends(device: str) -> list[str]:
    """fused_xent backends that run on `device`, fastest first, the reference last."""
    return backends_serving(device)


def _fused(backend: str, grad_mode: str) -> Provider:
    def loss(logits, target):
        return fused_xent.cross_entropy(logits, target, backend=backend, grad_mode=grad_mode)

    notes = {
        "recompute": "keeps the log-sum-exp, recomputes the softmax in backward",
        "in_forward": "gradient computed in the forward into a new buffer",
        "inplace": "gradient written over the logits in the forward",
    }
    return Provider(
        f"fused-{backend}{GRAD_MODE_SUFFIX[grad_mode]}", loss, traffic=grad_mode,
        overwrites_logits=grad_mode == "inplace", triton=backend == "triton",
        note=f"fused_xent backend={backend!r}: {notes[grad_mode]}",
    )


def _unchecked(backend: str) -> Provider:
    """The default grad mode with the data-dependent checks off (FUSED_XENT_CHECK_VALUES=0, set around each call):
    what the checks' host sync costs on a GPU, beside the default provider."""
    provider = _fused(backend, "recompute")
    checked_loss = provider.loss

    def loss(logits, target):
        with env_info.environment_variable(CHECK_VALUES_ENV, "0"):
            return checked_loss(logits, target)

    return dataclasses.replace(
        provider, name=f"{provider.name}-unchecked", loss=loss,
        note=f"fused_xent backend={backend!r}: as {provider.name}, with {CHECK_VALUES_ENV}=0 (no host sync)",
    )


def _eager() -> Provider:
    return Provider("eager", F.cross_entropy, traffic="recompute", note="torch.nn.functional.cross_entropy")


def _compiled(device: str) -> Provider:
    # Inductor generates Triton kernels for CUDA tensors (C++ for CPU ones).
    provider = Provider(
        "compile", F.cross_entropy, traffic="recompute", compiles=True, triton=device == "cuda",
        note="torch.compile(F.cross_entropy, dynamic=False), recompiled per shape; compile time excluded",
    )

    def start_case():
        # A fresh cache per shape: no recompile limit, and no shape-generic kernel after the second shape.
        torch._dynamo.reset()
        provider.loss = torch.compile(F.cross_entropy, dynamic=False)

    provider.start_case = start_case
    return provider


def _liger(device: str) -> tuple[Provider | None, str]:
    if device != "cuda":
        # Triton's CPU interpreter runs a program block at a time in Python: seconds per call, not a fair peer.
        return None, "liger: skipped on CPU (Triton kernels; the interpreter is not a performance peer)"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as error:  # its package imports others (peft, transformers), which can fail in other ways
        return None, f"liger: not importable ({type(error).__name__}: {error})"

    def loss(logits, target):
        result = liger_cross_entropy(logits, target)
        return result if isinstance(result, torch.Tensor) else result[0]

    provider = Provider(
        "liger", loss, traffic="inplace", overwrites_logits=True, rows_only=True, triton=True,
        note="Liger-Kernel liger_cross_entropy (writes the gradient over the logits in the forward)",
    )
    return provider, ""


def all_providers(device: str) -> tuple[list[Provider], list[str]]:
    """Every provider that can run on `device`, and notes on the ones that cannot."""
    backends = fused_backends(device)
    providers = [_fused(backend, "recompute") for backend in backends]
    if backends:
        # The other grad modes only for the fastest backend: they differ in traffic, not in kernel quality.
        providers += [_fused(backends[0], mode) for mode in ("in_forward", "inplace")]
    if device == "cuda" and backends:
        providers.append(_unchecked(backends[0]))
    providers += [_eager(), _compiled(device)]
    liger, note = _liger(device)
    providers += [liger] if liger else []
    notes = [note] if note else []
    missing = [name for name in backends_serving(device, available_only=False) if name not in backends]
    if missing:
        notes.append(f"fused_xent backends not available here: {', '.join(missing)}")
    return providers, notes


def provider_names(device: str) -> list[str]:
    """The name of every provider bench.py has for `device`, whether or not it can run here (a backend not built,
    Liger not installed): all_providers notes why those are missing."""
    backends = backends_serving(device, available_only=False)
    fused = [_fused(backend, mode) for backend in backends for mode in GRAD_MODE_SUFFIX]
    fused += [_unchecked(backend) for backend in backends]
    return [provider.name for provider in [*fused, _eager(), _compiled(device)]] + ["liger"]  # _liger imports it


def unknown_patterns(device: str, patterns: list[str] | None) -> list[str]:
    """The --providers patterns that name no provider at all (each is an error: a misspelt 'eagr' would otherwise
    drop eager, and every ratio with it, without a word). A provider that exists but cannot run here is left out
    with a note instead, as in the default set."""
    names = provider_names(device)
    return [pattern for pattern in patterns or [] if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]


def select(providers: list[Provider], device: str, full: bool, patterns: list[str] | None) -> list[Provider]:
    """Providers named by --providers patterns (fnmatch), else the default set: everything with --full, otherwise
    the fastest fused backend in each grad mode, the other compiled backends (on a GPU: Triton beside CUDA) in the
    default one, eager, compile and Liger. The pure-PyTorch reference joins the quick set only when it is the
    fastest (no compiled kernel here), in its default grad mode: it makes a handful of logits-sized temporaries,
    seconds per step at 4096x32000 on two cores, and its grad modes say nothing about a kernel's."""
    if patterns:
        return [p for p in providers if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns)]
    if full:
        return providers
    backends = fused_backends(device)
    wanted = {"eager", "compile", "liger"}
    if backends:
        fastest = backends[0]
        modes = GRAD_MODE_SUFFIX.values() if fastest != "torch" else [""]
        wanted |= {f"fused-{fastest}{suffix}" for suffix in modes}
        wanted |= {f"fused-{name}" for name in backends[1:] if name != "torch"}
        wanted.add(f"fused-{fastest}-unchecked")
    return [p for p in providers if p.name in wanted]
