"""Masked / weighted cross-entropy (SPEC §4) on the C++ row kernels.

Same API as fusedpeft.torch_backend.cross_entropy. The row kernel (csrc/cpu/cross_entropy.cpp,
csrc/cuda/kernels.cu) computes the online logsumexp per row in fp32 (fp64 for fp64 logits) and
skips rows whose scale is 0; the backward writes the gradient into a fresh buffer (from logits)
or over the logits themselves (linear_cross_entropy's fp32 chunk). Only lse [N] is saved between
forward and backward. linear_cross_entropy: chunked ATen matmuls around the same row kernel.
"""

from __future__ import annotations

import torch

import fusedpeft._C  # noqa: F401  (registers torch.ops.fusedpeft_C)
from fusedpeft.cpp_backend import unavailable_reason  # noqa: F401  (read by fusedpeft.backends)
from fusedpeft.torch_backend.cross_entropy import (
    accumulation_dtype,
    active_rows,
    backward_by_chunks,
    forward_by_chunks,
    rows_per_chunk,
)

_ops = torch.ops.fusedpeft_C


def _cap(softcap: float | None) -> float:
    return 0.0 if softcap is None else float(softcap)


def cross_entropy_forward(logits, labels, row_scale, reduce: bool, label_smoothing: float, z_loss: float,
                          softcap: float | None):
    """logits [N, V], labels [N] int64, row_scale [N] -> (loss: 0-dim if reduce else [N], lse [N]).

    Both outputs are float32 (float64 for float64 logits); lse is 0 on skipped rows.
    """
    acc = accumulation_dtype(logits.dtype)
    row_scale = row_scale.to(acc)
    loss_rows, lse = _ops.ce_forward(logits, labels, row_scale, label_smoothing, z_loss, _cap(softcap))
    weighted = loss_rows * row_scale
    return (weighted.sum() if reduce else weighted), lse


def cross_entropy_backward(grad_loss, logits, labels, row_scale, lse, label_smoothing: float, z_loss: float,
                           softcap: float | None):
    """grad_loss (0-dim or [N]) -> grad_logits [N, V] in logits' dtype; skipped rows are 0."""
    acc = accumulation_dtype(logits.dtype)
    scale = (row_scale.to(acc) * grad_loss.to(acc)).expand(logits.shape[0]).contiguous()
    return _ops.ce_backward(logits, labels, scale, lse, label_smoothing, z_loss, _cap(softcap))


def _chunks(n: int, step: int):
    for start in range(0, n, max(1, step)):
        yield slice(start, min(start + max(1, step), n))


def linear_cross_entropy_pass(hidden, weight, bias, labels, scale, label_smoothing: float, z_loss: float,
                              softcap: float | None, chunk_budget_bytes: int, need_hidden: bool, need_weight: bool,
                              need_bias: bool):
    """One chunked pass over the rows with scale != 0 (see torch_backend.linear_cross_entropy_pass).

    hidden [N, H], weight [V, H], bias [V] | None, labels [N], scale [N] -> (l_t [N] unscaled,
    grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None). Per chunk:
    logits = h @ W^T (+ bias) by ATen, turned into d(scale l)/dlogits in place by the row kernel,
    then contracted into the gradients by ATen; chunk x V is the largest temporary.
    """
    acc = accumulation_dtype(hidden.dtype)
    with_grad = need_hidden or need_weight or need_bias
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    scale = scale.to(acc)
    loss_rows = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    active = active_rows(scale)
    step = rows_per_chunk(vocab, hidden.dtype, chunk_budget_bytes, softcap, with_grad)
    for part in _chunks(active.numel(), step):
        idx = active[part]
        h = hidden.index_select(0, idx)
        rows_labels = labels.index_select(0, idx)
        rows_scale = scale.index_select(0, idx)
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        if not with_grad:
            rows_loss, _ = _ops.ce_forward(logits, rows_labels, rows_scale, label_smoothing, z_loss, _cap(softcap))
            loss_rows.index_copy_(0, idx, rows_loss)
            del logits  # before the next chunk's logits exist: one chunk alive at a time
            continue
        z = logits.to(acc)
        del logits
        rows_loss = _ops.ce_loss_and_grad_(z, rows_labels, rows_scale, label_smoothing, z_loss, _cap(softcap))
        loss_rows.index_copy_(0, idx, rows_loss)
        if need_bias:
            grad_bias += z.sum(0)
        if need_weight:
            grad_weight.addmm_(z.t(), h.to(acc))
        if need_hidden:
            grad_hidden.index_copy_(0, idx, z.to(hidden.dtype) @ weight)
        del z
    return (loss_rows, grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def linear_cross_entropy_forward(*args):
    """torch_backend.cross_entropy.forward_by_chunks with this module's pass (same arguments)."""
    return forward_by_chunks(linear_cross_entropy_pass, *args)


def linear_cross_entropy_backward(*args):
    """torch_backend.cross_entropy.backward_by_chunks with this module's pass (same arguments)."""
    return backward_by_chunks(linear_cross_entropy_pass, *args)
