"""MoRALinear: a drop-in nn.Linear wrapper with MoRA's square-matrix adapter (docs/contract.md §3)."""

from __future__ import annotations

import torch
from torch import nn

from fusedpeft.backends import check_backend_name
from fusedpeft.core.mora import mora_padding, mora_r_hat
from fusedpeft.fused._checks import check_mora_type, check_positive_int, check_probability
from fusedpeft.fused._adapter import AdapterLinear, base_factory, check_base
from fusedpeft.ops.mora import mora_delta_weight, mora_linear


# ReMoRA's default type cycle (the MoRA reference's ResetReloraCallback with remora_types=4)
REMORA_CYCLE = {1: 2, 2: 3, 3: 4, 4: 1}


def _checked_r_hat(where: str, k: int, d: int, r: int, mora_type: int) -> int:
    """r_hat of a k -> d layer at LoRA rank r, after the checks every MoRA type needs."""
    r_hat = mora_r_hat(k, d, r, mora_type)
    if r_hat < 2 and mora_type == 6:
        raise ValueError(f"{where}: r={r} gives r_hat={r_hat} for a {k}->{d} layer, but type 6 needs an even "
                         f"r_hat >= 2; raise r")
    pad = mora_padding(k, r_hat, mora_type)
    if pad > k:
        raise ValueError(f"{where}: r={r} gives r_hat={r_hat} for in_features={k}: the wrap padding of {pad} "
                         f"features would exceed in_features (needs r_hat <= 2 * in_features); lower r or use "
                         f"mora_type 2 or 3")
    return r_hat


class MoRALinear(AdapterLinear):
    """``y = base(x) + decompress(compress(dropout(x)) @ M^T)`` with the MoRA reference's mora_type.

    Args:
        base: the nn.Linear to adapt (weight [d, k] shared and frozen).
        r: the LoRA rank whose parameter count is matched: r_hat = round(sqrt((k + d) r)),
            floored to even for type 6.
        mora_type: 1 (sharing, for large r), 6 (RoPE chunks, for small r), or 2, 3, 4 (the other
            share groups ReMoRA cycles through).
        dropout: p in [0, 1) on x before compression (training mode only), docs/contract.md §5 mask.
        backend: None (automatic), "triton", "cuda", "cpu" or "torch".
    Shapes: x [..., k] -> [..., d]; M [r_hat, r_hat], zero-initialised, float32 when the base
    weight is 16-bit, else the base dtype. No alpha scaling.
    """

    def __init__(self, base: nn.Linear, r: int = 8, mora_type: int = 6, dropout: float = 0.0,
                 backend: str | None = None):
        where = "fusedpeft.MoRALinear"
        check_base(where, base)
        check_positive_int(where, "r", r)
        check_mora_type(where, "mora_type", mora_type)
        check_probability(where, "dropout", dropout)
        check_backend_name(backend)
        r_hat = _checked_r_hat(where, base.in_features, base.out_features, r, mora_type)
        super().__init__(base)
        self.r, self.r_hat, self.mora_type = r, r_hat, mora_type
        self.dropout = float(dropout)
        self.backend = backend
        factory = base_factory(base)
        self.M = nn.Parameter(torch.zeros(r_hat, r_hat, **factory))

    def adapted_forward(self, x: torch.Tensor, weight, bias: torch.Tensor | None, dropout_p: float,
                        seed: torch.Tensor | None) -> torch.Tensor:
        return mora_linear(x, weight, bias, self.M, self.mora_type, dropout_p, seed, self.backend)

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] with base(x) + x @ ΔW^T == forward(x) (dropout off), in the base weight's dtype
        (detached: no gradient flows through it)."""
        delta = mora_delta_weight(self.M, self.in_features, self.out_features, self.mora_type)
        return delta.to(self.base_weight_dtype)

    @torch.no_grad()
    def fold_and_reset(self, next_type: int | None = None) -> int:
        """One ReMoRA restart: W += ΔW for good, M re-zeroed in place, mora_type switched; returns the new type.

        The output is unchanged (the update now lives in the base weight, rounded to its dtype) and
        ``self.M`` stays the same Parameter object, so an optimizer keeps updating it (reset its
        state separately, see ReMoRACallback). next_type=None follows the cycle 1 -> 2 -> 3 -> 4 -> 1;
        a type-6 layer needs an explicit next_type. A next_type whose r_hat differs from the
        current one (6 <-> 1-4 when the odd/even rounding differs) or whose wrap padding would
        exceed in_features is rejected before anything changes.
        """
        where = "fusedpeft.MoRALinear.fold_and_reset"
        if self.merged:
            raise RuntimeError(f"{where}: the layer is merged (its update is already in the base weight); call "
                               f"unmerge() first")
        if next_type is None:
            if self.mora_type not in REMORA_CYCLE:
                raise ValueError(f"{where}: mora_type {self.mora_type} has no successor in the ReMoRA cycle "
                                 f"{REMORA_CYCLE}; pass next_type explicitly (e.g. 6 to keep RoPE compression)")
            next_type = REMORA_CYCLE[self.mora_type]
        check_mora_type(where, "next_type", next_type)
        r_hat = _checked_r_hat(where, self.in_features, self.out_features, self.r, next_type)
        if r_hat != self.r_hat:
            raise ValueError(f"{where}: switching mora_type {self.mora_type} -> {next_type} changes r_hat from "
                             f"{self.r_hat} to {r_hat} for this {self.in_features}->{self.out_features} layer "
                             f"(type 6 floors r_hat to even), but M must keep its shape; choose another next_type")
        self.add_to_base_weight_(self.delta_weight())
        self.M.zero_()
        self.mora_type = next_type
        return next_type

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"r_hat={self.r_hat}, mora_type={self.mora_type}, dropout={self.dropout}, merged={self.merged}, "
                f"backend={self.backend_repr('mora')}")
