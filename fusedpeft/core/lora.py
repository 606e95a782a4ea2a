"""LoRA's scaling and ΔW (docs/contract.md §2), shared by the layers, DoRA and PEFT checkpoints."""

from __future__ import annotations

import math

import torch

from fusedpeft.core.dtypes import accumulation_dtype


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling * B @ A [D, K] from lora_A [r, K] and lora_B [D, r], in fp32 (fp64 when lora_B is fp64)."""
    wide = accumulation_dtype(lora_B.dtype)
    return scaling * lora_B.to(wide) @ lora_A.to(wide)
