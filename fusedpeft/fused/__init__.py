"""Drop-in nn.Modules and functionals: the public layer of fusedpeft (docs/contract.md §1)."""

from fusedpeft.fused.functional import delta_weight, merge, unmerge
from fusedpeft.fused.log_probs import linear_log_probs
from fusedpeft.fused.lora import LoRALinear
from fusedpeft.fused.losses import (
    LinearCrossEntropyLoss,
    MaskedCrossEntropyLoss,
    linear_cross_entropy,
    masked_cross_entropy,
)
from fusedpeft.fused.mora import MoRALinear

__all__ = [
    "LoRALinear",
    "MoRALinear",
    "MaskedCrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "masked_cross_entropy",
    "linear_cross_entropy",
    "linear_log_probs",
    "delta_weight",
    "merge",
    "unmerge",
]
