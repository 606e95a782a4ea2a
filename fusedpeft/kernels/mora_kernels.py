"""@triton.jit kernels of the MoRA op family (docs/contract.md §3, §5); launchers in fusedpeft/kernels/mora.py.

Notation: x [N, K], W [D, K], M [R, R] (R = r_hat), pad = wrap padding, n = (K + pad) / R chunks,
span = n R. Dropout (docs/contract.md §5) is regenerated in every kernel that reads x: element (m, j) is kept
when tl.rand(seed, (m K + j) as int32) >= p and then scaled by 1 / (1 - p); no mask is stored.
Accumulation is fp32 (fp64 for fp64 inputs); tl.dot operands are cast to the dtype of the A
operand (x, dY or an [N, R] intermediate in x's dtype).
"""

import triton
import triton.language as tl


@triton.jit
def _keep_scale(seed, p, scale_ptr, rows, cols, K):
    """[len(rows), len(cols)] dropout multiplier keep(m, j) / (1 - p) for an [N, K] input; the
    1 / (1 - p) is read from scale_ptr in the accumulation dtype (exact for fp64)."""
    offset = (rows.to(tl.int64)[:, None] * K + cols.to(tl.int64)[None, :]).to(tl.int32)
    return tl.where(tl.rand(seed, offset) >= p, tl.load(scale_ptr), 0.0)


@triton.jit
def _slot(idx, L, R, CONTIG: tl.constexpr):
    """Slot of position idx on an axis of length L: idx mod R (strided / tiled), or the index of its
    contiguous group (docs/contract.md §3: the first L mod R groups hold L // R + 1 positions, the rest L // R)."""
    if CONTIG:
        q = L // R
        edge = (L - q * R) * (q + 1)
        return tl.where(idx < edge, idx // (q + 1), L - q * R + (idx - edge) // tl.maximum(q, 1))
    else:
        return idx % R


@triton.jit
def _rope_block(m_ptr, cos_ptr, sin_ptr, c, a, b, a_ok, b_ok, R):
    """Elements (a, b) of B_c = M R_c (a, b broadcastable index tensors), generated from M and chunk
    c's fp32 cos/sin row: B_c[a, b] = M[a, b] cos[c, b] + s(b) M[a, (b + R/2) mod R] sin[c, b],
    s = +1 below R/2, else -1. cos/sin are loaded with b's shape only."""
    half = R // 2
    mask = a_ok & b_ok
    partner = tl.where(b < half, b + half, b - half)
    m1 = tl.load(m_ptr + a * R + b, mask=mask, other=0.0)
    m2 = tl.load(m_ptr + a * R + partner, mask=mask, other=0.0)
    cs = tl.load(cos_ptr + c * R + b, mask=b_ok, other=0.0)
    sn = tl.load(sin_ptr + c * R + b, mask=b_ok, other=0.0)
    return m1 * cs + tl.where(b < half, m2, -m2) * sn


@triton.jit
def _chunk_grad(g_ptr, stride_gm, rows, row_ok, c, offs_a, a_ok, R, D, SPAN, N_TILES, ACC: tl.constexpr):
    """G_c [len(rows), len(offs_a)]: the gradient of chunk c's output, dY [N, D] summed over the
    output tiles (period SPAN) that copy the chunk."""
    g = tl.zeros((rows.shape[0], offs_a.shape[0]), dtype=ACC)
    for t in range(0, N_TILES):
        pos = t * SPAN + c * R + offs_a
        ok = row_ok[:, None] & (a_ok & (pos < D))[None, :]
        g += tl.load(g_ptr + rows[:, None] * stride_gm + pos[None, :], mask=ok, other=0.0).to(ACC)
    return g


@triton.jit
def _rotated_chunk(x_ptr, stride_xm, cos_ptr, sin_ptr, seed, p, scale_ptr, rows, row_ok, c, offs_b, b_ok, R, K,
                   DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """Chunk c of cat(dropout(x), dropout(x)[:, :pad]) rotated with position c (rotate-half RoPE)
    -> [len(rows), len(offs_b)]: z[b] cos[c, b] + rotate_half(z)[b] sin[c, b]."""
    half = R // 2
    pos = c * R + offs_b
    pos2 = c * R + tl.where(offs_b < half, offs_b + half, offs_b - half)
    src = tl.where(pos >= K, pos - K, pos)
    src2 = tl.where(pos2 >= K, pos2 - K, pos2)
    ok = row_ok[:, None] & b_ok[None, :]
    x1 = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :], mask=ok, other=0.0).to(ACC)
    x2 = tl.load(x_ptr + rows[:, None] * stride_xm + src2[None, :], mask=ok, other=0.0).to(ACC)
    if DROPOUT:
        x1 = x1 * _keep_scale(seed, p, scale_ptr, rows, src, K)
        x2 = x2 * _keep_scale(seed, p, scale_ptr, rows, src2, K)
    cs = tl.load(cos_ptr + c * R + offs_b, mask=b_ok, other=0.0)
    sn = tl.load(sin_ptr + c * R + offs_b, mask=b_ok, other=0.0)
    return x1 * cs[None, :] + tl.where((offs_b < half)[None, :], -x2, x2) * sn[None, :]


@triton.jit
def _shared_delta(m_ptr, o, i, K, D, R, PAD, mask, OUT_CONTIG: tl.constexpr, IN_CONTIG: tl.constexpr):
    """ΔW[o, i] of types 1-4 (o output, i input feature; broadcastable index tensors):
    M[slot_out(o), slot_in(i)], plus M[slot_out(o), (i + K) mod R] for the wrapped columns i < pad."""
    so = _slot(o, D, R, OUT_CONTIG)
    si = _slot(i, K, R, IN_CONTIG)
    delta = tl.load(m_ptr + so * R + si, mask=mask, other=0.0)
    delta += tl.load(m_ptr + so * R + (i + K) % R, mask=mask & (i < PAD), other=0.0)
    return delta


# ---------------------------------------------------------------------------------------------
# Pre-pass: slot sums (types 1-4). compress(dropout(x)) -> z [N, R] and decompress^T(dY) -> [N, R].
# Algorithm: program (row block, slot block) loops over the ceil(L / R) chunks (strided) or the
# <= L // R + 1 members of each contiguous group, summing in fp32 registers; the wrap-padded or
# reshaped copy of the input is never formed. Reads N L, writes N R elements; N L adds, no FLOPs
# on tensor cores. Memory-bound: ~(N L + N R) * bytes / bandwidth.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mora_slot_sum_kernel(src_ptr, out_ptr, seed, p, scale_ptr, N, L, L_EXT, R, N_ITER, stride_sm, stride_om,
                          CONTIG: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    slot_ok = slots < R
    q = L // R
    rem = L - q * R
    start = slots * q + tl.minimum(slots, rem)
    size = q + (slots < rem).to(tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for t in range(0, N_ITER):
        if CONTIG:
            col = start + t
            ok = slot_ok & (t < size)
        else:
            pos = t * R + slots
            ok = slot_ok & (pos < L_EXT)
            col = tl.where(pos >= L, pos - L, pos)
        mask = row_ok[:, None] & ok[None, :]
        v = tl.load(src_ptr + rows[:, None] * stride_sm + col[None, :], mask=mask, other=0.0).to(ACC)
        if DROPOUT:
            v = v * _keep_scale(seed, p, scale_ptr, rows, col, L)
        acc += v
    tl.store(out_ptr + rows[:, None] * stride_om + slots[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _rope_forward(acc, x_ptr, stride_xm, m_ptr, cos_ptr, sin_ptr, seed, p, scale_ptr, rows, row_ok, cols, col0,
                  K, D, R, N_CHUNKS, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """acc [rows, cols] += dropout(x)_c @ B_c^T for every chunk c whose output lands in these columns."""
    DT = x_ptr.dtype.element_ty
    last = tl.minimum(col0 + BLOCK_N, D) - 1
    for g in range(col0 // R, last // R + 1):
        c = g % N_CHUNKS
        in_seg = (cols // R == g) & (cols < D)
        for b0 in tl.range(0, R, BLOCK_R, num_stages=1):
            offs_b = b0 + tl.arange(0, BLOCK_R)
            b_ok = offs_b < R
            pos = c * R + offs_b
            src = tl.where(pos >= K, pos - K, pos)
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :], mask=row_ok[:, None] & b_ok[None, :],
                         other=0.0)
            if DROPOUT:
                xt = (xt * _keep_scale(seed, p, scale_ptr, rows, src, K)).to(DT)
            bt = _rope_block(m_ptr, cos_ptr, sin_ptr, c, (cols - g * R)[None, :], offs_b[:, None], in_seg[None, :],
                             b_ok[:, None], R)
            acc = tl.dot(xt, bt.to(DT), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _rope_input_grad_segment(acc, g_ptr, stride_gm, m_ptr, cos_ptr, sin_ptr, rows, row_ok, c, idx, seg_ok, R, D,
                             SPAN, N_TILES, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc [rows, cols] += G_c @ B_c[:, idx] on the columns seg_ok (idx: column of B_c)."""
    DT = g_ptr.dtype.element_ty
    for a0 in tl.range(0, R, BLOCK_R, num_stages=1):
        offs_a = a0 + tl.arange(0, BLOCK_R)
        a_ok = offs_a < R
        g = _chunk_grad(g_ptr, stride_gm, rows, row_ok, c, offs_a, a_ok, R, D, SPAN, N_TILES, ACC)
        bt = _rope_block(m_ptr, cos_ptr, sin_ptr, c, offs_a[:, None], idx[None, :], a_ok[:, None], seg_ok[None, :], R)
        acc = tl.dot(g.to(DT), bt.to(DT), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _rope_input_grad(acc, g_ptr, stride_gm, m_ptr, cos_ptr, sin_ptr, rows, row_ok, cols, col0, K, D, R, PAD,
                     N_CHUNKS, USED, SPAN, N_TILES, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc [rows, input cols] += the MoRA branch of dX: the chunks covering the columns, plus the
    last chunk's wrapped part on columns 0 .. pad-1."""
    last = tl.minimum(col0 + BLOCK_N, K) - 1
    for c in range(col0 // R, tl.minimum(last // R, USED - 1) + 1):
        acc = _rope_input_grad_segment(acc, g_ptr, stride_gm, m_ptr, cos_ptr, sin_ptr, rows, row_ok, c, cols - c * R,
                                       (cols // R == c) & (cols < K), R, D, SPAN, N_TILES, ACC, PRECISION, BLOCK_R)
    if (col0 < PAD) & (USED >= N_CHUNKS):
        c = N_CHUNKS - 1
        acc = _rope_input_grad_segment(acc, g_ptr, stride_gm, m_ptr, cos_ptr, sin_ptr, rows, row_ok, c,
                                       cols + K - c * R, cols < PAD, R, D, SPAN, N_TILES, ACC, PRECISION, BLOCK_R)
    return acc


# ---------------------------------------------------------------------------------------------
# The fused GEMM: C [N, P] = A [N, Q] @ B^T (B [P, Q] by strides) + bias + the MoRA branch.
# TRANS = 0: forward, A = x, B = W (P = D, Q = K). TRANS = 1: dX, A = dY, B = W^T (P = K, Q = D).
# MODE 0: plain (the [N, R] x [R, R] square matmuls of design B).
# MODE 1: design A, types 1-4: ΔW[o, i] = M[slot_out(o), slot_in(i)] (+ wrap) gathered from M and
#         added to each W tile in fp32 before the dot: no extra MMA FLOPs, dropout off only; the
#         tile W + ΔW is rounded to x's dtype.
# MODE 2: design B, types 1-4: epilogue adds U[m, slot(col)] (U = z M^T, or for dX h = G M,
#         gathered; wrapped columns add a second slot; dropout mask regenerated on dX).
# MODE 3: type 6: after the K loop, extra dots over the chunk(s) feeding the tile's columns with
#         B_c = M R_c tiles generated from M and the fp32 cos/sin rows (forward: dropout(x)
#         chunk, wrap-indexed; dX: G_c = dY summed over output tiles, and the wrapped columns).
# FLOPs: 2 N P Q (+ 2 N P R per chunk segment in MODE 3). Bytes: N Q + P Q + N P elements
# (+ N R for MODE 2 gathers, M / cos / sin from L2). Grouped (GROUP_M) tile order for L2 reuse.
# Limits: A row-major with unit column stride; M contiguous [R, R]; R even for MODE 3.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mora_gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, m_ptr, u_ptr, cos_ptr, sin_ptr, seed, p, scale_ptr,
                      N, P, Q, stride_am, stride_bp, stride_bq, stride_cm, stride_um,
                      K, D, R, PAD, N_CHUNKS, USED, SPAN, N_TILES,
                      MODE: tl.constexpr, TRANS: tl.constexpr, OUT_CONTIG: tl.constexpr, IN_CONTIG: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = (N + BLOCK_M - 1) // BLOCK_M
    grid_n = (P + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < P
    DT = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MODE == 3:
        if TRANS:
            # dX branch first, so that dropout's mask multiplies the accumulator before the base
            # GEMM joins it: one accumulator instead of two.
            acc = _rope_input_grad(acc, a_ptr, stride_am, m_ptr, cos_ptr, sin_ptr, rows, row_ok, cols, col0, K, D, R,
                                   PAD, N_CHUNKS, USED, SPAN, N_TILES, ACC, PRECISION, BLOCK_N, BLOCK_R)
            if DROPOUT:
                acc = acc * _keep_scale(seed, p, scale_ptr, rows, cols, K)
    for q0 in range(0, Q, BLOCK_K):
        offs_q = q0 + tl.arange(0, BLOCK_K)
        q_ok = offs_q < Q
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_q[None, :], mask=row_ok[:, None] & q_ok[None, :],
                    other=0.0)
        b_ok = q_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptr + cols[None, :] * stride_bp + offs_q[:, None] * stride_bq, mask=b_ok, other=0.0)
        if MODE == 1:
            if TRANS:
                delta = _shared_delta(m_ptr, offs_q[:, None], cols[None, :], K, D, R, PAD, b_ok, OUT_CONTIG, IN_CONTIG)
            else:
                delta = _shared_delta(m_ptr, cols[None, :], offs_q[:, None], K, D, R, PAD, b_ok, OUT_CONTIG, IN_CONTIG)
            b = b.to(ACC) + delta.to(ACC)
        acc = tl.dot(a, b.to(DT), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if MODE == 3:
        if not TRANS:
            acc = _rope_forward(acc, a_ptr, stride_am, m_ptr, cos_ptr, sin_ptr, seed, p, scale_ptr, rows, row_ok, cols,
                                col0, K, D, R, N_CHUNKS, DROPOUT, PRECISION, BLOCK_N, BLOCK_R)
    if MODE == 2:
        ok = row_ok[:, None] & col_ok[None, :]
        if TRANS:
            slot = _slot(cols, K, R, IN_CONTIG)
            extra = tl.load(u_ptr + rows[:, None] * stride_um + slot[None, :], mask=ok, other=0.0).to(ACC)
            extra += tl.load(u_ptr + rows[:, None] * stride_um + ((cols + K) % R)[None, :],
                             mask=ok & (cols < PAD)[None, :], other=0.0).to(ACC)
            if DROPOUT:
                extra = extra * _keep_scale(seed, p, scale_ptr, rows, cols, K)
        else:
            slot = _slot(cols, D, R, OUT_CONTIG)
            extra = tl.load(u_ptr + rows[:, None] * stride_um + slot[None, :], mask=ok, other=0.0).to(ACC)
        acc += extra
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# dM reduction: partial[s] = sum over the (chunk, row block) items of split s of G_c^T @ Z_c.
# Types 1-4 (ROPE = 0): one chunk, G = decompress^T(dY) [N, R] and Z = compress(dropout(x)) [N, R]
# read from the pre-pass buffers. Type 6 (ROPE = 1): G_c summed from dY over the output tiles,
# Z_c = the rotated chunk of dropout(x) built in registers (wrap-indexed), never stored.
# FLOPs: 2 N n_used R^2 (types 1-4: 2 N R^2). Bytes: type 6 reads x and dY once per dM tile
# column/row block (L2), writes SPLIT R^2 fp32 partials, summed by the launcher.
# Splits over (chunk, row block) keep every SM busy when R^2 / tile is small.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mora_dm_kernel(g_ptr, z_ptr, cos_ptr, sin_ptr, part_ptr, seed, p, scale_ptr,
                    N, R, K, D, N_CHUNKS, USED, SPAN, N_TILES, SPLIT, stride_gm, stride_zm,
                    ROPE: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_b = (R + BLOCK_B - 1) // BLOCK_B
    offs_a = (pid // n_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = (pid % n_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok = offs_a < R
    b_ok = offs_b < R
    DT = z_ptr.dtype.element_ty
    n_mblk = (N + BLOCK_M - 1) // BLOCK_M
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    for item in range(pid_s, n_mblk * USED, SPLIT):
        c = item // n_mblk
        rows = (item % n_mblk) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        if ROPE:
            g = _chunk_grad(g_ptr, stride_gm, rows, row_ok, c, offs_a, a_ok, R, D, SPAN, N_TILES, ACC)
            z = _rotated_chunk(z_ptr, stride_zm, cos_ptr, sin_ptr, seed, p, scale_ptr, rows, row_ok, c, offs_b, b_ok, R, K,
                               DROPOUT, ACC)
        else:
            g = tl.load(g_ptr + rows[:, None] * stride_gm + offs_a[None, :], mask=row_ok[:, None] & a_ok[None, :],
                        other=0.0)
            z = tl.load(z_ptr + rows[:, None] * stride_zm + offs_b[None, :], mask=row_ok[:, None] & b_ok[None, :],
                        other=0.0)
        acc = tl.dot(tl.trans(g.to(DT)), z.to(DT), acc, input_precision=PRECISION,
                     out_dtype=acc.dtype)
    tl.store(part_ptr + pid_s * R * R + offs_a[:, None] * R + offs_b[None, :], acc,
             mask=a_ok[:, None] & b_ok[None, :])
