"""The "triton" backend of the dora op family: launchers for kernels/dora_jit.py, reusing the
LoRA backend's shrink, ds_db and dA launches (kernels/lora.py).

Forward (2 launches):  S = dropout(x) @ A^T (LoRA's shrink), then one GEMM: y = g * (x W^T +
                       s S B^T) + bias with g = m / n in the epilogue (p = 0), or, with dropout,
                       x W^T and V = x' W^T from one K loop over shared W tiles and
                       y = x W^T + bias + (g - 1) V + g s S' B^T (V stored for backward).
Backward:              dS = s dY (g B) and s dY^T S in one pass over dY (LoRA's ds_db with g B);
                       dB = g * (s dY^T S); dX (+ fused dA) in one GEMM; dg = colsum(dY * Y) -
                       bias * colsum(dY) (p = 0, divided by g; rows with g = 0 recomputed) or
                       colsum(dY * V) + rowsum(B * s dY^T S') (p > 0).
Dtypes, precision, interpreter handling and tile configs as in kernels/lora.py (the dropout
variants hold two accumulators: their configs are compiled ahead of time in
tests/test_triton_dora_aot.py).
"""

from __future__ import annotations

import torch
import triton

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.host.dora import magnitude_grad_from_sums
from fusedpeft.kernels._common import (
    arch_class,
    dot_precision,
    for_launch,
    interpreting,
    unavailable_reason,  # noqa: F401  (read by fusedpeft.backends)
)
from fusedpeft.kernels.dora_jit import _colsum_product_kernel, _dora_bwd_dx_kernel, _dora_fwd_kernel
from fusedpeft.kernels.lora import (
    GROUP_M,
    INTERPRETER_GEMM_CONFIG,
    _check,
    _dense,
    _dropout_args,
    _tuned,
    da,
    ds_db,
    gemm_configs,
    gemm_rank_block,
    shrink,
)

# GEMM tiles of the dropout variants (two [BLOCK_M, BLOCK_N] accumulators): (BLOCK_M, BLOCK_N,
# BLOCK_K, num_warps, num_stages) per (arch class, element bytes); without dropout the LoRA
# configs are used (one accumulator, like LoRA's GEMMs).
DROPOUT_CONFIGS = {
    (90, 2): ((64, 128, 64, 8, 3), (64, 64, 64, 4, 3)),
    (80, 2): ((64, 128, 32, 8, 3), (64, 64, 32, 4, 3)),
    (90, 4): ((64, 128, 32, 8, 3), (64, 64, 32, 4, 3)),
    (80, 4): ((64, 64, 32, 4, 3),),
    (90, 8): ((64, 64, 32, 4, 2),),
    (80, 8): ((64, 64, 32, 4, 2),),
}
# dX without dropout where LoRA's dX config spilled once dY is scaled by g on load (ptxas, sm_80:
# (128, 64, 32, 8, 4) spills 16 bytes; 3 stages compile to 152 registers without spilling).
DX_CONFIGS = {(80, 2): ((128, 64, 32, 8, 3), (64, 128, 32, 4, 4))}
COLSUM_CONFIG = dict(BLOCK_M=32, BLOCK_D=128, num_warps=4)
# colsum_product splits the rows so that about this many programs run: ~8 per SM of an H100 / H200
# (132 SMs), enough 4-warp programs to hide the memory latency of one streaming pass over a and b,
# few enough that the atomic adds of the partial sums into c [D] stay negligible (an estimate from
# this count, not a tuned value).
COLSUM_TARGET_PROGRAMS = 1024


def dora_configs(arch: int, element_bytes: int, kind: str, dropout: bool) -> tuple:
    """The tile configs autotuned for the DoRA GEMM ``kind`` ("fwd" or "dx")."""
    if dropout:
        return DROPOUT_CONFIGS[(arch, element_bytes)]
    if kind == "dx" and (arch, element_bytes) in DX_CONFIGS:
        return DX_CONFIGS[(arch, element_bytes)]
    return gemm_configs(arch, element_bytes, kind)


def _launch(kernel, kind: str, dropout: bool, t: torch.Tensor, rows: int, cols: int, args: tuple, kwargs: dict,
            restore: tuple = ()):
    if interpreting():
        bm, bn, bk, w, s = INTERPRETER_GEMM_CONFIG
        grid = (triton.cdiv(rows, bm) * triton.cdiv(cols, bn),)
        kernel[grid](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=w, num_stages=s)
        return
    tuned = _tuned(kernel, dora_configs(arch_class(t), t.element_size(), kind, dropout), restore)
    tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)](*args, **kwargs)


def forward_gemm(x, weight, bias, S, B, g, scaling: float, dropout_p: float, seed):
    """x [N, K] contiguous, weight [D, K], bias [D] | None, S [N, R] (S' with dropout), B [D, R],
    g [D] -> (y [N, D], V = x' W^T [N, D] with dropout else None), in x's dtype."""
    N, K = x.shape
    D, R = weight.shape[0], S.shape[1]
    dropout = dropout_p > 0.0
    y = x.new_empty(N, D)
    V = x.new_empty(N, D) if dropout else None
    if N == 0 or D == 0:
        return y, V
    seed_i, p, scale = _dropout_args(dropout_p, seed)
    bias = bias.contiguous() if bias is not None else None
    args = (x, weight, bias if bias is not None else y, S, B, g, y, V if dropout else y, N, D, K, R, x.stride(0),
            weight.stride(0), weight.stride(1), S.stride(0), B.stride(0), B.stride(1), y.stride(0),
            (V if dropout else y).stride(0), float(scaling), seed_i, p, scale)
    kwargs = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout, FP64=x.dtype == torch.float64,
                  PRECISION=dot_precision(x.dtype), R_BLOCK=gemm_rank_block(R))
    _launch(_dora_fwd_kernel, "fwd", dropout, x, N, D, args, kwargs)
    return y, V


def dx_gemm(dy, weight, g, dS, A, dropout_p: float, seed, x=None, dA=None) -> torch.Tensor:
    """dX [N, K] in dy's dtype: (dY * g) W + dS A, or dY W + dropout'((dY * (g - 1)) W + dS A);
    with x [N, K] and dA [R, K] (zeroed fp32 / fp64) also dA += dS^T x'."""
    N, D = dy.shape
    K = weight.shape[1]
    R = dS.shape[1]
    dx = dy.new_empty(N, K)
    if N == 0 or K == 0:
        return dx
    seed_i, p, scale = _dropout_args(dropout_p, seed)
    fuse_da = dA is not None
    args = (dy, weight, g, dS, A, dx, x if fuse_da else dy, dA if fuse_da else dx, N, K, D, R, dy.stride(0),
            weight.stride(0), weight.stride(1), dS.stride(0), A.stride(0), A.stride(1), dx.stride(0),
            x.stride(0) if fuse_da else 0, dA.stride(0) if fuse_da else 0, seed_i, p, scale)
    kwargs = dict(HAS_DROPOUT=dropout_p > 0.0, FUSE_DA=fuse_da, FP64=dy.dtype == torch.float64,
                  PRECISION=dot_precision(dy.dtype), R_BLOCK=gemm_rank_block(max(R, 1)))
    _launch(_dora_bwd_dx_kernel, "dx", dropout_p > 0.0, dy, N, K, args, kwargs, restore=("da_ptr",) * fuse_da)
    return dx


def _dense_weight(weight, x: torch.Tensor) -> torch.Tensor:
    """The base weight the GEMMs read: a 4-bit one dequantized (kernels/dequant.py) into a fresh
    buffer. An 8-bit base's product is bitsandbytes' own output, which the fused epilogue cannot scale."""
    dense = _dense(weight, x)
    if dense is None:
        raise TypeError("triton dora: an 8-bit (bitsandbytes Linear8bitLt) base is not supported by the Triton DoRA "
                        "kernels, which scale the base product in the GEMM epilogue; use backend='torch' or 'cpu'")
    return dense


def colsum_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t a_tj b_tj [D] in fp32 (fp64 for fp64): a, b [N, D] with unit column stride."""
    N, D = a.shape
    c = torch.zeros(D, dtype=accumulation_dtype(a.dtype), device=a.device)
    if N == 0 or D == 0:
        return c
    cfg = COLSUM_CONFIG
    column_blocks = triton.cdiv(D, cfg["BLOCK_D"])
    row_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    splits = 1 if interpreting() else max(1, min(row_blocks, COLSUM_TARGET_PROGRAMS // column_blocks))
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    grid = (column_blocks, triton.cdiv(N, rows_per_split))
    _colsum_product_kernel[grid](a, b, c, N, D, a.stride(0), b.stride(0), rows_per_split,
                                 FP64=a.dtype == torch.float64, **cfg)
    return c


# ------------------------------------------------------------------------------------------------
# the backend API (fusedpeft.ops.dora)
# ------------------------------------------------------------------------------------------------


def dora_forward(x, weight, bias, lora_A, lora_B, g, scaling: float, dropout_p: float, seed):
    """x [N, K], weight [D, K], bias [D] | None, lora_A [r, K], lora_B [D, r], g [D] ->
    (y [N, D], S [N, r], V [N, D] when dropout_p > 0 else an empty [0]), all in x's dtype."""
    weight = _dense_weight(weight, x)
    _check(x, (weight,), (lora_A,), (lora_B,))
    xl = for_launch(x).contiguous()
    S = shrink(xl, for_launch(lora_A), dropout_p, seed)
    y, V = forward_gemm(xl, for_launch(weight), for_launch(bias), S, for_launch(lora_B), g.contiguous(), scaling,
                        dropout_p, seed)
    return y.to(x.dtype), S.to(x.dtype), V.to(x.dtype) if V is not None else x.new_empty(0)


def dora_backward(grad_y, x, weight, bias, lora_A, lora_B, g, saved, S, scaling: float, dropout_p: float, seed,
                  need_x: bool, need_A: bool, need_B: bool, need_g: bool):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_A [r, K] | None, grad_B [D, r] | None, grad_g [D] | None).

    saved: the output Y [N, D] when dropout_p == 0, V = x' W^T [N, D] otherwise."""
    weight = _dense_weight(weight, x) if need_x or isinstance(weight, torch.Tensor) else weight
    _check(x, (weight if isinstance(weight, torch.Tensor) else None,), (lora_A,), (lora_B,))
    xl = for_launch(x).contiguous()
    dy = for_launch(grad_y.to(x.dtype)).contiguous()
    Sl = for_launch(S.to(x.dtype))
    need_S = need_x or need_A
    need_sdyS = need_B or (need_g and dropout_p > 0.0)
    dS, sdyS = ds_db(dy, for_launch(lora_B * g[:, None]), Sl, scaling, need_S, need_sdyS)
    grad_B = (sdyS * g.to(sdyS.dtype)[:, None]).to(lora_B.dtype) if need_B else None
    grad_g = None
    if need_g:
        saved_l = for_launch(saved.to(x.dtype)).contiguous()
        num = colsum_product(dy, saved_l)
        if dropout_p > 0.0:
            grad_g = (num + (lora_B.to(sdyS.dtype) * sdyS).sum(1)).to(g.dtype)
        else:
            if bias is not None:
                num -= bias.to(num.dtype) * dy.sum(0, dtype=num.dtype)
            w = for_launch(weight) if isinstance(weight, torch.Tensor) else weight
            grad_g = magnitude_grad_from_sums(num, dy, xl, w, lora_B, g, Sl, scaling).to(g.dtype)
    grad_x = dA = None
    if need_x:
        dA = torch.zeros(lora_A.shape, dtype=accumulation_dtype(xl.dtype), device=x.device) if need_A else None
        grad_x = dx_gemm(dy, for_launch(weight), g.contiguous(), dS, for_launch(lora_A), dropout_p, seed, x=xl,
                         dA=dA).to(x.dtype)
    elif need_A:
        dA = da(dS, xl, dropout_p, seed)
    return grad_x, dA.to(lora_A.dtype) if need_A else None, grad_B, grad_g
