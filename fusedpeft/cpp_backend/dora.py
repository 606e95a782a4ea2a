"""DoRA on the C++ kernels: LoRA's shrink kernels (in-kernel docs/contract.md §5 dropout) and ATen GEMMs.

Same API and formulas as fusedpeft.torch_backend.dora (see there for what is saved and why).
Forward:  p = 0: as the torch path (plain ATen GEMMs, one in-place pass y = g * u + bias; or its
          "merged" form y = x W''^T + bias, W'' = g (W + s B A), in fp32 / fp64 with enough rows,
          W'' built by fusedpeft_C::dora_merged_weight in one pass over W on CPU).
          p > 0: S' = dropout(x) A^T and V = dropout(x) W^T by fusedpeft_C::lora_shrink (the
          mask generated in the kernel, block by block; no dropped copy of x), then
          y = x W^T + bias + (g - 1) * V + g s S' B^T.
Backward: p = 0: everything (dX, dA, dB and colsum(dY * Y) for dg) by fusedpeft_C::dora_backward_p0:
          on CPU one parallel pass over dY and Y, row blocks at a time (csrc/cpu/dora.cpp); on
          CUDA one kernel pass gives dY * g and colsum(dY * Y) (csrc/cuda/dora.cu), cuBLAS the rest;
          in the "merged" form (fp32 / fp64, enough rows) the kernel skips dX, which is one GEMM
          dY W'' (the kernel's per-block dX GEMMs measured ~1.5x one big GEMM), and in fp32 on
          AVX-512 does the rank-r products in its own loop (csrc/cpu/dora_rows.cpp);
          p > 0: dS = s dY (g B) and s dY^T S from one blocked pass over dY on CPU
          (fusedpeft_C::lora_expand_backward, with g B in place of B; ATen GEMMs on CUDA);
          p > 0: fusedpeft_C::lora_shrink_backward gives dropout'(dS A) with dA = dS^T dropout(x),
          and dropout'((dY * (g - 1)) W), both from the mask regenerated in the kernel; dX adds dY W.
On CUDA with dropout both directions are the torch backend's (called through
fusedpeft.backends.implementation: the mask a row block at a time, cuBLAS GEMMs): the shrink
kernels are built for a rank-r output, and V = x' W^T has D outputs (their shared-memory row of
r accumulators would not fit). An 8-bit base (no base product in the op) takes the torch
backend's backward likewise.
"""

from __future__ import annotations

import torch

import fusedpeft._C  # noqa: F401  (registers torch.ops.fusedpeft_C)
from fusedpeft.backends import implementation
from fusedpeft.cpp_backend import has_kernel, seed_value
from fusedpeft.cpp_backend import unavailable_reason as _extension_unavailable
from fusedpeft.cpp_backend.dequant import dequantize_4bit
from fusedpeft.host.dora import (
    dora_weights,
    expand_grads,
    forward_no_dropout,
    grad_B_from,
    magnitude_grad_from_sums,
    magnitude_grad_with_dropout,
    merged_strategy,
    merged_weight,
)
from fusedpeft.host.lora import expand_onto_base

_ops = torch.ops.fusedpeft_C


# the kernels each device needs (dora_merged_weight is CPU-only: CUDA builds W'' with ATen)
_KERNELS = {"CPU": ("dora_backward_p0", "dora_merged_weight"), "CUDA": ("dora_backward_p0",)}


def unavailable_reason(device: torch.device) -> str | None:
    """As the extension's, plus: the extension must hold the DoRA kernels for the device (built from
    this csrc/, with the CUDA sources for the cuda backend)."""
    reason = _extension_unavailable(device)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if reason is not None or key is None:
        return reason
    for name in _KERNELS[key]:
        if not has_kernel(name, key):
            return (f"fusedpeft._C has no {key} {name} kernel: it was built from older sources"
                    + (" or without its CUDA sources (FUSEDPEFT_SKIP_CUDA=1)" if key == "CUDA" else "")
                    + "; rebuild it")
    return None


def _merged_weight(weight, lora_A, lora_B, g, scaling: float) -> torch.Tensor:
    """host.dora.merged_weight, on CPU by fusedpeft_C::dora_merged_weight (one pass over W)."""
    if weight.device.type == "cpu":
        return _ops.dora_merged_weight(weight, lora_A, lora_B, g, scaling)
    return merged_weight(weight, lora_A, lora_B, g, scaling)


def dora_forward(x, weight, bias, lora_A, lora_B, g, scaling: float, dropout_p: float, seed):
    """x [N, K], weight [D, K], bias [D] | None, lora_A [r, K], lora_B [D, r], g [D] ->
    (y [N, D], S [N, r], V [N, D] when dropout_p > 0 else an empty [0]), all in x's dtype.
    weight may be a fusedpeft.quantized.QuantizedWeight (host.dora.dora_weights; 4-bit
    dequantized by fusedpeft_C::dequantize_4bit)."""
    if dropout_p == 0.0:
        weight = dora_weights(weight, x.dtype, 0.0, dequantize_4bit)[0]  # None for an 8-bit base
        return forward_no_dropout(x, weight, bias, lora_A, lora_B, g, scaling, _merged_weight)
    if x.device.type != "cpu":  # see the module docstring
        return implementation("dora", "torch").dora_forward(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p,
                                                            seed)
    weight, v_weight = dora_weights(weight, x.dtype, dropout_p, dequantize_4bit)
    seed_int = seed_value(seed, dropout_p)
    S = _ops.lora_shrink(x, lora_A, dropout_p, seed_int)
    V = _ops.lora_shrink(x, v_weight, dropout_p, seed_int)
    y = expand_onto_base(S, x, weight, bias, lora_B * g[:, None], scaling)
    return y.addcmul_(V, g - 1), S, V


def _expand_grads(dy, S, lora_B, g, scaling: float, need_S: bool, need_sdyS: bool):
    """(dS [N, r], s dY^T S [D, r]) as host.dora.expand_grads, from one pass over dY on CPU."""
    if need_S and need_sdyS and dy.device.type == "cpu":
        dS, sdyS = _ops.lora_expand_backward(dy, S, lora_B * g[:, None], scaling)
        return dS.to(dy.dtype), sdyS
    return expand_grads(dy, S, lora_B, g, scaling, need_S, need_sdyS)


def dora_backward(grad_y, x, weight, bias, lora_A, lora_B, g, saved, S, scaling: float, dropout_p: float, seed,
                  need_x: bool, need_A: bool, need_B: bool, need_g: bool):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_A [r, K] | None, grad_B [D, r] | None, grad_g [D] | None).

    saved: the output Y [N, D] when dropout_p == 0, V = x' W^T [N, D] otherwise."""
    if (not isinstance(weight, torch.Tensor) and weight.kind == "8bit") or (dropout_p > 0.0 and x.device.type != "cpu"):
        return implementation("dora", "torch").dora_backward(grad_y, x, weight, bias, lora_A, lora_B, g, saved, S,
                                                             scaling, dropout_p, seed, need_x, need_A, need_B, need_g)
    dy = grad_y.to(x.dtype)
    need_S = need_x or need_A
    dense = weight
    if not isinstance(weight, torch.Tensor):  # 4-bit: dequantized for dX only
        dense = dora_weights(weight, x.dtype, dropout_p, dequantize_4bit)[0] if need_x else None
    if dropout_p == 0.0:
        merged = need_x and merged_strategy(x, dense, 0.0)
        w = dense if dense is not None else x.new_empty(1, 1).expand(*weight.shape)  # not read without need_x
        grad_x, grad_A, grad_B, num = _ops.dora_backward_p0(dy, saved, x, w, S, lora_A, lora_B, g, scaling,
                                                            need_x and not merged, need_A, need_B, need_g)
        if merged:  # dX = dY W'' as one GEMM (torch_backend.dora's "merged" form)
            grad_x = dy @ _merged_weight(dense, lora_A, lora_B, g, scaling)
        grad_g = None
        if need_g:
            if bias is not None:
                num -= bias.to(num.dtype) * dy.sum(0, dtype=num.dtype)
            grad_g = magnitude_grad_from_sums(num, dy, x, weight, lora_B, g, S, scaling).to(g.dtype)
        return (grad_x if need_x else None, grad_A.to(lora_A.dtype) if need_A else None,
                grad_B.to(lora_B.dtype) if need_B else None, grad_g)
    dS, sdyS = _expand_grads(dy, S, lora_B, g, scaling, need_S, need_B or need_g)
    grad_B = grad_B_from(sdyS, lora_B, g) if need_B else None
    grad_g = magnitude_grad_with_dropout(dy, saved, lora_B, sdyS, g) if need_g else None
    grad_x = grad_A = None
    seed_int = seed_value(seed, dropout_p)
    if need_S:
        grad_x, grad_A = _ops.lora_shrink_backward(x, dS, lora_A, dropout_p, seed_int, need_x, need_A)
        grad_A = grad_A.to(lora_A.dtype) if need_A else None
    if need_x:
        masked, _ = _ops.lora_shrink_backward(x, (dy * (g - 1)).to(x.dtype), dense, dropout_p, seed_int, True,
                                              False)
        grad_x = grad_x.add_(masked).addmm_(dy, dense)
    return grad_x, grad_A, grad_B, grad_g
