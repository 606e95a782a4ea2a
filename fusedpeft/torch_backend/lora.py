"""LoRA on the PyTorch path: base GEMM plus rank-r update accumulated in place (addmm_).

Forward:  S = dropout(x) @ A^T  [N, r];  y = bias + scaling * S @ B^T, then y += x @ W^T as the
          base GEMM's own beta=1 accumulation (its read of y hides behind the GEMM's FLOPs,
          where a separate y += ... pass would cost a full read and write of y).
Backward: dS = scaling * dY @ B;  dB = scaling * dY^T @ S;  dA = dS^T @ dropout(x);
          dX = dropout'(dS @ A), then dX += dY @ W in the same way.
Saved between them: x, S and the seed; on CPU also the dropout mask (bool [N, K], a quarter of
an fp32 x: host.lora.stores_keep_mask), elsewhere the mask is regenerated block by block. No
dropped copy of x and no full-size temporary exists. x is never upcast: A and B (fp32 when the
base is 16-bit) are cast to x's dtype, and the matmuls accumulate in fp32 internally.
FLOPs beyond the base layer: forward 2 N r (K + D), backward 2 N r (2 D + 2 K).
"""

from __future__ import annotations

import torch

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.host.lora import add_base_input_grad_, expand_onto_base, lora_B_grad
from fusedpeft.quantized import dense_weight
from fusedpeft.torch_backend.dropout import dropped_blocks, kept_blocks


def lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed, keep_out=None):
    """x [N, K], weight [D, K], bias [D] | None, lora_A [r, K], lora_B [D, r] -> (y [N, D], S [N, r]).

    y and S have x's dtype; seed is a 0-dim int64 tensor (needed when dropout_p > 0). weight may
    be a fusedpeft.quantized.QuantizedWeight: dequantized here by bitsandbytes (4-bit), or no
    base product at all (8-bit, the layer adds bitsandbytes' own output). keep_out: bool [N, K]
    to receive the dropout mask for lora_backward's ``keep`` (host.lora.stores_keep_mask).
    """
    weight = dense_weight(weight, x.dtype)
    S = shrink(x, lora_A.to(x.dtype), dropout_p, seed, keep_out)
    return expand_onto_base(S, x, weight, bias, lora_B, scaling), S


def shrink(x, A, dropout_p: float, seed, keep_out=None) -> torch.Tensor:
    """S [N, r] = dropout(x) @ A^T, x [N, K] and A [r, K] in x's dtype; the mask block by block
    (also written into keep_out, bool [N, K], when given)."""
    if dropout_p == 0.0:
        return x @ A.t()
    S = x.new_empty(x.shape[0], A.shape[0])
    for rows, x_dropped in dropped_blocks(x, dropout_p, seed, keep_out=keep_out):
        torch.mm(x_dropped, A.t(), out=S[rows])
    return S


def lora_backward(grad_y, x, weight, lora_A, lora_B, S, scaling: float, dropout_p: float, seed,
                  need_x: bool, need_A: bool, need_B: bool, keep=None):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_A [r, K] | None, grad_B [D, r] | None).

    grad_A / grad_B come back in the adapters' dtypes, grad_x in x's dtype. A quantized weight is
    dequantized again here (it is never kept from the forward). keep: the forward's mask (bool
    [N, K], lora_forward's keep_out), else the mask is regenerated from the seed.
    """
    grad_y = grad_y.to(x.dtype)
    weight = dense_weight(weight, x.dtype) if need_x else None
    grad_B = lora_B_grad(S, grad_y, lora_B, scaling) if need_B else None
    if not (need_x or need_A):
        return None, None, grad_B
    grad_S = shrink_output_grad(grad_y, lora_B, scaling)
    grad_x, grad_A = shrink_grads(grad_S, x, lora_A.to(x.dtype), dropout_p, seed, [(grad_y, weight)], need_x, need_A,
                                  keep)
    return grad_x, None if grad_A is None else grad_A.to(lora_A.dtype), grad_B


def shrink_output_grad(grad_y, lora_B, scaling: float) -> torch.Tensor:
    """dS [N, r] = scaling * dY @ B in dY's dtype; grad_y [N, D], lora_B [D, r]."""
    return grad_y @ (lora_B * scaling).to(grad_y.dtype)


def shrink_grads(grad_S, x, A, dropout_p: float, seed, base_grads, need_x: bool, need_A: bool, keep=None):
    """Back through S = dropout(x) @ A^T and the base GEMMs that read x: grad_S [N, r], x [N, K],
    A [r, K] in x's dtype; base_grads: (dY [N, D_i], W [D_i, K] | None) per base layer reading x;
    keep: the forward's mask (bool [N, K]) or None to regenerate it from the seed.

    -> (grad_x [N, K] = dropout'(grad_S @ A) + sum_i dY_i @ W_i in x's dtype,
        grad_A [r, K] = grad_S^T @ dropout(x) in fp32 (fp64 for fp64 x)), each None unless needed.
    Without dropout the dY_i @ W_i accumulate onto grad_S @ A as the GEMMs' beta=1 accumulation;
    with dropout the masked grad_S @ A is written block by block first, then the dY_i @ W_i accumulate onto it.
    """
    acc_dtype = accumulation_dtype(x.dtype)
    if dropout_p == 0.0:
        grad_A = (grad_S.t() @ x).to(acc_dtype) if need_A else None
        grad_x = None
        if need_x:
            grad_x = grad_S @ A
            for grad_y, weight in base_grads:
                add_base_input_grad_(grad_x, grad_y, weight)
        return grad_x, grad_A
    grad_x = torch.empty_like(x) if need_x else None
    grad_A = torch.zeros(A.shape, dtype=acc_dtype, device=x.device) if need_A else None
    branch = (lambda rows: grad_S[rows] @ A) if need_x else None
    blocks = (dropped_blocks(x, dropout_p, seed, grad_x, branch) if keep is None
              else kept_blocks(x, keep, dropout_p, grad_x, lambda rows, out: torch.mm(grad_S[rows], A, out=out)))
    for rows, x_dropped in blocks:  # grad_x = dropout'(dS @ A)
        if need_A:
            grad_A += (grad_S[rows].t() @ x_dropped).to(acc_dtype)
    if need_x:
        for grad_y, weight in base_grads:
            add_base_input_grad_(grad_x, grad_y, weight)
    return grad_x, grad_A
