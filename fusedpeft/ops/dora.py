"""The dora op family: ``fusedpeft::dora_linear`` and its backward, behind one schema per backend.

    g = m / n,  n_i = ||W_i + s (B A)_i||_2 (detached, factored: no [D, K] tensor)    (docs/contract.md §8)
    y = base(x) + (g - 1) * (x' W^T) + g * s * x' A^T B^T,  x' = dropout(x)           (docs/contract.md §5)

The op takes g [D] as a differentiable input and returns grad_g; ``dora_linear`` below computes n
and g = magnitude / n with autograd, so grad_magnitude = grad_g / n flows through torch itself.
Saved for backward: x, S = x' A^T [N, r], the seed and, for grad_g, the output y (dropout 0: y -
bias = g * u, see fusedpeft/torch_backend/dora.py for the count of the options) or
V = x' W^T [N, D] (dropout > 0). Gradients flow to x, A, B and g, never to W or bias.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedpeft.backends import implementation, resolve_backend
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
from fusedpeft.host.dora import weight_norm, weight_sq_norm

__all__ = ["dora_linear", "weight_norm", "weight_sq_norm"]


def _dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, g: Tensor,
                 scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """x [..., K], weight [D, K], bias [D]?, lora_A [r, K], lora_B [D, r], g [D] ->
    (y [..., D], S [N, r], V [N, D] when dropout_p > 0 else empty [0])."""
    with no_autocast(x.device.type):
        y, S, V = implementation("dora", backend).dora_forward(as_rows(x), weight, bias, lora_A, lora_B, g, scaling,
                                                               dropout_p, seed)
    return rows_as(y, (*x.shape[:-1], y.shape[-1])), S, V


dora_linear_op = torch.library.custom_op("fusedpeft::dora_linear", _dora_linear, mutates_args=())


@dora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, backend):
    n = x.numel() // x.shape[-1]
    return (x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(n, lora_A.shape[0]),
            x.new_empty(n, weight.shape[0]) if dropout_p > 0.0 else x.new_empty(0))


def _dora_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                          lora_B: Tensor, g: Tensor, saved: Tensor, S: Tensor, scaling: float, dropout_p: float,
                          seed: Optional[Tensor], need_x: bool, need_A: bool, need_B: bool, need_g: bool,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_y [..., D] -> (grad_x [..., K], grad_A [r, K], grad_B [D, r], grad_g [D]); an unneeded one
    is empty [0]. saved: the output y [..., D] (dropout 0) or V [N, D]."""
    with no_autocast(x.device.type):
        grads = implementation("dora", backend).dora_backward(
            grad_y.reshape(-1, grad_y.shape[-1]), as_rows(x), weight, bias, lora_A, lora_B, g,
            saved.reshape(-1, saved.shape[-1]), S, scaling, dropout_p, seed, need_x, need_A, need_B, need_g)
    grad_x = rows_as(grads[0], x.shape) if grads[0] is not None else None
    return tuple(t if t is not None else empty_result(x) for t in (grad_x, *grads[1:]))


dora_linear_backward_op = torch.library.custom_op("fusedpeft::dora_linear_backward", _dora_linear_backward,
                                                  mutates_args=())


@dora_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, lora_A, lora_B, g, saved, S, scaling, dropout_p, seed, need_x, need_A, need_B, need_g,
      backend):
    return tuple(torch.empty_like(t) if need else empty_result(x)
                 for t, need in ((x, need_x), (lora_A, need_A), (lora_B, need_B), (g, need_g)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, backend = inputs
    y, S, V = output
    ctx.save_for_backward(x, save_weight(ctx, weight), bias, lora_A, lora_B, g, V if dropout_p > 0.0 else y, S, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(S, V)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_S, grad_V):
    x, weight, bias, lora_A, lora_B, g, saved, S, seed = ctx.saved_tensors
    weight = saved_weight(ctx, weight)
    if grad_y is None:
        return (None,) * 10
    need_x, _, _, need_A, need_B, need_g = ctx.needs_input_grad[:6]
    grad_x, grad_A, grad_B, grad_g = run_backward(
        ctx, dora_linear_backward_op, _dora_linear_backward, grad_y, x, weight, bias, lora_A, lora_B, g, saved, S,
        ctx.scaling, ctx.dropout_p, seed, need_x, need_A, need_B, need_g, ctx.backend)
    return maybe(grad_x), None, None, maybe(grad_A), maybe(grad_B), maybe(grad_g), None, None, None, None


dora_linear_op.register_autograd(_backward, setup_context=_setup_context)
_DoRALinearEager = eager_twin(_dora_linear, _setup_context, _backward)


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: float, dropout_p: float = 0.0, seed: Tensor | None = None, backend: str | None = None,
                weight_sq: Tensor | None = None, base_output: Tensor | None = None) -> Tensor:
    """x [..., K] -> [..., D]; magnitude [D] (the learned m). Inputs are assumed validated.

    n is computed from the base weight as given (before any autocast cast), from ``weight_sq``
    = ||W_i||^2 [D] when the caller caches it, in fp32 (fp64 for fp64 W); g = magnitude / n in
    the magnitude's dtype. Under torch.autocast x, weight and bias are cast as nn.Linear's would
    be. seed: 0-dim int64 CPU tensor, required when dropout_p > 0.

    weight may be a fusedpeft.quantized.QuantizedWeight (docs/contract.md §7): n then reads the
    dequantized W a row block at a time. An 8-bit base's product is bitsandbytes' own output
    ``base_output`` = base(x) [..., D] (bias included; ``bias`` is the base layer's), as in PEFT:
    p = 0: y = bias + g (base_output - bias) + g s x A^T B^T; p > 0: y = base_output + (g - 1)
    x' W^T + g s x' A^T B^T with W the int8 rows times their scales. y is then in
    base_output's dtype.
    """
    n = weight_norm(weight, lora_A, lora_B, scaling, weight_sq)
    g = magnitude / n.to(magnitude.dtype)
    x, weight, bias = cast_for_autocast(x, weight, bias)
    name = resolve_backend("dora", backend, x.device)
    y, _, _ = run(dora_linear_op, _DoRALinearEager, x, weight, bias if base_output is None else None, lora_A,
                  lora_B, g, float(scaling), float(dropout_p), seed, name)
    if base_output is None:
        return y
    if dropout_p > 0.0:
        return (base_output + y).to(base_output.dtype)
    unbiased = base_output if bias is None else base_output - bias
    y = torch.addcmul(y, unbiased.to(y.dtype), g.to(y.dtype))
    return (y if bias is None else y + bias.to(y.dtype)).to(base_output.dtype)
