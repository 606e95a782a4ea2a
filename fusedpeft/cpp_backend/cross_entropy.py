"""Masked / weighted cross-entropy (docs/contract.md §4) on the C++ row kernels.

Same API as fusedpeft.torch_backend.cross_entropy. The row kernel (csrc/cpu/cross_entropy.cpp,
csrc/cuda/kernels.cu) computes the online logsumexp per row in fp32 (fp64 for fp64 logits) and
skips rows whose scale is 0; the backward writes the gradient into a fresh buffer (from logits)
or over the logits themselves (linear_cross_entropy's fp32 chunk). Only lse [N] is saved between
forward and backward. linear_cross_entropy: chunked ATen matmuls around the same row kernel.
"""

from __future__ import annotations

import functools

import torch

import fusedpeft._C  # noqa: F401  (registers torch.ops.fusedpeft_C)
from fusedpeft.cpp_backend import unavailable_reason  # noqa: F401  (read by fusedpeft.backends)
from fusedpeft.host.cross_entropy import (
    accumulation_dtype,
    by_chunks,
    chunk_bytes_per_logit,
    chunked_linear_pass,
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


def _chunk_loss(make_logits, labels, scale, with_grad: bool, label_smoothing: float, z_loss: float,
                softcap: float | None):
    """linear_cross_entropy_pass's per-chunk step (see host.cross_entropy.chunked_linear_pass): the row
    kernel reads the logits in their own dtype for the loss alone, or turns their fp32 copy into
    d(scale l)/dlogits in place."""
    if not with_grad:
        rows_loss, _ = _ops.ce_forward(make_logits(), labels, scale, label_smoothing, z_loss, _cap(softcap))
        return rows_loss, None
    logits = make_logits()
    z = logits.to(accumulation_dtype(logits.dtype))
    del logits
    return _ops.ce_loss_and_grad_(z, labels, scale, label_smoothing, z_loss, _cap(softcap)), z


def linear_cross_entropy_pass(hidden, weight, bias, labels, scale, label_smoothing: float, z_loss: float,
                              softcap: float | None, chunk_budget_bytes: int, need_hidden: bool, need_weight: bool,
                              need_bias: bool):
    """torch_backend.linear_cross_entropy_pass (same arguments and returns) with the row kernel as
    the per-chunk step: logits = h @ W^T (+ bias) by ATen, the loss and dlogits by the kernel, the
    contractions into the gradients by ATen; chunk x V is the largest temporary."""
    chunk_loss = functools.partial(_chunk_loss, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    with_grad = need_hidden or need_weight or need_bias
    # the kernel applies softcap per row (no tanh buffer); the loss alone reads the logits as they are
    bytes_per_logit = chunk_bytes_per_logit(hidden.dtype, None, True) if with_grad else hidden.element_size()
    return chunked_linear_pass(chunk_loss, bytes_per_logit, hidden, weight, bias, labels, scale, chunk_budget_bytes,
                               need_hidden, need_weight, need_bias)


# the backend API of fusedpeft.ops.cross_entropy on this module's pass
linear_cross_entropy_forward, linear_cross_entropy_backward = by_chunks(linear_cross_entropy_pass)
