"""What LoRALinear and MoRALinear share: the wrapped base layer, adapter dtype, merge / unmerge."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fusedpeft.backends import requested_backend, resolve_backend
from fusedpeft.fused._checks import check_linear_input
from fusedpeft.quantized import check_base as check_quantized_or_linear
from fusedpeft.quantized import (
    compute_dtype,
    dequantized_module_weight,
    float_weight_dtype,
    is_quantized,
    quantized_weight,
    requantize_,
)
from fusedpeft.core.philox import new_dropout_seed


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """float32 next to a 16-bit base weight (PEFT's default), else the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def check_base(where: str, base) -> None:
    """TypeError / ValueError unless ``base`` is an nn.Linear or a supported quantized layer with at
    least one input and one output feature."""
    check_quantized_or_linear(where, base)
    if base.in_features <= 0 or base.out_features <= 0:
        raise ValueError(f"{where}: base must have in_features >= 1 and out_features >= 1, got a "
                         f"{base.in_features} -> {base.out_features} layer (a zero-width layer has nothing to adapt)")


def base_factory(base: nn.Module) -> dict:
    """device and dtype of new adapter parameters for ``base`` (a quantized base: from its compute dtype)."""
    dtype = compute_dtype(base) if quantized_weight(base) is not None else base.weight.dtype
    return {"device": base.weight.device, "dtype": adapter_dtype(dtype)}


def _base_keys_pre_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load a plain nn.Linear's keys (``weight``, ``bias``) into the wrapped ``base_layer``: the
    layout of a transformers checkpoint of the adapted model (fusedpeft.integrations.checkpoints)."""
    for key in ("weight", "bias"):
        if prefix + key in state_dict and prefix + "base_layer." + key not in state_dict:
            state_dict[prefix + "base_layer." + key] = state_dict.pop(prefix + key)


class AdapterLinear(nn.Module):
    """Base class: holds ``base_layer`` (frozen, shared), checks the input, draws the dropout
    seed, and folds ``delta_weight()`` into the base weight on merge()."""

    dropout: float = 0.0

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        base.requires_grad_(False)
        self.merged = False
        self._register_load_state_dict_pre_hook(_base_keys_pre_hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype (the autocast dtype under autocast).

        Dropout is on in training mode only; its seed is one draw from torch's default CPU
        generator (docs/contract.md §5). A merged layer runs the plain base layer."""
        where = f"fusedpeft.{type(self).__name__}.forward"
        base = self.base_layer
        q = quantized_weight(base)
        if q is None:
            check_linear_input(where, x, base.weight)
        else:
            check_quantized_or_linear(where, base)
            check_linear_input(where, x, q, any_dtype=True)
        if self.merged:
            return base(x)
        p = self.dropout if self.training else 0.0
        seed = new_dropout_seed() if p > 0.0 else None
        if q is None:
            return self.adapted_forward(x, base.weight, base.bias, p, seed)
        if q.kind == "8bit":  # the base product is bitsandbytes' own layer output
            return self.adapted_forward_8bit(x, q, p, seed)
        # as bitsandbytes does: x in the compute dtype, the output back in x's dtype
        bias = None if base.bias is None else base.bias.to(q.dtype)
        return self.adapted_forward(x.to(q.dtype), q, bias, p, seed).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.merged:
            warnings.warn(f"{type(self).__name__} {prefix.rstrip('.') or '(root)'} is merged: its base_layer.weight "
                          f"in this state_dict already holds ΔW, and a state_dict records no merged flag; load it "
                          f"only into a merged layer, or unmerge() before saving (loaded into an unmerged layer, ΔW "
                          f"would count twice)", stacklevel=3)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def adapted_forward(self, x: torch.Tensor, weight, bias: torch.Tensor | None, dropout_p: float,
                        seed: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] in the compute dtype -> [..., out]; weight is the base weight [out, in] or a
        fusedpeft.quantized.QuantizedWeight."""
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def adapted_forward_8bit(self, x: torch.Tensor, q, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
        """An 8-bit base: bitsandbytes' own output base(x) plus the adapter path (x in q's compute dtype)."""
        y = self.adapted_forward(x.to(q.dtype), q, None, dropout_p, seed)
        base_out = self.base_layer(x)
        return base_out + y.to(base_out.dtype)

    def backend_repr(self, family: str) -> str:
        """The backend asked for and the one that runs on the base weight's device, e.g. "auto->cpu"."""
        asked = requested_backend(self.backend) if self.backend != "auto" else None
        try:
            runs = resolve_backend(family, self.backend, self.base_layer.weight.device)
        except (RuntimeError, ValueError) as exc:
            return f"{asked or self.backend} (cannot run here: {exc})"
        return f"{asked or 'auto'}->{runs}"

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def base_weight_dtype(self) -> torch.dtype:
        """The float dtype ΔW is added in: W's dtype, or for a quantized base the dtype its weight is
        dequantized to for merging (fusedpeft.quantized.float_weight_dtype)."""
        base = self.base_layer
        return float_weight_dtype(base) if is_quantized(base) else base.weight.dtype

    @torch.no_grad()
    def add_to_base_weight_(self, delta: torch.Tensor) -> None:
        """W += delta [out, in]. A quantized base is dequantized, updated and re-quantized with its own
        settings (as PEFT merges QLoRA): the result is rounded to the quantization grid, with a warning."""
        base = self.base_layer
        if not is_quantized(base):
            base.weight += delta
            return
        warnings.warn(f"{type(self).__name__}: merging into a quantized {type(base).__name__} re-quantizes its weight: "
                      f"W + ΔW is rounded to the quantization grid, so outputs differ slightly from the adapted "
                      f"layer's and unmerge() does not restore W exactly; fusedpeft.merge_adapters(model, "
                      f"dequantize=True) returns an unquantized nn.Linear instead", stacklevel=3)
        requantize_(base, dequantized_module_weight(base) + delta.to(self.base_weight_dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W += ΔW (in W's dtype; a quantized base is re-quantized, see add_to_base_weight_); forward then
        runs the plain base layer. Warns if already merged."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge(): already merged; nothing was changed", stacklevel=2)
            return
        self.add_to_base_weight_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= ΔW, reversing merge() up to rounding (and re-quantization). Warns if not merged."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged; nothing was changed", stacklevel=2)
            return
        self.add_to_base_weight_(-self.delta_weight())
        self.merged = False
