"""The @triton.jit kernels of DoRA (docs/contract.md §8); launchers live in kernels/dora.py.

DoRA variants of the LoRA GEMMs of kernels/lora_jit.py (same notation, tiles, swizzle, dropout
tile and rank prologue), with g = m / n [D] applied in the epilogue:

  forward   y = g * (x W^T + s S B^T) + bias                                   (p = 0)
            y = x W^T + bias + (g - 1) * V + g s S' B^T,  V = x' W^T            (p > 0)
            the two products x W^T and x' W^T share the K loop and each W tile; V is stored.
  backward  dX = (dY * g) W + dS A                                             (p = 0)
            dX = dY W + dropout'((dY * (g - 1)) W + dS A)                       (p > 0)
            the two products share the D loop and each W tile; dA fused as in LoRA.
  colsum    c_j = sum_t a_tj b_tj, for the magnitude's gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedpeft.kernels.lora_jit import (
    _acc_zeros,
    _dropout_tile,
    _dy_w_tiles,
    _gemm_tile,
    _keep_mask,
    _rank_prologue_dx,
    _rank_prologue_fwd,
    _x_w_tiles,
)


# ------------------------------------------------------------------------------------------------
# forward GEMM (grid cdiv(N, BLOCK_M) * cdiv(D, BLOCK_N), swizzled)
#   FLOPs 2 N K D (4 N K D with dropout) + 2 N R D; bytes N K + D K + N D (+ N D for V).
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _dora_fwd_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, g_ptr, y_ptr, v_ptr, N, D, K, R,
                     stride_xm, stride_wd, stride_wk, stride_sm, stride_bd, stride_br, stride_ym, stride_vm,
                     scaling, seed, p, scale,
                     HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
                     R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    rm, rn, m_ok, n_ok, rm64, rn64 = _gemm_tile(N, D, BLOCK_M, BLOCK_N, GROUP_M)
    dot_ty = x_ptr.dtype.element_ty
    acc = _acc_zeros(BLOCK_M, BLOCK_N, FP64)
    g = tl.load(g_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)
    acc = _rank_prologue_fwd(acc, s_ptr, b_ptr, rm64, rn64, m_ok, n_ok, R, stride_sm, stride_bd, stride_br, dot_ty,
                             PRECISION, R_BLOCK)
    acc = acc * scaling
    if HAS_DROPOUT:
        acc = acc * g[None, :]  # g s S' B^T; x W^T is added unscaled
        acc_v = tl.zeros_like(acc)
    x_rows = x_ptr + rm64[:, None] * stride_xm
    w_cols = w_ptr + rn64[None, :] * stride_wd
    for k0 in range(0, K, BLOCK_K):
        x, w_t, rk = _x_w_tiles(x_rows, w_cols, m_ok, n_ok, k0, K, stride_wk, BLOCK_K)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if HAS_DROPOUT:
            x_dropped = _dropout_tile(x, rm, rk, K, seed, p, scale).to(dot_ty)
            acc_v = tl.dot(x_dropped, w_t, acc_v, input_precision=PRECISION, out_dtype=acc.dtype)
    if HAS_DROPOUT:
        tl.store(v_ptr + rm64[:, None] * stride_vm + rn[None, :], acc_v.to(v_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        acc += (g - 1.0)[None, :] * acc_v
    else:
        acc = acc * g[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------
# backward GEMM (grid cdiv(N, BLOCK_M) * cdiv(K, BLOCK_N), swizzled): the rank prologue dS @ A
#   (with dA += dS^T @ x' fused, FUSE_DA), then the D loop over dY and W.
#   FLOPs 2 N D K (4 N D K with dropout) + 2 N R K (+ 2 N R K with FUSE_DA).
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _dora_bwd_dx_kernel(dy_ptr, w_ptr, g_ptr, ds_ptr, a_ptr, dx_ptr, x_ptr, da_ptr, N, K, D, R,
                        stride_dym, stride_wd, stride_wk, stride_dsm, stride_ar, stride_ak, stride_dxm, stride_xm,
                        stride_dar, seed, p, scale,
                        HAS_DROPOUT: tl.constexpr, FUSE_DA: tl.constexpr, FP64: tl.constexpr,
                        PRECISION: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    rm, rn, m_ok, n_ok, rm64, rn64 = _gemm_tile(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    dot_ty = dy_ptr.dtype.element_ty
    keep = _keep_mask(rm64, rn, K, seed, p) if HAS_DROPOUT else None
    acc = _rank_prologue_dx(_acc_zeros(BLOCK_M, BLOCK_N, FP64), ds_ptr, a_ptr, x_ptr, da_ptr, keep, scale, rm64, rn,
                            rn64, m_ok, n_ok, R, stride_dsm, stride_ar, stride_ak, stride_xm, stride_dar, dot_ty,
                            HAS_DROPOUT, False, FUSE_DA, PRECISION, R_BLOCK, BLOCK_N)
    if HAS_DROPOUT:
        acc_base = tl.zeros_like(acc)  # dY W; acc collects what the mask applies to
    dy_rows = dy_ptr + rm64[:, None] * stride_dym
    for d0 in range(0, D, BLOCK_K):
        dy, w, rd, d_ok = _dy_w_tiles(dy_rows, w_ptr, rn64, m_ok, n_ok, d0, D, stride_wd, stride_wk, BLOCK_K)
        g = tl.load(g_ptr + rd, mask=d_ok, other=0.0).to(acc.dtype)
        if HAS_DROPOUT:
            acc_base = tl.dot(dy, w, acc_base, input_precision=PRECISION, out_dtype=acc.dtype)
            dy_g = (dy.to(acc.dtype) * (g - 1.0)[None, :]).to(dot_ty)
        else:
            dy_g = (dy.to(acc.dtype) * g[None, :]).to(dot_ty)
        acc = tl.dot(dy_g, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if HAS_DROPOUT:
        acc = acc_base + tl.where(keep, acc * scale, 0.0)
    tl.store(dx_ptr + rm64[:, None] * stride_dxm + rn[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------
# column sums of a product: c[j] += sum_t a_tj b_tj over this program's rows (fp32 / fp64 atomics)
#   grid (cdiv(D, BLOCK_D), cdiv(N, rows_per_split)). Bytes 2 N D.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _colsum_product_kernel(a_ptr, b_ptr, c_ptr, N, D, stride_am, stride_bm, rows_per_split,
                           FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float64 if FP64 else tl.float32)
    row_start = tl.program_id(1) * rows_per_split
    row_end = min(row_start + rows_per_split, N)
    for m0 in range(row_start, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        ok = (rm < row_end)[:, None] & d_ok[None, :]
        rm64 = rm.to(tl.int64)
        a = tl.load(a_ptr + rm64[:, None] * stride_am + rd[None, :], mask=ok, other=0.0).to(acc.dtype)
        b = tl.load(b_ptr + rm64[:, None] * stride_bm + rd[None, :], mask=ok, other=0.0).to(acc.dtype)
        acc += tl.sum(a * b, axis=0)
    tl.atomic_add(c_ptr + rd, acc, mask=d_ok)
