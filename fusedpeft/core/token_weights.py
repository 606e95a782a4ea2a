"""The per-token loss weights w_t of the masked / weighted cross-entropy (docs/contract.md §4)."""

from __future__ import annotations

import torch

from fusedpeft.core.dtypes import accumulation_dtype


def token_loss_weights(labels: torch.Tensor, *, instruction_mask: torch.Tensor | None = None,
                       instruction_weight: float = 0.0, token_weights: torch.Tensor | None = None,
                       ignore_index: int = -100, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_t, labels' shape: 0 on ignore_index, else 1, times instruction_weight where instruction_mask
    (labels' shape) is set, times token_weights (labels' shape). In ``dtype`` (float64 losses pass
    float64 so that instruction_weight is not rounded to float32); float64 when token_weights are."""
    w = (labels != ignore_index).to(dtype)
    if instruction_mask is not None:
        w = torch.where(instruction_mask.bool(), w * instruction_weight, w)
    if token_weights is not None:
        w = w * token_weights.to(accumulation_dtype(token_weights.dtype))
    return w
