"""Drop-in nn.Modules and functionals: the public layer of fusedpeft (docs/contract.md §1)."""

from fusedpeft.fused._adapter import AdapterLinear
from fusedpeft.fused._checks import FLOAT_DTYPES, check_loss_options, check_normalize, check_positive_int
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

# The public API is __all__. AdapterLinear (the base class of the layers) and the argument checks
# above are package-internal: the route by which fusedpeft.integrations shares them.
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
