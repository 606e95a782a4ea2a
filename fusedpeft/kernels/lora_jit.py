"""The @triton.jit kernels of the fused LoRA layer (docs/architecture.md §2); launchers live in kernels/lora.py.

Notation: x [N, K] (tokens x in_features, contiguous), W [D, K], A [R, K], B [D, R], S [N, R],
dY [N, D]. The rank axis is processed in chunks of R_BLOCK (a power of two >= 16, at most 128):
one chunk for r <= 128, padded with masked zeros; larger ranks loop (GEMMs) or add a program
axis (the thin kernels). Dropout (docs/contract.md §5): element (m, j) of x is kept when
tl.rand(seed, (m * K + j) mod 2**32 as int32) >= p and then scaled by 1 / (1 - p); the mask is
regenerated wherever it is needed, never stored. Accumulation is fp32 (fp64 for fp64 inputs);
dot operands are x's dtype (adapter tiles are cast on load), fp32 dots use IEEE precision so
the fp32 path matches PyTorch's default fp32 matmul (no TF32).

Byte and FLOP counts in the headers are for one launch; 2-byte elements unless stated.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dropout_tile(t, rm, rk, K, seed, p, scale):
    """t [BM, BK] with the docs/contract.md §5 mask of rows rm, columns rk of an [*, K] input applied."""
    offset = (rm.to(tl.int64)[:, None] * K + rk[None, :]).to(tl.int32)  # the low 32 bits
    keep = tl.rand(seed, offset) >= p
    return tl.where(keep, t * scale, 0.0)


@triton.jit
def _swizzle(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time so that the
    programs running together share their W tiles in L2."""
    grid_m = tl.cdiv(n_rows, BLOCK_M)
    grid_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# ------------------------------------------------------------------------------------------------
# shrink: S = dropout(x) @ A^T
#   grid (cdiv(N, BLOCK_M), cdiv(R, R_BLOCK)); each program streams its rows of x once over K.
#   Fuses: the dropout mask (Philox in registers), the A^T GEMM, the cast of A to x's dtype.
#   Limits: x contiguous along K. FLOPs 2 N K R; bytes N K (x, once per rank chunk) + R K + N R.
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_kernel(x_ptr, a_ptr, s_ptr, N, K, R, stride_xm, stride_ar, stride_ak, stride_sm,
                        seed, p, scale,
                        HAS_DROPOUT: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
                        R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    m_ok = rm < N
    r_ok = rr < R
    if FP64:
        acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = _dropout_tile(x, rm, rk, K, seed, p, scale).to(x_ptr.dtype.element_ty)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None].to(tl.int64) * stride_ak,
                      mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, a_t.to(x_ptr.dtype.element_ty), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    tl.store(s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rr[None, :], acc.to(s_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


# ------------------------------------------------------------------------------------------------
# forward GEMM: y = x @ W^T + bias + scaling * S @ B^T
#   grid cdiv(N, BLOCK_M) * cdiv(D, BLOCK_N), swizzled. The accumulator starts as the rank-R
#   product (one dot with K = R_BLOCK per rank chunk), is scaled, then the K loop of the base
#   GEMM accumulates on top; bias is added in the epilogue and y is written once.
#   Fuses: base GEMM, LoRA expand, scaling, bias, the sum: y never makes a second trip to memory.
#   FLOPs 2 N K D + 2 N R D; bytes N K (x) + D K (W) + N D (y) + N R + D R, like the base GEMM
#   alone plus N R + D R (x and W are re-read from L2 per tile, as in any tiled GEMM).
# ------------------------------------------------------------------------------------------------
@triton.jit
def _lora_fwd_kernel(x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, N, D, K, R,
                     stride_xm, stride_wd, stride_wk, stride_sm, stride_bd, stride_br, stride_ym, scaling,
                     HAS_BIAS: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr, R_BLOCK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + tl.arange(0, R_BLOCK)
        r_ok = rr < R
        s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + rn64[None, :] * stride_bd + rr[:, None] * stride_br,
                      mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc = tl.dot(s.to(dot_ty), b_t.to(dot_ty), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    acc = acc * scaling
    x_rows = x_ptr + rm64[:, None] * stride_xm
    w_cols = w_ptr + rn64[None, :] * stride_wd
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_cols + rk[:, None].to(tl.int64) * stride_wk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------
# backward, pass over dY: dS = scaling * dY @ B and dB += scaling * dY^T @ S
#   grid (cdiv(N, BLOCK_M), cdiv(R, R_BLOCK)); a program owns BLOCK_M rows and walks D, reading
#   each dY tile once for both products. dS rows are complete at the end of the walk; dB
#   partial tiles [BLOCK_D, R_BLOCK] are summed over the row blocks with fp32 atomics into a
#   zeroed fp32 buffer (so dB is not bitwise deterministic run to run; dS is).
#   FLOPs 4 N D R; bytes N D (dY, once per rank chunk) + 2 N R + D R, plus D R fp32 atomics
#   per row block.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _lora_bwd_ds_db_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, N, D, R,
                           stride_dym, stride_bd, stride_br, stride_sm, stride_dsm, stride_dbd, scaling,
                           NEED_S: tl.constexpr, NEED_B: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
                           R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    m_ok = rm < N
    r_ok = rr < R
    rm64 = rm.to(tl.int64)
    dot_ty = dy_ptr.dtype.element_ty
    if FP64:
        ds = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float64)
    else:
        ds = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    if NEED_B:
        s = tl.load(s_ptr + rm64[:, None] * stride_sm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0).to(dot_ty)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rd[None, :], mask=m_ok[:, None] & d_ok[None, :],
                     other=0.0)
        if NEED_S:
            b = tl.load(b_ptr + rd.to(tl.int64)[:, None] * stride_bd + rr[None, :] * stride_br,
                        mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            ds = tl.dot(dy, b.to(dot_ty), ds, input_precision=PRECISION, out_dtype=ds.dtype)
        if NEED_B:
            part = tl.dot(tl.trans(dy), s, tl.zeros((BLOCK_D, R_BLOCK), dtype=ds.dtype),
                          input_precision=PRECISION, out_dtype=ds.dtype)
            tl.atomic_add(db_ptr + rd.to(tl.int64)[:, None] * stride_dbd + rr[None, :], part * scaling,
                          mask=d_ok[:, None] & r_ok[None, :])
    if NEED_S:
        tl.store(ds_ptr + rm64[:, None] * stride_dsm + rr[None, :], (ds * scaling).to(ds_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & r_ok[None, :])


# ------------------------------------------------------------------------------------------------
# backward: dA += dS^T @ dropout(x)
#   grid (cdiv(K, BLOCK_K), cdiv(R, R_BLOCK), SPLIT); program (k, r, s) sums rows
#   [s * rows_per_split, (s + 1) * rows_per_split) into an [R_BLOCK, BLOCK_K] fp32 tile and adds
#   it to a zeroed fp32 buffer with atomics (SPLIT > 1 spreads the N-long reduction over the
#   GPU; SPLIT = 1 is deterministic). The mask is regenerated from the seed.
#   FLOPs 2 N K R; bytes N K (x, once per rank chunk) + K / BLOCK_K * N R (dS, L2-resident) + R K.
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _lora_bwd_da_kernel(ds_ptr, x_ptr, da_ptr, N, K, R, stride_dsm, stride_xm, stride_dar, rows_per_split,
                        seed, p, scale,
                        HAS_DROPOUT: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
                        R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    k_ok = rk < K
    r_ok = rr < R
    dot_ty = x_ptr.dtype.element_ty
    if FP64:
        acc = tl.zeros((R_BLOCK, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((R_BLOCK, BLOCK_K), dtype=tl.float32)
    row_start = tl.program_id(2) * rows_per_split
    row_end = min(row_start + rows_per_split, N)
    for m0 in range(row_start, row_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < row_end
        rm64 = rm.to(tl.int64)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = _dropout_tile(x, rm, rk, K, seed, p, scale).to(dot_ty)
        ds_t = tl.load(ds_ptr + rm64[None, :] * stride_dsm + rr[:, None], mask=m_ok[None, :] & r_ok[:, None],
                       other=0.0)
        acc = tl.dot(ds_t.to(dot_ty), x, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    tl.atomic_add(da_ptr + rr[:, None] * stride_dar + rk[None, :], acc, mask=r_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------------
# backward GEMM: dX = dY @ W + dropout'(dS @ A)   (+ the dX already there, with ACCUMULATE)
#   grid cdiv(N, BLOCK_M) * cdiv(K, BLOCK_N), swizzled. The accumulator starts as the rank-R
#   product dS @ A (one dot with K = R_BLOCK per rank chunk) with the dropout mask of this
#   [BLOCK_M, BLOCK_N] tile of x regenerated and applied, then the D loop of the base GEMM adds
#   dY @ W on top; dX is written once. ACCUMULATE (grouped layers) reads the dX of the previous
#   layer into the accumulator first; HAS_LORA=False leaves the rank product out.
#   FUSE_DA also computes dA += dS^T @ dropout(x) for this tile (fp32 atomics over the row
#   blocks), reusing the tile's mask: x is read once and the mask generated once for both.
#   FLOPs 2 N D K + 2 N R K (+ 2 N R K with FUSE_DA); bytes N D (dY) + D K (W) + N K (dX)
#   + N R + R K (+ N K for x and N / BLOCK_M * R K fp32 atomics with FUSE_DA).
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def _lora_bwd_dx_kernel(dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, x_ptr, da_ptr, N, K, D, R,
                        stride_dym, stride_wd, stride_wk, stride_dsm, stride_ar, stride_ak, stride_dxm, stride_xm,
                        stride_dar, seed, p, scale,
                        HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr,
                        FUSE_DA: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr, R_BLOCK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _swizzle(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < N
    n_ok = rn < K
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    dot_ty = dy_ptr.dtype.element_ty
    out = dx_ptr + rm64[:, None] * stride_dxm + rn[None, :]
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
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
            if HAS_DROPOUT:
                dxa = tl.dot(ds, a, tl.zeros_like(acc), input_precision=PRECISION, out_dtype=acc.dtype)
                acc += tl.where(keep, dxa * scale, 0.0)
            else:
                acc = tl.dot(ds, a, acc, input_precision=PRECISION, out_dtype=acc.dtype)
            if FUSE_DA:
                part = tl.dot(tl.trans(ds), x, tl.zeros((R_BLOCK, BLOCK_N), dtype=acc.dtype), input_precision=PRECISION,
                              out_dtype=acc.dtype)
                tl.atomic_add(da_ptr + rr[:, None] * stride_dar + rn[None, :], part, mask=r_ok[:, None] & n_ok[None, :])
    if ACCUMULATE:
        acc += tl.load(out, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(acc.dtype)
    dy_rows = dy_ptr + rm64[:, None] * stride_dym
    for d0 in range(0, D, BLOCK_K):
        rd = d0 + tl.arange(0, BLOCK_K)
        d_ok = rd < D
        dy = tl.load(dy_rows + rd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rd.to(tl.int64)[:, None] * stride_wd + rn64[None, :] * stride_wk,
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
