"""Triton row kernel of linear_log_probs' forward: every per-token statistic of a row of logits in
ONE sweep over the vocabulary (docs/contract.md §4; the PyTorch twin is
host/log_probs.py's _forward_step, which reads each chunk several times).

Per row t of logits [n, V] (row stride ``stride_row``, unit column stride), in the accumulation
dtype ACC (fp32, or fp64 for fp64 logits), with the same transform as the torch backend:

    z = softcap * tanh(x / softcap) (HAS_SOFTCAP), then z = z * inv_temperature
    lse = logsumexp(z),  log p_y = z_y - lse
    H = lse - sum_j p_j z_j,  log sum_j p_j^2,  mean_j z_j
    is_top1 = (first index of max_j z_j) == y   (torch's max / argmax: the first maximum wins ties)

tanh is the cross-entropy kernels' _tanh (built from exp). ACC is the dtype of the stats buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedpeft.kernels.cross_entropy_kernels import _tanh


@triton.jit
def _transform(x, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return x * inv_temperature


@triton.jit
def _log_probs_fwd_kernel(logits_ptr, targets_ptr, rows_ptr, log_probs_ptr, stats_ptr, V, stride_row, stride_stat,
                          softcap, inv_temperature, ENTROPY: tl.constexpr, LOG_SUM_SQ: tl.constexpr, MEAN: tl.constexpr,
                          TOP1: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per program t (a row of the chunk): log p_y into log_probs_ptr[t], and into column
    r = rows_ptr[t] of stats [6, stride_stat]: row 1 entropy, 2 log sum p^2, 3 mean logit,
    4 is_top1 (1.0 / 0.0), each only when its constexpr flag is set (the caller zeroes stats), and
    row 5 lse; row 0 is left to the caller. targets_ptr is indexed by r too (values in [0, V),
    clamped again here). ACC, the accumulation dtype, is stats' dtype.

    Algorithm: one sweep over V in BLOCK_V tiles keeping, relative to the running max m,
      d = sum e_j, a = sum e_j (z_j - m), q = sum e_j^2 (e_j = exp(z_j - m)), the sum of z and the
    first index of the running max; when m rises to m' (alpha = exp(m - m')):
      d <- alpha d, a <- alpha (a + (m - m') d), q <- alpha^2 q   (online softmax, Milakov &
    Gimelshein 2018, extended to the entropy's sum p (z - m)). Then lse = m + log d,
    H = log d - a / d (the torch backend's lse - sum p d, no cancellation against m),
    log sum p^2 = log q - 2 log d, mean = sum z / V; z_y is one scalar load (a cached re-read).
    Cost per row: V reads of the input dtype, the only pass over the chunk's logits (the torch
    step reads and writes fp32 [rows, V] temporaries about ten times with every output asked);
    V exp and ~4 V FLOP for lse, +3 V FLOP for the entropy, +2 V for log sum p^2, +1 V for the
    mean, +3 V (compare, select, min) for is_top1, +V for the temperature, +V exp and ~8 V for
    softcap. Minimum bytes = n V itemsize + 40 n (row id and target int64, log p and five fp32
    stats): the floor for statistics of every logit. In bf16 with every output: ~7 FLOP and 0.5
    exp per byte (1 exp per byte with softcap); an H100 at full bandwidth (3.35 TB/s) affords ~20
    fp32 FLOP and ~1.2 exp (16 SFU ops per SM per clock) per byte: memory-bound, softcap near the
    exp limit (estimates, not measured: no GPU here). Limits: none on V (looped); int64 row offsets.
    """
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    t = tl.program_id(0).to(tl.int64)
    r = tl.load(rows_ptr + t)
    row_ptr = logits_ptr + t * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    a = tl.zeros((), ACC)
    q = tl.zeros((), ACC)
    total = tl.zeros((), ACC)
    first = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inside = offs < V
        z = _transform(tl.load(row_ptr + offs, mask=inside, other=0.0).to(ACC), softcap, inv_temperature,
                       HAS_SOFTCAP)
        if MEAN:
            total += tl.sum(tl.where(inside, z, 0.0), axis=0)
        z = tl.where(inside, z, float("-inf"))
        tile_max = tl.max(z, axis=0)
        if TOP1:
            tile_first = tl.min(tl.where(z == tile_max, offs, V), axis=0)
            first = tl.where(tile_max > m, tile_first, first)  # an equal later maximum keeps the first
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        e = tl.exp(z - m_new)  # 0 outside the row
        if ENTROPY:
            shift = (tl.where(d > 0.0, m, m_new) - m_new) * d  # 0 on the first tile (no -inf * 0)
            a = alpha * (a + shift) + tl.sum(e * tl.where(inside, z - m_new, 0.0), axis=0)
        if LOG_SUM_SQ:
            q = alpha * alpha * q + tl.sum(e * e, axis=0)
        d = d * alpha + tl.sum(e, axis=0)
        m = m_new
    y = tl.minimum(tl.maximum(tl.load(targets_ptr + r), 0), V - 1)
    z_y = _transform(tl.load(row_ptr + y).to(ACC), softcap, inv_temperature, HAS_SOFTCAP)
    log_d = tl.log(d)
    lse = m + log_d
    tl.store(log_probs_ptr + t, (z_y - lse).to(log_probs_ptr.dtype.element_ty))
    out = stats_ptr + r  # the caller zeroes stats: outputs not asked for stay 0
    if ENTROPY:
        tl.store(out + stride_stat, (log_d - a / d).to(ACC))
    if LOG_SUM_SQ:
        tl.store(out + 2 * stride_stat, (tl.log(q) - 2.0 * log_d).to(ACC))
    if MEAN:
        tl.store(out + 3 * stride_stat, (total / V).to(ACC))
    if TOP1:
        tl.store(out + 4 * stride_stat, tl.where(first == y, 1.0, 0.0).to(ACC))
    tl.store(out + 5 * stride_stat, lse.to(ACC))
