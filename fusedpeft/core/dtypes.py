"""The accumulation dtype every backend sums in: fp64 for fp64 inputs, fp32 for every other float
dtype (fp16, bf16, fp32). The Triton kernels read the same rule as a triton.language dtype through
``fusedpeft.kernels._common.tl_accumulation_dtype``."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch.float64 for float64 inputs, torch.float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
