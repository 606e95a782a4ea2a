"""lora_group_forward: several LoRALinear layers that read the same input, in one grouped op."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedpeft.core.philox import new_dropout_seed
from fusedpeft.fused._checks import check_linear_input
from fusedpeft.fused.lora import LoRALinear
from fusedpeft.ops.lora_grouped import lora_linear_grouped
from fusedpeft.quantized import is_quantized

_WHERE = "fusedpeft.lora_group_forward"


def check_group(layers) -> None:
    """ValueError / TypeError unless ``layers`` can run as one group (see lora_group_forward)."""
    if isinstance(layers, LoRALinear) or not isinstance(layers, (Sequence, torch.nn.ModuleList)):
        raise TypeError(f"{_WHERE}: layers must be a sequence (list, tuple, ModuleList) of LoRALinear, got "
                        f"{type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError(f"{_WHERE}: layers is empty; give at least one LoRALinear")
    for i, layer in enumerate(layers):
        if not isinstance(layer, LoRALinear):
            raise TypeError(f"{_WHERE}: layers[{i}] must be a fusedpeft.LoRALinear, got {type(layer).__name__}")
        if getattr(layer, "use_dora", False):
            raise ValueError(f"{_WHERE}: layers[{i}] uses DoRA, which the grouped LoRA op does not implement; "
                             f"call DoRA layers on their own")
        if layer.merged:
            raise ValueError(f"{_WHERE}: layers[{i}] is merged; a merged layer has no adapter path to group "
                             f"(unmerge() it, or call it on its own)")
        if is_quantized(layer.base_layer):
            raise ValueError(f"{_WHERE}: layers[{i}] has a quantized base ({type(layer.base_layer).__name__}); "
                             f"quantized bases are not grouped, call each layer on its own")
    first = layers[0]
    for i, layer in enumerate(layers[1:], start=1):
        w, w0 = layer.base_layer.weight, first.base_layer.weight
        if layer.in_features != first.in_features:
            raise ValueError(f"{_WHERE}: layers[{i}] has in_features={layer.in_features} but layers[0] has "
                             f"{first.in_features}; grouped layers must read the same input")
        if layer.dropout != first.dropout:
            raise ValueError(f"{_WHERE}: layers[{i}] has dropout={layer.dropout} but layers[0] has {first.dropout}; "
                             f"grouped layers share one dropout mask, so their dropout must be equal")
        if layer.training != first.training:
            raise ValueError(f"{_WHERE}: layers[{i}] is in {'training' if layer.training else 'eval'} mode but "
                             f"layers[0] is not; put the group in one mode")
        if w.dtype != w0.dtype or w.device != w0.device:
            raise ValueError(f"{_WHERE}: layers[{i}]'s weight is {w.dtype} on {w.device} but layers[0]'s is "
                             f"{w0.dtype} on {w0.device}")
        if layer.backend != first.backend:
            raise ValueError(f"{_WHERE}: layers[{i}] has backend={layer.backend!r} but layers[0] has "
                             f"{first.backend!r}")


def lora_group_forward(layers: Sequence[LoRALinear], x: torch.Tensor) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], with one shrink pass over x for all adapters.

    For layers that read the same input (attention q/k/v, MLP gate/up): S for every adapter
    comes from one pass over x in forward, dA for every adapter from one pass over x in backward,
    and dX is accumulated in one buffer. x [..., in_features] -> list of [..., out_features_i],
    in x's dtype (the autocast dtype under autocast).

    Dropout: the group draws ONE seed (one draw from torch's default CPU generator, docs/contract.md §5) and
    every layer sees the same mask of x. Separate calls would draw one seed per layer, so with
    dropout > 0 the results differ from [layer(x) for layer in layers] in which elements are
    dropped (each layer's mask is still a correct docs/contract.md §5 mask); with dropout 0, or in eval mode,
    the results are those of separate calls.

    The layers must all be LoRALinear, unmerged, with the same in_features, dropout, training
    mode, base weight dtype/device and backend; otherwise ValueError / TypeError before anything
    runs. Saved for backward: x, S [N, sum r_i] and the seed.
    """
    check_group(layers)
    layers = list(layers)
    first = layers[0]
    check_linear_input(_WHERE, x, first.base_layer.weight)
    p = first.dropout if first.training else 0.0
    seed = new_dropout_seed() if p > 0.0 else None
    return lora_linear_grouped(
        x, [layer.base_layer.weight for layer in layers], [layer.base_layer.bias for layer in layers],
        [layer.lora_A.weight for layer in layers], [layer.lora_B.weight for layer in layers],
        [layer.scaling for layer in layers], p, seed, first.backend)
