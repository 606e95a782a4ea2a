"""LoRALinear: a drop-in nn.Linear wrapper computing base(x) + scaling * dropout(x) @ A^T @ B^T."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from fusedpeft.backends import check_backend_name
from fusedpeft.core.lora import lora_delta_weight, lora_scaling
from fusedpeft.fused._adapter import AdapterLinear, base_factory, check_base
from fusedpeft.fused._checks import check_positive_int, check_probability
from fusedpeft.fused.dora import (
    WeightNormCache,
    check_dora_base,
    dora_delta_weight,
    dora_merge,
    dora_unmerge,
    magnitude_init,
)
from fusedpeft.ops.dora import dora_linear
from fusedpeft.ops.lora import lora_linear

LORA_INITS = ("kaiming", "gaussian")


class LoRALinear(AdapterLinear):
    """``y = base(x) + scaling * dropout(x) @ lora_A.weight^T @ lora_B.weight^T`` (docs/contract.md §2).

    Args:
        base: the nn.Linear to adapt; its weight [out, in] and bias [out] are shared (not copied)
            and frozen.
        r: rank; alpha: scaling numerator (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: probability p in [0, 1) applied to x on the adapter path (training mode only),
            with the Philox mask of docs/contract.md §5 regenerated in backward, never stored.
        init: "kaiming" (A kaiming-uniform with a = sqrt(5), B zeros) or "gaussian" (A ~ N(0, 1/r^2)).
        backend: None (automatic), "triton", "cuda", "cpu" or "torch".
        use_dora: DoRA (PEFT's use_dora=True, docs/contract.md §8): a learned magnitude
            ``lora_magnitude_vector`` [out] (initialised to the row norms of W + scaling B A) and
            y = base(x) + (m/n - 1) (x' W^T) + (m/n) scaling x' A^T B^T, x' = dropout(x), with
            n = ||W + scaling B A|| per output row, detached, computed without an [out, in] tensor.
    Shapes: x [..., in_features] -> [..., out_features]; lora_A.weight [r, in]; lora_B.weight
    [out, r], float32 when the base weight is 16-bit, else the base dtype.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", backend: str | None = None,
                 use_dora: bool = False):
        where = "fusedpeft.LoRALinear"
        if not isinstance(use_dora, bool):
            raise TypeError(f"{where}: use_dora must be True or False, got {use_dora!r}")
        if use_dora:
            check_dora_base(where, base)
        check_base(where, base)
        check_positive_int(where, "r", r)
        if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"{where}: alpha must be a finite number, got {alpha!r}")
        if alpha == 0:
            raise ValueError(f"{where}: alpha=0 makes scaling = alpha / r zero: the adapter adds nothing and gets no "
                             f"gradient; PEFT's lora_alpha is usually r or 2r")
        check_probability(where, "dropout", dropout)
        if init == "zeros":
            raise ValueError(f"{where}: init='zeros' is not allowed: with A and B both zero no gradient reaches "
                             f"either; use init='kaiming' or 'gaussian'")
        if init not in LORA_INITS:
            raise ValueError(f"{where}: init must be one of {LORA_INITS}, got {init!r}")
        check_backend_name(backend)
        super().__init__(base)
        factory = base_factory(base)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = float(dropout)
        self.backend = backend
        self.reset_lora_parameters(init)
        self.use_dora = use_dora
        if use_dora:
            self._dora_cache, self._dora_merge_scale = WeightNormCache(), None
            self.lora_magnitude_vector = nn.Parameter(magnitude_init(self))

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Initialise as PEFT does: A random (kaiming-uniform a=sqrt(5), or normal std 1/r), B zero."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def adapted_forward(self, x: torch.Tensor, weight, bias: torch.Tensor | None, dropout_p: float,
                        seed: torch.Tensor | None) -> torch.Tensor:
        if self.use_dora:
            return dora_linear(x, weight, bias, self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector,
                               self.scaling, dropout_p, seed, self.backend, self._dora_cache.get(weight))
        return lora_linear(x, weight, bias, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout_p, seed,
                           self.backend)

    def adapted_forward_8bit(self, x: torch.Tensor, q, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
        if not self.use_dora:
            return super().adapted_forward_8bit(x, q, dropout_p, seed)
        return dora_linear(x.to(q.dtype), q, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                           self.lora_magnitude_vector, self.scaling, dropout_p, seed, self.backend,
                           self._dora_cache.get(q), base_output=self.base_layer(x))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling * B @ A [out, in] (DoRA: (m/n) (W + scaling B @ A) - W), computed in fp32,
        returned in the base weight's dtype."""
        if self.use_dora:
            return dora_delta_weight(self)
        return lora_delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling).to(self.base_weight_dtype)

    def merge(self) -> None:
        """W += ΔW; DoRA: W = (m/n) (W + scaling B @ A), n from the unmerged W (kept for unmerge)."""
        if not self.use_dora or self.merged:
            return super().merge()
        dora_merge(self)
        self.merged = True

    def unmerge(self) -> None:
        """Reverses merge() up to rounding."""
        if not self.use_dora or not self.merged:
            return super().unmerge()
        dora_unmerge(self)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}, "
                f"backend={self.backend_repr('dora' if self.use_dora else 'lora')}"
                + (", use_dora=True" if self.use_dora else ""))
