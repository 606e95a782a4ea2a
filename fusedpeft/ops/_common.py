"""Helpers shared by the op families: autocast handling, optional outputs, the 2-D view."""

from __future__ import annotations

import contextlib

import torch

# Custom ops cannot return None; an unneeded gradient travels as this empty tensor.
def empty_result(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def maybe(t: torch.Tensor) -> torch.Tensor | None:
    """The inverse of empty_result: None for a 0-element placeholder."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def no_autocast(device_type: str):
    """Inside an op implementation the dtypes were settled by the caller: autocast must not recast."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # device types without autocast support
        return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(x, weight, bias) in the autocast dtype when autocast is on for x's device, as an
    nn.Linear would see them; unchanged otherwise."""
    cast = autocast_dtype(x.device.type)
    if cast is None:
        return x, weight, bias
    return x.to(cast), weight.to(cast), None if bias is None else bias.to(cast)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., F] -> contiguous [N, F] (a view when x is already contiguous)."""
    return x.reshape(-1, x.shape[-1]).contiguous()
