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

from fusedpeft.kernels.lora_jit import _dropout_tile, _swizzle


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
    pid_m, pid_n = _swizzle(tl.program_id(0), N, D, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < N
    n_ok = rn < D
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    dot_ty = x_ptr.dtype.element_ty
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g = tl.load(g_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + tl.arange(0, R_BLOCK)
        r_ok = rr < R
        s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + rn64[None, :] * stride_bd + rr[:, None] * stride_br,
                      mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc = tl.dot(s.to(dot_ty), b_t.to(dot_ty), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    acc = acc * scaling
    if HAS_DROPOUT:
        acc = acc * g[None, :]  # g s S' B^T; x W^T is added unscaled
        acc_v = tl.zeros_like(acc)
    x_rows = x_ptr + rm64[:, None] * stride_xm
    w_cols = w_ptr + rn64[None, :] * stride_wd
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_cols + rk[:, None].to(tl.int64) * stride_wk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
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
    pid_m, pid_n = _swizzle(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < N
    n_ok = rn < K
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    dot_ty = dy_ptr.dtype.element_ty
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, (rm64[:, None] * K + rn[None, :]).to(tl.int32)) >= p
    if FUSE_DA:
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep, x * scale, 0.0)
        x = x.to(dot_ty)
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + tl.arange(0, R_BLOCK)
        r_ok = rr < R
        ds = tl.load(ds_ptr + rm64[:, None] * stride_dsm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :],
                     other=0.0).to(dot_ty)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rn64[None, :] * stride_ak,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(dot_ty)
        acc = tl.dot(ds, a, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if FUSE_DA:
            part = tl.dot(tl.trans(ds), x, tl.zeros((R_BLOCK, BLOCK_N), dtype=acc.dtype), input_precision=PRECISION,
                          out_dtype=acc.dtype)
            tl.atomic_add(da_ptr + rr[:, None] * stride_dar + rn[None, :], part, mask=r_ok[:, None] & n_ok[None, :])
    if HAS_DROPOUT:
        acc_base = tl.zeros_like(acc)  # dY W; acc collects what the mask applies to
    dy_rows = dy_ptr + rm64[:, None] * stride_dym
    for d0 in range(0, D, BLOCK_K):
        rd = d0 + tl.arange(0, BLOCK_K)
        d_ok = rd < D
        dy = tl.load(dy_rows + rd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rd.to(tl.int64)[:, None] * stride_wd + rn64[None, :] * stride_wk,
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)
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
    if FP64:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
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
