"""LoRA on the C++ kernels: shrink with in-kernel dropout, ATen GEMMs accumulating in place.

Same API as fusedpeft.torch_backend.lora.
Forward:  S = dropout(x) @ A^T (fusedpeft_C::lora_shrink, the docs/contract.md §5 mask generated per element
          in the kernel; plain ATen mm without dropout); y = bias + scaling * S @ B^T (one addmm
          writes y), then y += x @ W^T as the base GEMM's own beta = 1 accumulation (addmm_).
Backward: dS = scaling * dY @ B and dB = scaling * S^T dY (on CPU from one blocked pass over dY,
          fusedpeft_C::lora_expand_backward; by ATen on CUDA); with dropout, one kernel
          pass (fusedpeft_C::lora_shrink_backward) gives dropout'(dS @ A) and dS^T @ dropout(x)
          from a single mask generation; dX = that + dY @ W, again accumulated by addmm_.
Saved between them: x, S and the seed (no mask, no dropped copy of x).
"""

from __future__ import annotations

import torch

import fusedpeft._C  # noqa: F401  (registers torch.ops.fusedpeft_C)
from fusedpeft.cpp_backend import seed_value, unavailable_reason  # noqa: F401  (read by fusedpeft.backends)
from fusedpeft.cpp_backend.dequant import dequantize_4bit
from fusedpeft.host.lora import add_base_input_grad_, expand_onto_base, lora_B_grad
from fusedpeft.quantized import dense_weight

_ops = torch.ops.fusedpeft_C


def lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """x [N, K], weight [D, K], bias [D] | None, lora_A [r, K], lora_B [D, r] -> (y [N, D], S [N, r]).

    y and S have x's dtype; seed is a 0-dim int64 tensor (needed when dropout_p > 0). A quantized
    weight is dequantized by fusedpeft_C::dequantize_4bit (see fusedpeft.quantized).
    """
    weight = dense_weight(weight, x.dtype, dequantize_4bit)
    if dropout_p > 0.0:
        S = _ops.lora_shrink(x, lora_A, dropout_p, seed_value(seed, dropout_p))
    else:
        S = x @ lora_A.to(x.dtype).t()
    return expand_onto_base(S, x, weight, bias, lora_B, scaling), S


def lora_backward(grad_y, x, weight, lora_A, lora_B, S, scaling: float, dropout_p: float, seed,
                  need_x: bool, need_A: bool, need_B: bool):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_A [r, K] | None, grad_B [D, r] | None).

    grad_A / grad_B come back in the adapters' dtypes, grad_x in x's dtype.
    """
    grad_y = grad_y.to(x.dtype)
    weight = dense_weight(weight, x.dtype, dequantize_4bit) if need_x else None
    if need_B and (need_x or need_A) and grad_y.device.type == "cpu":
        grad_S, grad_B = _ops.lora_expand_backward(grad_y, S, lora_B, scaling)  # one pass over grad_y
        grad_S, grad_B = grad_S.to(x.dtype), grad_B.to(lora_B.dtype)
    else:
        grad_S = grad_y @ (lora_B * scaling).to(x.dtype) if (need_x or need_A) else None
        grad_B = lora_B_grad(S, grad_y, lora_B, scaling) if need_B else None
    grad_x = grad_A = None
    if dropout_p > 0.0:
        if need_x or need_A:
            grad_x, grad_A = _ops.lora_shrink_backward(x, grad_S, lora_A, dropout_p, seed_value(seed, dropout_p),
                                                       need_x, need_A)
            grad_x = add_base_input_grad_(grad_x, grad_y, weight) if need_x else None
            grad_A = grad_A.to(lora_A.dtype) if need_A else None
    else:
        A = lora_A.to(x.dtype)
        if need_A:
            grad_A = (grad_S.t() @ x).to(lora_A.dtype)
        if need_x:
            grad_x = add_base_input_grad_(grad_S @ A, grad_y, weight)
    return grad_x, grad_A, grad_B
