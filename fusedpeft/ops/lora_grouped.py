"""The grouped lora op: ``fusedpeft::lora_linear_grouped`` and its backward.

G LoRA layers that read the same x (q/k/v, gate/up):

    y_i = x @ W_i^T + bias_i + scaling_i * dropout(x) @ A_i^T @ B_i^T      i = 0 .. G-1

with ONE dropout mask (one seed) shared by the group, so the shrink for every adapter is one pass
over x, and so is dA in backward. With dropout 0 the results equal G separate lora_linear calls.
Saved for backward: x, S = dropout(x) @ [A_0; ...]^T [N, sum r_i] and the seed.

Backends: a lora backend module that defines ``lora_grouped_forward`` / ``lora_grouped_backward``
(the triton one does), or the module named in GROUPED_IMPLEMENTATIONS ("torch"). A backend asked
for by name without either raises RuntimeError; the automatic choice is the automatic lora
backend when it has one, else "torch".

Optional biases travel as ``Tensor[]`` with an empty [0] tensor for "no bias": a ``Tensor?[]``
holding None changes the pytree structure autograd expects back from the backward.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from fusedpeft.backends import implementation, requested_backend, resolve_backend
from fusedpeft.ops._common import (
    as_rows,
    autocast_dtype,
    eager_twin,
    empty_result,
    maybe,
    no_autocast,
    run,
    run_backward,
)

GROUPED_IMPLEMENTATIONS = {"torch": "fusedpeft.torch_backend.lora_grouped"}


def grouped_implementation(backend: str):
    """The module with lora_grouped_forward / lora_grouped_backward for ``backend``, or None."""
    if backend in GROUPED_IMPLEMENTATIONS:
        return importlib.import_module(GROUPED_IMPLEMENTATIONS[backend])
    module = implementation("lora", backend)
    return module if hasattr(module, "lora_grouped_forward") else None


@torch.compiler.assume_constant_result  # run once at trace time: importlib cannot be traced
def resolve_grouped_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs the grouped op on ``device``: the one asked for (RuntimeError if it
    has no grouped implementation), else the automatic lora backend if it has one, else "torch"."""
    name = requested_backend(backend)
    resolved = resolve_backend("lora", name, device)
    if grouped_implementation(resolved) is not None:
        return resolved
    if name is not None:
        raise RuntimeError(f"backend {name!r} has no grouped LoRA implementation; use backend='triton' or "
                           f"'torch' (or None for automatic)")
    return "torch"


def _lora_linear_grouped(x: Tensor, weights: list[Tensor], biases: list[Tensor], lora_As: list[Tensor],
                         lora_Bs: list[Tensor], scalings: list[float], dropout_p: float, seed: Optional[Tensor],
                         backend: str) -> list[Tensor]:
    """x [N, K]; weights[i] [D_i, K]; biases[i] [D_i] or empty [0] for none; lora_As[i] [r_i, K];
    lora_Bs[i] [D_i, r_i] -> [y_0 [N, D_0], ..., y_{G-1}, S [N, sum r_i]] (x's dtype).

    A missing bias travels as an empty tensor: a Tensor?[] argument holding None changes the
    pytree structure autograd expects back from the backward."""
    with no_autocast(x.device.type):
        ys, S = grouped_implementation(backend).lora_grouped_forward(x, weights, [maybe(b) for b in biases], lora_As,
                                                                     lora_Bs, scalings, dropout_p, seed)
    return [*ys, S]


lora_linear_grouped_op = torch.library.custom_op("fusedpeft::lora_linear_grouped", _lora_linear_grouped,
                                                 mutates_args=())


@lora_linear_grouped_op.register_fake
def _(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p, seed, backend):
    rank = sum(A.shape[0] for A in lora_As)
    return [*(x.new_empty(x.shape[0], w.shape[0]) for w in weights), x.new_empty(x.shape[0], rank)]


def _lora_linear_grouped_backward(grad_ys: list[Optional[Tensor]], x: Tensor, weights: list[Tensor],
                                  lora_As: list[Tensor], lora_Bs: list[Tensor], S: Tensor, scalings: list[float],
                                  dropout_p: float, seed: Optional[Tensor], need_x: bool, need_A: bool, need_B: bool,
                                  backend: str) -> list[Tensor]:
    """-> [grad_x [N, K], grad_A_0 .. grad_A_{G-1}, grad_B_0 .. grad_B_{G-1}]; unneeded ones empty [0]."""
    with no_autocast(x.device.type):
        grad_x, grad_As, grad_Bs = grouped_implementation(backend).lora_grouped_backward(
            grad_ys, x, weights, lora_As, lora_Bs, S, scalings, dropout_p, seed, need_x, need_A, need_B)
    G = len(weights)
    grad_As = grad_As if grad_As is not None else [None] * G
    grad_Bs = grad_Bs if grad_Bs is not None else [None] * G
    return [g if g is not None else empty_result(x) for g in (grad_x, *grad_As, *grad_Bs)]


lora_linear_grouped_backward_op = torch.library.custom_op("fusedpeft::lora_linear_grouped_backward",
                                                          _lora_linear_grouped_backward, mutates_args=())


@lora_linear_grouped_backward_op.register_fake
def _(grad_ys, x, weights, lora_As, lora_Bs, S, scalings, dropout_p, seed, need_x, need_A, need_B, backend):
    return [torch.empty_like(x) if need_x else empty_result(x),
            *(torch.empty_like(A) if need_A else empty_result(x) for A in lora_As),
            *(torch.empty_like(B) if need_B else empty_result(x) for B in lora_Bs)]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_As, lora_Bs, scalings, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, output[-1], seed, *weights, *lora_As, *lora_Bs)
    ctx.G, ctx.scalings, ctx.dropout_p, ctx.backend = len(weights), scalings, dropout_p, backend
    ctx.mark_non_differentiable(output[-1])
    ctx.set_materialize_grads(False)


def _unpack(ctx):
    x, S, seed, *params = ctx.saved_tensors
    G = ctx.G
    return x, S, seed, params[:G], params[G:2 * G], params[2 * G:]


def _any(flags) -> bool:
    """needs_input_grad of a Tensor[] input: one flag or one per tensor."""
    return bool(flags) if isinstance(flags, bool) else any(flags)


def _backward(ctx, grads):
    x, S, seed, weights, lora_As, lora_Bs = _unpack(ctx)
    need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
    need_A, need_B = _any(need_A), _any(need_B)
    G = ctx.G
    grad_ys = list(grads[:G])
    nothing = [None] * G  # list inputs take a list of gradients
    if all(g is None for g in grad_ys):
        return None, nothing, nothing, nothing, nothing, None, None, None, None
    out = run_backward(ctx, lora_linear_grouped_backward_op, _lora_linear_grouped_backward, grad_ys, x, weights,
                       lora_As, lora_Bs, S, ctx.scalings, ctx.dropout_p, seed, need_x, need_A, need_B, ctx.backend)
    return (maybe(out[0]), nothing, nothing, [maybe(g) for g in out[1:G + 1]], [maybe(g) for g in out[G + 1:]],
            None, None, None, None)


lora_linear_grouped_op.register_autograd(_backward, setup_context=_setup_context)


# the twin outside torch.compile (ops._common.eager_twin); lora_As and lora_Bs (arguments 3, 4) take gradients
_LoRALinearGroupedEager = eager_twin(_lora_linear_grouped, _setup_context, _backward, tensor_lists=(3, 4))


def lora_linear_grouped(x: Tensor, weights, biases, lora_As, lora_Bs, scalings, dropout_p: float = 0.0,
                        seed: Tensor | None = None, backend: str | None = None) -> list[Tensor]:
    """x [..., K] -> [y_i [..., D_i] for each layer]. Inputs are assumed validated
    (fusedpeft.fused.lora_grouped does it).

    weights[i] [D_i, K]; biases[i] [D_i] | None; lora_As[i] [r_i, K]; lora_Bs[i] [D_i, r_i];
    scalings[i] float; seed: 0-dim int64 CPU tensor, required when dropout_p > 0 (one mask for the
    whole group). Under torch.autocast x, weights and biases are cast to the autocast dtype."""
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x = x.to(cast)
        weights = [w.to(cast) for w in weights]
        biases = [None if b is None else b.to(cast) for b in biases]
    name = resolve_grouped_backend(backend, x.device)
    weights, biases, lora_As, lora_Bs = list(weights), list(biases), list(lora_As), list(lora_Bs)
    scalings = [float(s) for s in scalings]
    rows = as_rows(x)
    biases = [b if b is not None else empty_result(rows) for b in biases]
    out = run(lora_linear_grouped_op, _LoRALinearGroupedEager, rows, weights, biases, lora_As, lora_Bs, scalings,
              float(dropout_p), seed, name)
    return [y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(out[:-1], weights)]
