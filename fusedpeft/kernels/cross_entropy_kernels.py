"""Triton row kernels of the masked / weighted cross-entropy (docs/contract.md §4).

One program per row of logits [N, V] (row stride ``stride_row``, unit column stride). Per row t,
with z the logits in the accumulation dtype ACC (fp32, or fp64 for fp64 logits) and s_t the
per-row scale the op layer folded from ignore_index, instruction mask/weight, token weights and
the "mean" normaliser:

    u = softcap * tanh(z / softcap)          (or u = z without softcap)
    lse = logsumexp(u)
    l_t = (1 - eps) (lse - u_y) + eps (lse - mean(u)) + z_loss lse^2
    dl_t/du_j = p_j (1 + 2 z_loss lse) - (1 - eps) [j == y] - eps / V,   p = exp(u - lse)
    dl_t/dz_j = dl_t/du_j (1 - tanh^2(z_j / softcap))

Rows with s_t == 0 do no softmax work: their loop bounds are 0 (the forward) or they only
store zeros (the backward). Labels arrive clamped into [0, V) by the op layer and are clamped
again here, so no address outside the row is ever formed.

tanh is built from exp (libdevice is missing under the interpreter): t = (1 - e) / (1 + e) with
e = exp(-2|x|), no overflow, absolute error a few ulp.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _ce_fwd_kernel(logits_ptr, labels_ptr, scale_ptr, loss_ptr, lse_ptr, V, stride_row, eps, z_loss, softcap,
                   HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: lse and the scaled loss s_t * l_t.

    Algorithm: one sweep over V in BLOCK_V tiles with a running max m and a rescaled sum
    d <- d exp(m - m') + sum exp(u - m') (online logsumexp, Milakov & Gimelshein 2018), in ACC;
    the target logit is one scalar load; mean(u) (label smoothing only) is summed in the sweep.
    Fuses: upcast, softcap, logsumexp, label smoothing, z-loss, the per-row scale.
    Writes loss_ptr[t] = s_t * l_t and lse_ptr[t] = lse (both 0 on rows with s_t == 0).
    Limits: none on V (looped); N * stride_row may exceed 2^31 (int64 row offsets).
    Cost per active row: V reads of the input dtype, ~6 V FLOP + V exp (+ V exp and ~6 V FLOP for
    softcap); skipped rows read nothing. Minimum bytes = N_active * V * itemsize + 12 N: the floor
    for any exact loss from logits (each logit read once).
    """
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(scale_ptr + row).to(ACC)
    active = s != 0.0
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    total = tl.zeros((), ACC)
    end = tl.where(active, V, 0)
    for start in range(0, end, BLOCK_V):
        offs = start + cols
        inside = offs < V
        u = tl.load(row_ptr + offs, mask=inside, other=0.0).to(ACC)
        if HAS_SOFTCAP:
            u = softcap * _tanh(u / softcap)
        if SMOOTHING:
            total += tl.sum(tl.where(inside, u, 0.0), axis=0)
        u = tl.where(inside, u, float("-inf"))
        m_new = tl.maximum(m, tl.max(u, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), axis=0)
        m = m_new
    y = tl.minimum(tl.maximum(tl.load(labels_ptr + row), 0), V - 1)
    u_y = tl.load(row_ptr + y, mask=active, other=0.0).to(ACC)
    if HAS_SOFTCAP:
        u_y = softcap * _tanh(u_y / softcap)
    lse = tl.where(active, m, 0.0) + tl.log(tl.where(active, d, 1.0))
    loss = (1.0 - eps) * (lse - u_y) + z_loss * lse * lse
    if SMOOTHING:
        loss += eps * (lse - total / V)
    tl.store(loss_ptr + row, (s * loss).to(loss_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))


@triton.jit
def _ce_bwd_kernel(logits_ptr, labels_ptr, scale_ptr, lse_ptr, grad_loss_ptr, grad_ptr, V, stride_row,
                   stride_grad_row, stride_grad_loss, eps, z_loss, softcap,
                   HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: grad[t, :] = g_t * dl_t/dz with g_t = s_t * grad_loss[t * stride_grad_loss].

    Algorithm: one sweep over V in BLOCK_V tiles: p = exp(u - lse) from the saved lse, the
    formula in the module doc evaluated in ACC, the target column's -(1 - eps) folded in before
    the single rounding to the output dtype (so dz_y = g (p_y - 1) loses nothing when p_y -> 1).
    grad_ptr may equal logits_ptr (gradient in place: each tile is read before it is written).
    Rows with g_t == 0 store zeros without reading. Fuses: upcast, softcap and its chain rule,
    softmax, label smoothing, z-loss, the per-row scale and the incoming gradient.
    Cost per active row: V reads + V writes of the input dtype, ~8 V FLOP + V exp (+ V exp and
    ~8 V FLOP for softcap); per zero row: V writes. Minimum bytes = N_active V itemsize (read) +
    N V itemsize (write) + 16 N: the floor for a gradient from logits and lse (each logit read
    once, each gradient element written once).
    """
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(scale_ptr + row).to(ACC) * tl.load(grad_loss_ptr + row * stride_grad_loss).to(ACC)
    active = g != 0.0
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_ptr + row * stride_grad_row
    cols = tl.arange(0, BLOCK_V)
    y = tl.minimum(tl.maximum(tl.load(labels_ptr + row), 0), V - 1)
    lse = tl.load(lse_ptr + row).to(ACC)
    p_scale = g * (1.0 + 2.0 * z_loss * lse)
    g_target = g * (1.0 - eps)
    g_uniform = g * eps / V
    end = tl.where(active, V, 0)
    for start in range(0, end, BLOCK_V):
        offs = start + cols
        inside = offs < V
        z = tl.load(row_ptr + offs, mask=inside, other=0.0).to(ACC)
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        grad = p_scale * tl.exp(z - lse) - g_uniform - tl.where(offs == y, g_target, 0.0)
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        tl.store(out_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)
    zero_end = V - end
    for start in range(0, zero_end, BLOCK_V):
        offs = start + cols
        tl.store(out_ptr + offs, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=offs < V)
