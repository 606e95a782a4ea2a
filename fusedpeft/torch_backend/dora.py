"""DoRA on the PyTorch path (PEFT's use_dora=True), reusing the LoRA path's pieces.

With g = m / n [D] (n detached, computed by ``weight_norm`` below without any [D, K] tensor):

  p = 0:  y = g * (x W^T + s S B^T) + bias,  S = x A^T [N, r]
          (LoRA's expand_onto_base gives u = x W^T + s S B^T in y's buffer; one in-place pass
          scales it by g and adds the bias.)
          "merged" (fp32 / fp64, a dense W, N >= max(64, K / 2) rows): y = x W''^T + bias and
          dX = dY W'' with W'' = g (W + s B A) [D, K] (host/dora.py merged_strategy: built in
          forward, rebuilt in backward, never saved), exactly the base layer's GEMMs.
  p > 0:  y = x W^T + bias + (g - 1) * V + g s S' B^T,  S' = x' A^T, V = x' W^T, x' = dropout(x)
          (PEFT's formula: the middle term uses the dropped-out x, a second GEMM over x.)

Backward (dY [N, D]):
  dS = dY (s g B) [N, r];  dB = s g * (dY^T S) [D, r];  dA = dS^T x';
  p = 0:  dX = (dY * g) W + dS A,  row block by row block (no [N, D] temporary);
  p > 0:  dX = dY W + dropout'((dY * (g - 1)) W + dS A);
  dg_i = sum_t dY_ti u_ti with u the unscaled update: p > 0: colsum(dY * V) + s rowsum(B * (dY^T S')),
          p = 0: colsum(dY * (Y - bias)) / g (u recovered from the output Y; columns with g = 0,
          where Y carries no u, recompute u from x, W and S).

What is saved for dg, counted (N tokens, D outputs, K inputs; fp32, N = 2048, D = K = 1024):
  - recompute u = x W^T + s S B^T in backward: one more N x D x K GEMM, +50% of the frozen base's
    forward + backward FLOPs (4 N D K);
  - save u: one more [N, D] tensor alive from forward to backward (+8 MiB here, 1.5x the frozen
    layer's peak extra memory), and one elementwise pass;
  - save the output Y (p = 0, chosen): Y - bias = g * u, so u costs nothing to keep (Y is the
    op's own output, kept by autograd like tanh's) and one fused pass over (dY, Y) in backward.
    Its cost: Y must not be modified in place before backward (autograd raises if it is).
  - p > 0 (chosen: save V = x' W^T): the forward computes V anyway; recomputing it would take a
    GEMM plus the mask again, saving it costs one [N, D] tensor.
Accumulations (norm, dg, dA) are fp32, fp64 for fp64 inputs.
"""

from __future__ import annotations

import torch

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.host.dora import (
    BLOCK_ELEMENTS,
    dora_weights,
    expand_grads,
    forward_no_dropout,
    grad_B_from,
    magnitude_grad_from_sums,
    magnitude_grad_with_dropout,
    merged_strategy,
    merged_weight,
    row_blocks,
)
from fusedpeft.host.lora import add_base_input_grad_, expand_onto_base
from fusedpeft.torch_backend.dropout import dropped_blocks

# the forward / backward (the backend API of fusedpeft.ops.dora); the weight norm and the pieces
# the cpu and triton backends share are in fusedpeft/host/dora.py


def dora_forward(x, weight, bias, lora_A, lora_B, g, scaling: float, dropout_p: float, seed):
    """x [N, K], weight [D, K], bias [D] | None, lora_A [r, K], lora_B [D, r], g [D] (m / n) ->
    (y [N, D], S [N, r], V [N, D] when dropout_p > 0 else an empty [0]), all in x's dtype.
    weight may be a fusedpeft.quantized.QuantizedWeight (see host/dora.py dora_weights)."""
    weight, v_weight = dora_weights(weight, x.dtype, dropout_p)
    if dropout_p == 0.0:
        return forward_no_dropout(x, weight, bias, lora_A, lora_B, g, scaling)
    A = lora_A.to(x.dtype)
    S = x.new_empty(x.shape[0], A.shape[0])
    V = x.new_empty(x.shape[0], v_weight.shape[0])
    for rows, x_dropped in dropped_blocks(x, dropout_p, seed):
        torch.mm(x_dropped, A.t(), out=S[rows])
        torch.mm(x_dropped, v_weight.t(), out=V[rows])
    y = expand_onto_base(S, x, weight, bias, lora_B * g[:, None], scaling)
    return y.addcmul_(V, g - 1), S, V


def backward_no_dropout(dy, x, weight, bias, lora_A, lora_B, g, out, S, dS, scaling: float, need_x: bool,
                        need_A: bool, need_g: bool):
    """The p = 0 rest of the backward given dS: (grad_x, grad_A, grad_g).

    Row block by row block, through one reused scratch block: dX = (dY * g) W + dS A, and
    colsum(dY * Y); then num = colsum(dY * (Y - bias)) = colsum(dY * Y) - bias * colsum(dY). Few,
    large blocks: every elementwise op is one parallel region, and on a busy CPU each region can
    cost a scheduler time slice; fresh large allocations cost page faults, hence the reuse."""
    grad_A = (dS.t() @ x).to(lora_A.dtype) if need_A else None
    grad_x = torch.empty_like(x) if need_x else None
    acc = accumulation_dtype(x.dtype)
    num = torch.zeros(dy.shape[1], dtype=acc, device=dy.device) if need_g else None
    A = lora_A.to(x.dtype)
    gx = g.to(x.dtype)
    step = max(1, BLOCK_ELEMENTS // max(1, dy.shape[1]))
    scratch = dy.new_empty(min(step, dy.shape[0]), dy.shape[1])
    for rows in row_blocks(*dy.shape):
        dyb, buf = dy[rows], scratch[: rows.stop - rows.start]
        if need_x and weight is None:  # 8-bit base: its part of dX flows through bitsandbytes' own layer
            torch.mm(dS[rows], A, out=grad_x[rows])
        elif need_x:
            torch.mm(torch.mul(dyb, gx, out=buf), weight, out=grad_x[rows]).addmm_(dS[rows], A)
        if need_g:
            if acc == dy.dtype:
                num += torch.mul(dyb, out[rows], out=buf).sum(0)
            else:  # 16-bit: products and sums in fp32
                num += (dyb.to(acc) * out[rows].to(acc)).sum(0)
    grad_g = None
    if need_g:
        if bias is not None:
            num -= bias.to(acc) * dy.sum(0, dtype=acc)
        grad_g = magnitude_grad_from_sums(num, dy, x, weight, lora_B, g, S, scaling).to(g.dtype)
    return grad_x, grad_A, grad_g


def dora_backward(grad_y, x, weight, bias, lora_A, lora_B, g, saved, S, scaling: float, dropout_p: float, seed,
                  need_x: bool, need_A: bool, need_B: bool, need_g: bool):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_A [r, K] | None, grad_B [D, r] | None, grad_g [D] | None).

    saved: the output Y [N, D] when dropout_p == 0, V = x' W^T [N, D] otherwise. grad_x in x's
    dtype, grad_A / grad_B / grad_g in lora_A's / lora_B's / g's dtypes. weight may be a
    fusedpeft.quantized.QuantizedWeight (dequantized again here, see host/dora.py dora_weights)."""
    dy = grad_y.to(x.dtype)
    v_weight = None
    if need_x:  # else weight stays as given: only zero-magnitude columns of dg read it
        weight, v_weight = dora_weights(weight, x.dtype, dropout_p)
    need_S = need_x or need_A
    dS, sdyS = expand_grads(dy, S, lora_B, g, scaling, need_S, need_B or (need_g and dropout_p > 0.0))
    grad_B = grad_B_from(sdyS, lora_B, g) if need_B else None
    if dropout_p == 0.0:
        merged = need_x and merged_strategy(x, weight, 0.0)
        grad_x, grad_A, grad_g = backward_no_dropout(dy, x, weight, bias, lora_A, lora_B, g, saved, S, dS, scaling,
                                                     need_x and not merged, need_A, need_g)
        if merged:
            grad_x = dy @ merged_weight(weight, lora_A, lora_B, g, scaling)
        return grad_x, grad_A, grad_B, grad_g
    grad_g = magnitude_grad_with_dropout(dy, saved, lora_B, sdyS, g) if need_g else None
    grad_x = torch.empty_like(x) if need_x else None
    A = lora_A.to(x.dtype)
    acc = accumulation_dtype(x.dtype)
    grad_A_acc = torch.zeros(A.shape, dtype=acc, device=x.device) if need_A else None
    if need_S:
        g1 = (g - 1).to(x.dtype)
        branch = (lambda rows: ((dy[rows] * g1) @ v_weight).addmm_(dS[rows], A)) if need_x else None
        for rows, x_dropped in dropped_blocks(x, dropout_p, seed, grad_x, branch):  # grad_x = dropout'(branch)
            if need_A:
                grad_A_acc += (dS[rows].t() @ x_dropped).to(acc)
    if need_x:
        add_base_input_grad_(grad_x, dy, weight)
    grad_A = grad_A_acc.to(lora_A.dtype) if need_A else None
    return grad_x, grad_A, grad_B, grad_g
