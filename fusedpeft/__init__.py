"""fusedpeft: fused LoRA / MoRA linear layers and masked / weighted cross-entropy for fine-tuning.

Public API (SPEC §1): the layers LoRALinear and MoRALinear, the losses masked_cross_entropy /
linear_cross_entropy and their modules, delta_weight / merge / unmerge, available_backends().
"""

from fusedpeft import fused
from fusedpeft.backends import available_backends
from fusedpeft.fused import (
    LinearCrossEntropyLoss,
    LoRALinear,
    MaskedCrossEntropyLoss,
    MoRALinear,
    delta_weight,
    linear_cross_entropy,
    masked_cross_entropy,
    merge,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [*fused.__all__, "available_backends"]
