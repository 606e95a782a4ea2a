"""What LoRALinear and MoRALinear share: the wrapped base layer, adapter dtype, merge / unmerge."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fusedpeft.backends import requested_backend, resolve_backend
from fusedpeft.fused._checks import check_linear_input
from fusedpeft.reference import new_dropout_seed


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """float32 next to a 16-bit base weight (PEFT's default), else the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def check_base(where: str, base) -> None:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{where}: base must be a torch.nn.Linear, got {type(base).__name__}")


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
        generator (SPEC §5). A merged layer runs the plain base layer."""
        check_linear_input(f"fusedpeft.{type(self).__name__}.forward", x, self.base_layer.weight)
        if self.merged:
            return self.base_layer(x)
        p = self.dropout if self.training else 0.0
        return self.adapted_forward(x, p, new_dropout_seed() if p > 0.0 else None)

    def adapted_forward(self, x: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

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

    @torch.no_grad()
    def merge(self) -> None:
        """W += ΔW (in W's dtype); forward then runs the plain base layer. Warns if already merged."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge(): already merged; nothing was changed", stacklevel=2)
            return
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= ΔW, reversing merge() up to rounding. Warns if not merged."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged; nothing was changed", stacklevel=2)
            return
        self.base_layer.weight -= self.delta_weight()
        self.merged = False
