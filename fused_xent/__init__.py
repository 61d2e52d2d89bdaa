"""fused_xent: a fused log-softmax + NLL replacement for torch.nn.functional.cross_entropy.

    loss = fused_xent.cross_entropy(logits, target)            # same signature as F.cross_entropy
    criterion = fused_xent.CrossEntropyLoss(label_smoothing=0.1)
"""

from . import _backends
from ._autograd import FusedCrossEntropyFunction
from ._backends import available_backends
from ._validate import InvalidArgumentError
from .functional import cross_entropy
from .modules import CrossEntropyLoss

if _backends.EXTENSION_ERROR is None:
    from ._ops import register_compiled

    register_compiled()

__version__ = "0.1.0"
__all__ = [
    "CrossEntropyLoss", "FusedCrossEntropyFunction", "InvalidArgumentError", "available_backends", "cross_entropy",
]
