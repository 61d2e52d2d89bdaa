"""The problems the benchmark times: shape families, the quick and full sweeps, and their inputs."""

from dataclasses import dataclass

import torch

FAMILIES = ("llm", "seg", "cls", "seq")
IGNORE_INDEX = -100  # F.cross_entropy's default, which every provider is called with
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    family: str
    shape: tuple[int, ...]  # logits shape; the class dimension is 1
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def num_classes(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def logits_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def target_bytes(self) -> int:
        return self.numel // self.num_classes * torch.int64.itemsize

    @property
    def plot_group(self) -> str:
        """Cases that share a plot line: the same family with everything fixed but the swept size."""
        if self.family == "llm":
            return f"llm-{self.shape[0]}tok"
        if self.family in ("seg", "seq"):
            return f"{self.family}-C{self.num_classes}"
        return "cls"

    @property
    def sweep_value(self) -> int:
        """The plot's x value: vocabulary size, pixels per image, positions per sequence, or number of classes."""
        if self.family == "seg":
            return self.shape[2] * self.shape[3]
        if self.family == "seq":
            return self.shape[2]
        return self.num_classes

    @property
    def sweep_axis(self) -> str:
        return {"llm": "vocabulary size", "seg": "pixels per image (H*W)", "cls": "classes",
                "seq": "positions per sequence (T)"}[self.family]


def _shapes(device: str, full: bool) -> dict[str, list[tuple[int, ...]]]:
    """Shapes per family. GPU sizes are larger so that a kernel, not launch latency, is what gets timed."""
    gpu = device != "cpu"
    tokens, images = (16384, 16) if gpu else (4096, 8)
    if not full:
        if gpu:  # the shapes of the GPU performance targets (issues #3 and #4)
            return {"llm": [(8192, 128256), (4096, 256000)], "seg": [(images, 19, 512, 1024)], "cls": [(65536, 10)],
                    "seq": []}
        return {"llm": [(tokens, 32000)], "seg": [(images, 19, 256, 512)], "cls": [(65536, 10)], "seq": []}
    cityscapes = [(256, 512), (512, 1024)] + ([(1024, 2048)] if gpu else [(128, 256)])
    ade20k = [(128, 128), (256, 256), (512, 512)]
    # On the CPU the vocabulary sweep uses 2048 tokens (4096x256000 fp32 with eager's temporaries outgrows a 24 GB
    # machine) and keeps the quick run's 4096x32000 as a point of its own.
    sweep_tokens = tokens if gpu else tokens // 2
    return {
        "llm": ([] if gpu else [(tokens, 32000)]) + [(sweep_tokens, vocab) for vocab in (32000, 128256, 256000)],
        "seg": sorted([(images, 19, h, w) for h, w in cityscapes]) + [(images, 150, h, w) for h, w in ade20k],
        "cls": [(65536, 10), (8192, 1000)],
        # Vocabulary logits laid out (N, C, T), as a Conv1d head or logits.transpose(1, 2).contiguous() gives them:
        # NCHW with few positions and many classes.
        "seq": [(8, 32000, length) for length in ((64, 256, 1024) if gpu else (16, 64, 256))],
    }


def default_dtypes(device: str, full: bool) -> list[str]:
    if device == "cpu":
        return ["fp32", "bf16"] if full else ["fp32"]
    return ["bf16", "fp32", "fp16"] if full else ["bf16", "fp32"]


def cases(device: str, full: bool, families: list[str], dtypes: list[str]) -> list[Case]:
    table = _shapes(device, full)
    # dtype-major: a run cut short (the GPU check's time limit) has every family in the first dtype.
    return [Case(family, shape, dtype) for dtype in dtypes for family in families for shape in table[family]]


def make_inputs(case: Case, device: str, seed: int = 0, ignored: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal logits with standard deviation 3 (a peaked softmax, as in a trained model) and uniform targets, of
    which a fraction `ignored` (at random positions) is set to ignore_index -100."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(case.shape, dtype=case.dtype, device=device)
    # Draw in float32 slices so that a huge bf16 case never needs a float32 copy of the whole tensor.
    flat = logits.view(case.shape[0], -1)
    for start in range(0, case.shape[0], 256):
        block = flat[start:start + 256]
        block.copy_(torch.randn(block.shape, generator=generator, device=device).mul_(3.0))
    target_shape = case.shape[:1] + case.shape[2:]
    target = torch.randint(0, case.num_classes, target_shape, generator=generator, device=device)
    if ignored:
        target[torch.rand(target_shape, generator=generator, device=device) < ignored] = IGNORE_INDEX
    return logits, target
