"""The lora op family: ``fusedpeft::lora_linear`` and its backward, behind one schema per backend.

    y = x @ W^T + bias + scaling * dropout(x) @ A^T @ B^T           (docs/contract.md §2, §5)

Saved for backward: x, S = dropout(x) @ A^T [N, r] and the seed (plus the dropout mask, bool
[N, K], where host.lora.stores_keep_mask says so: the torch backend on CPU); never a dropped
copy of x nor anything of size N x out_features. Gradients flow to x, A and B, never to W or bias.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedpeft.backends import implementation, resolve_backend
from fusedpeft.host.lora import stores_keep_mask
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


def _keep_shape(x: Tensor, dropout_p: float, backend: str) -> tuple[int, ...]:
    """The saved dropout mask's shape: [N, K] where host.lora.stores_keep_mask says so, else [0]."""
    if stores_keep_mask(backend, dropout_p, x.device):
        return (x.numel() // x.shape[-1], x.shape[-1])
    return (0,)


def _lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """x [..., K], weight [D, K], bias [D]?, lora_A [r, K], lora_B [D, r] -> (y [..., D], S [N, r],
    keep: the dropout mask bool [N, K] where the backend saves it (host.lora.stores_keep_mask), else [0]).

    N = rows of x; x keeps its shape across the op boundary (see ops._common.as_rows)."""
    keep = torch.empty(_keep_shape(x, dropout_p, backend), dtype=torch.bool, device=x.device)
    extra = {"keep_out": keep} if keep.numel() else {}  # only the torch backend takes it
    with no_autocast(x.device.type):
        y, S = implementation("lora", backend).lora_forward(as_rows(x), weight, bias, lora_A, lora_B, scaling,
                                                            dropout_p, seed, **extra)
    return rows_as(y, (*x.shape[:-1], y.shape[-1])), S, keep


lora_linear_op = torch.library.custom_op("fusedpeft::lora_linear", _lora_linear, mutates_args=())


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return (x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(x.numel() // x.shape[-1], lora_A.shape[0]),
            x.new_empty(_keep_shape(x, dropout_p, backend), dtype=torch.bool))


def _lora_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor,
                            keep: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor], need_x: bool,
                            need_A: bool, need_B: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """grad_y [..., D] -> (grad_x [..., K], grad_A [r, K], grad_B [D, r]); an unneeded one is empty [0].
    keep: the forward's third output."""
    extra = {"keep": keep} if keep.numel() else {}
    with no_autocast(x.device.type):
        grad_x, grad_A, grad_B = implementation("lora", backend).lora_backward(
            grad_y.reshape(-1, grad_y.shape[-1]), as_rows(x), weight, lora_A, lora_B, S, scaling, dropout_p, seed,
            need_x, need_A, need_B, **extra)
    grad_x = rows_as(grad_x, x.shape) if grad_x is not None else None
    return tuple(g if g is not None else empty_result(x) for g in (grad_x, grad_A, grad_B))


lora_linear_backward_op = torch.library.custom_op("fusedpeft::lora_linear_backward", _lora_linear_backward,
                                                  mutates_args=())


@lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, S, keep, scaling, dropout_p, seed, need_x, need_A, need_B, backend):
    return (torch.empty_like(x) if need_x else empty_result(x),
            torch.empty_like(lora_A) if need_A else empty_result(x),
            torch.empty_like(lora_B) if need_B else empty_result(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, S, keep = output
    ctx.save_for_backward(x, save_weight(ctx, weight), lora_A, lora_B, S, keep, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(S, keep)
    ctx.set_materialize_grads(False)  # S and keep never get a gradient: do not allocate zeros for them


def _backward(ctx, grad_y, grad_S, grad_keep):
    x, weight, lora_A, lora_B, S, keep, seed = ctx.saved_tensors
    weight = saved_weight(ctx, weight)
    if grad_y is None:
        return None, None, None, None, None, None, None, None, None
    need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
    grad_x, grad_A, grad_B = run_backward(ctx, lora_linear_backward_op, _lora_linear_backward, grad_y, x, weight,
                                          lora_A, lora_B, S, keep, ctx.scaling, ctx.dropout_p, seed, need_x, need_A,
                                          need_B, ctx.backend)
    return maybe(grad_x), None, None, maybe(grad_A), maybe(grad_B), None, None, None, None


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)
_LoRALinearEager = eager_twin(_lora_linear, _setup_context, _backward)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
                dropout_p: float = 0.0, seed: Tensor | None = None, backend: str | None = None) -> Tensor:
    """x [..., K] -> [..., D]. Inputs are assumed validated (the layers in fusedpeft.fused do it).

    Under torch.autocast, x, weight and bias are cast to the autocast dtype (as nn.Linear would
    be); lora_A / lora_B stay in their own dtype and are cast tile-wise inside the backend.
    seed: 0-dim int64 CPU tensor, required when dropout_p > 0.
    """
    x, weight, bias = cast_for_autocast(x, weight, bias)
    name = resolve_backend("lora", backend, x.device)
    y, _, _ = run(lora_linear_op, _LoRALinearEager, x, weight, bias, lora_A, lora_B, float(scaling),
                  float(dropout_p), seed, name)
    return y
