"""MoRALinear: a drop-in nn.Linear wrapper with MoRA's square-matrix adapter (SPEC §3)."""

from __future__ import annotations

import torch
from torch import nn

from fusedpeft.backends import check_backend_name
from fusedpeft.fused._checks import check_positive_int, check_probability
from fusedpeft.fused._adapter import AdapterLinear, adapter_dtype, check_base
from fusedpeft.ops.mora import mora_delta_weight, mora_linear
from fusedpeft.reference import MORA_TYPES, mora_padding, mora_r_hat


class MoRALinear(AdapterLinear):
    """``y = base(x) + decompress(compress(dropout(x)) @ M^T)`` with the MoRA reference's mora_type.

    Args:
        base: the nn.Linear to adapt (weight [d, k] shared and frozen).
        r: the LoRA rank whose parameter count is matched: r_hat = round(sqrt((k + d) r)),
            floored to even for type 6.
        mora_type: 1 (sharing, for large r), 6 (RoPE chunks, for small r), or 2, 3, 4 (the other
            share groups ReMoRA cycles through).
        dropout: p in [0, 1) on x before compression (training mode only), SPEC §5 mask.
        backend: None (automatic), "triton", "cuda", "cpu" or "torch".
    Shapes: x [..., k] -> [..., d]; M [r_hat, r_hat], zero-initialised, float32 when the base
    weight is 16-bit, else the base dtype. No alpha scaling.
    """

    def __init__(self, base: nn.Linear, r: int = 8, mora_type: int = 6, dropout: float = 0.0,
                 backend: str | None = None):
        where = "fusedpeft.MoRALinear"
        check_base(where, base)
        check_positive_int(where, "r", r)
        if mora_type not in MORA_TYPES:
            raise ValueError(f"{where}: mora_type must be one of {MORA_TYPES}, got {mora_type!r}")
        check_probability(where, "dropout", dropout)
        check_backend_name(backend)
        k, d = base.in_features, base.out_features
        r_hat = mora_r_hat(k, d, r, mora_type)
        if r_hat < 2 and mora_type == 6:
            raise ValueError(f"{where}: r={r} gives r_hat={r_hat} for a {k}->{d} layer, but type 6 needs an even "
                             f"r_hat >= 2; raise r")
        pad = mora_padding(k, r_hat, mora_type)
        if pad > k:
            raise ValueError(f"{where}: r={r} gives r_hat={r_hat} for in_features={k}: the wrap padding of {pad} "
                             f"features would exceed in_features (needs r_hat <= 2 * in_features); lower r or use "
                             f"mora_type 2 or 3")
        super().__init__(base)
        self.r, self.r_hat, self.mora_type = r, r_hat, mora_type
        self.dropout = float(dropout)
        self.backend = backend
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        self.M = nn.Parameter(torch.zeros(r_hat, r_hat, **factory))

    def adapted_forward(self, x: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
        base = self.base_layer
        return mora_linear(x, base.weight, base.bias, self.M, self.mora_type, dropout_p, seed, self.backend)

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] with base(x) + x @ ΔW^T == forward(x) (dropout off), in the base weight's dtype
        (detached: no gradient flows through it)."""
        delta = mora_delta_weight(self.M, self.in_features, self.out_features, self.mora_type)
        return delta.to(self.base_layer.weight.dtype)


    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"r_hat={self.r_hat}, mora_type={self.mora_type}, dropout={self.dropout}, merged={self.merged}, "
                f"backend={self.backend}")
