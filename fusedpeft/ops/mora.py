"""The mora op family: ``fusedpeft::mora_linear`` and its backward (docs/contract.md §3, §5).

    y = x @ W^T + bias + decompress(compress(dropout(x)) @ M^T)

Saved for backward: x, M and the seed. Gradients flow to x and M, never to W or bias.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedpeft.backends import (
    AUTO_ORDER,
    VERIFIED_ON_GPU,
    implementation,
    requested_backend,
    resolve_backend,
    unavailable_reason,
)
from fusedpeft.ops._common import (
    as_rows,
    cast_for_autocast,
    eager_twin,
    empty_result,
    maybe,
    no_autocast,
    rows_as,
    run,
    run_backward,
    save_weight,
    saved_weight,
)
from fusedpeft.core.mora import MoraGeometry
from fusedpeft.host.mora import delta_weight


def _mora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], M: Tensor, mora_type: int, dropout_p: float,
                   seed: Optional[Tensor], backend: str) -> Tensor:
    """x [..., K], weight [D, K], bias [D]?, M [R, R] -> y [..., D] in x's dtype (x keeps its shape
    across the op boundary, see ops._common.as_rows)."""
    with no_autocast(x.device.type):
        y = implementation("mora", backend).mora_forward(as_rows(x), weight, bias, M, mora_type, dropout_p, seed)
    return rows_as(y, (*x.shape[:-1], y.shape[-1]))


mora_linear_op = torch.library.custom_op("fusedpeft::mora_linear", _mora_linear, mutates_args=())


@mora_linear_op.register_fake
def _(x, weight, bias, M, mora_type, dropout_p, seed, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _mora_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, M: Tensor, mora_type: int, dropout_p: float,
                            seed: Optional[Tensor], need_x: bool, need_M: bool, backend: str) -> tuple[Tensor, Tensor]:
    """grad_y [..., D] -> (grad_x [..., K], grad_M [R, R]); an unneeded one is empty [0]."""
    with no_autocast(x.device.type):
        grad_x, grad_M = implementation("mora", backend).mora_backward(
            grad_y.reshape(-1, grad_y.shape[-1]), as_rows(x), weight, M, mora_type, dropout_p, seed, need_x, need_M)
    return (rows_as(grad_x, x.shape) if grad_x is not None else empty_result(x),
            grad_M if grad_M is not None else empty_result(x))


mora_linear_backward_op = torch.library.custom_op("fusedpeft::mora_linear_backward", _mora_linear_backward,
                                                  mutates_args=())


@mora_linear_backward_op.register_fake
def _(grad_y, x, weight, M, mora_type, dropout_p, seed, need_x, need_M, backend):
    return (torch.empty_like(x) if need_x else empty_result(x), torch.empty_like(M) if need_M else empty_result(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, M, mora_type, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, save_weight(ctx, weight), M, seed)
    ctx.mora_type, ctx.dropout_p, ctx.backend = mora_type, dropout_p, backend


def _backward(ctx, grad_y):
    x, weight, M, seed = ctx.saved_tensors
    weight = saved_weight(ctx, weight)
    need_x, _, _, need_M = ctx.needs_input_grad[:4]
    grad_x, grad_M = run_backward(ctx, mora_linear_backward_op, _mora_linear_backward, grad_y, x,
                                  weight, M, ctx.mora_type, ctx.dropout_p, seed, need_x, need_M, ctx.backend)
    return maybe(grad_x), None, None, maybe(grad_M), None, None, None, None


mora_linear_op.register_autograd(_backward, setup_context=_setup_context)
_MoRALinearEager = eager_twin(_mora_linear, _setup_context, _backward)


def mora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, M: Tensor, mora_type: int, dropout_p: float = 0.0,
                seed: Tensor | None = None, backend: str | None = None) -> Tensor:
    """x [..., K] -> [..., D]. Inputs are assumed validated (fusedpeft.fused.MoRALinear does it).

    Under torch.autocast, x, weight and bias are cast to the autocast dtype; M keeps its dtype.
    seed: 0-dim int64 CPU tensor, required when dropout_p > 0.
    """
    x, weight, bias = cast_for_autocast(x, weight, bias)
    name = resolve_backend("mora", backend, x.device)
    if name == "triton" and requested_backend(backend) is None and getattr(weight, "kind", None) == "8bit":
        # the Triton MoRA GEMMs fuse the branch into the base product, which an 8-bit base's layer
        # computes itself: the automatic choice takes the next backend instead
        name = next((b for b in AUTO_ORDER.get(x.device.type, ()) if b != "triton"
                     and (b != "cuda" or ("mora", b) in VERIFIED_ON_GPU)
                     and unavailable_reason(b, "mora", x.device) is None), "torch")
    return run(mora_linear_op, _MoRALinearEager, x, weight, bias, M, int(mora_type), float(dropout_p), seed, name)


@torch.no_grad()
def mora_delta_weight(M: Tensor, in_features: int, out_features: int, mora_type: int) -> Tensor:
    """ΔW [out_features, in_features] (fp32 for a 16-bit M) built from M in O(out x in); not
    differentiable (for merging and inspection; training goes through mora_linear)."""
    return delta_weight(M, MoraGeometry(in_features, out_features, M.shape[0], mora_type))
