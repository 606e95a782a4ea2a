"""fusedpeft: fused LoRA / MoRA linear layers and masked / weighted cross-entropy for fine-tuning.

Public API (docs/contract.md §1): the layers LoRALinear and MoRALinear, the losses masked_cross_entropy /
linear_cross_entropy and their modules, delta_weight / merge / unmerge, available_backends(),
and the model-level integrations (apply_lora, apply_mora, from_peft, save_adapter, load_adapter,
merge_adapters, patch_causal_lm, InstructionCollator, ReMoRACallback, group_lora_projections). The integrations import
transformers / peft, so they load on first use rather than with ``import fusedpeft``.
"""

import importlib

from fusedpeft import fused
from fusedpeft.backends import available_backends
from fusedpeft.fused import (
    LinearCrossEntropyLoss,
    LoRALinear,
    MaskedCrossEntropyLoss,
    MoRALinear,
    delta_weight,
    linear_cross_entropy,
    linear_log_probs,
    masked_cross_entropy,
    merge,
    unmerge,
)

__version__ = "0.1.0"

# public name -> the integrations module that defines it (imported lazily, see __getattr__)
_INTEGRATIONS = {
    "apply_lora": "fusedpeft.integrations.models",
    "apply_mora": "fusedpeft.integrations.models",
    "merge_adapters": "fusedpeft.integrations.models",
    "from_peft": "fusedpeft.integrations.peft_io",
    "save_adapter": "fusedpeft.integrations.peft_io",
    "load_adapter": "fusedpeft.integrations.peft_io",
    "patch_causal_lm": "fusedpeft.integrations.causal_lm",
    "InstructionCollator": "fusedpeft.integrations.collator",
    "ReMoRACallback": "fusedpeft.integrations.remora",
    "group_lora_projections": "fusedpeft.integrations.lora_grouped",
    "ungroup_lora_projections": "fusedpeft.integrations.lora_grouped",
    "grouped_projections": "fusedpeft.integrations.lora_grouped",
}

__all__ = [*fused.__all__, "available_backends", *_INTEGRATIONS]


def __getattr__(name: str):
    module = _INTEGRATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'fusedpeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_INTEGRATIONS))
