"""Functional forms of the adapter-layer methods, for one layer or every adapter in a model."""

from __future__ import annotations

import torch
from torch import nn

from fusedpeft.fused._adapter import AdapterLinear


def _adapters(module: nn.Module) -> list[AdapterLinear]:
    found = [m for m in module.modules() if isinstance(m, AdapterLinear)]
    if not found:
        raise TypeError(f"expected a LoRALinear / MoRALinear or a model containing them, got {type(module).__name__} "
                        f"with no fusedpeft adapter layers")
    return found


def delta_weight(layer: AdapterLinear) -> torch.Tensor:
    """ΔW [out_features, in_features] of one LoRALinear / MoRALinear, in its base weight's dtype."""
    if not isinstance(layer, AdapterLinear):
        raise TypeError(f"delta_weight: layer must be a LoRALinear or MoRALinear, got {type(layer).__name__}")
    return layer.delta_weight()


def merge(module: nn.Module) -> nn.Module:
    """Fold every adapter in ``module`` (a layer or a whole model) into its base weight; returns it."""
    for layer in _adapters(module):
        if not layer.merged:
            layer.merge()
    return module


def unmerge(module: nn.Module) -> nn.Module:
    """Undo merge() on every merged adapter in ``module``; returns it."""
    for layer in _adapters(module):
        if layer.merged:
            layer.unmerge()
    return module
