"""Masked / weighted cross-entropy (docs/contract.md §4) on the PyTorch path, chunked and in place.

Per row t: w_t already folded with the reduction's normaliser into ``row_scale[t]`` by the op
layer, so every function here computes sum_t row_scale[t] * l_t (or the per-row products).
Rows with row_scale == 0 are skipped: no softmax work, and in linear_cross_entropy no matmul.

- cross_entropy_forward: logits chunk -> fp32 copy -> softcap, logsumexp, loss; saves lse only
  (F.cross_entropy keeps a full rows x V log-softmax for backward).
- cross_entropy_backward: the gradient is recomputed chunk by chunk from logits and lse.
- linear_cross_entropy_pass: hidden rows in chunks whose logits fit ``chunk_budget_bytes``; each
  chunk's logits are turned into dlogits in place and immediately contracted into grad_hidden,
  grad_weight and grad_bias, so rows x V never exists. Its loop, chunked_linear_pass
  (fusedpeft/host/cross_entropy.py), is the one every backend runs (cpu and triton give only their
  per-chunk step and its bytes per logit).
"""

from __future__ import annotations

import functools

import torch

from fusedpeft.host.cross_entropy import (
    accumulation_dtype,
    active_rows,
    apply_softcap_,
    by_chunks,
    chunk_bytes_per_logit,
    chunked_linear_pass,
)

LOGITS_CHUNK_ELEMENTS = 1 << 22  # fp32 temporaries of cross_entropy_* stay <= 16 MiB


def _chunks(n: int, rows_per_chunk: int):
    for start in range(0, n, max(1, rows_per_chunk)):
        yield slice(start, min(start + max(1, rows_per_chunk), n))


def loss_and_probs_(z, labels, label_smoothing: float, z_loss: float):
    """z [n, V] (capped logits) <- softmax(z) in place. Returns (l_t [n], lse [n])."""
    z_target = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    z_mean = z.mean(1) if label_smoothing else None
    z_max = z.amax(1)
    z.sub_(z_max.unsqueeze(1)).exp_()
    sum_exp = z.sum(1)
    lse = z_max + sum_exp.log()
    z.div_(sum_exp.unsqueeze(1))
    loss = (1.0 - label_smoothing) * (lse - z_target) + z_loss * lse * lse
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z_mean)
    return loss, lse


def probs_to_grad_(p, labels, scale, lse, label_smoothing: float, z_loss: float, tanh):
    """p [n, V] (softmax) <- d(scale_t * l_t)/d(raw logits) in place.

    dl/dz_j = p_j (1 + 2 z_loss lse) - (1 - eps) [j == y] - eps / V, then the softcap chain rule
    (1 - tanh^2) when tanh = tanh(z / softcap) [n, V] (apply_softcap_; None without softcap). The
    target column is recomputed from p in the accumulation dtype.
    """
    p.mul_((scale * (1.0 + 2.0 * z_loss * lse)).unsqueeze(1))
    if label_smoothing:
        p.sub_((scale * (label_smoothing / p.shape[1])).unsqueeze(1))
    rows = torch.arange(p.shape[0], device=p.device)
    p[rows, labels] -= scale * (1.0 - label_smoothing)
    if tanh is not None:
        p.mul_(tanh.mul_(tanh).neg_().add_(1.0))


def cross_entropy_forward(logits, labels, row_scale, reduce: bool, label_smoothing: float, z_loss: float,
                          softcap: float | None):
    """logits [N, V], labels [N], row_scale [N] -> (loss: 0-dim if reduce else [N], lse [N]).

    Both outputs are float32 (float64 for float64 logits); lse is 0 on skipped rows.
    """
    acc = accumulation_dtype(logits.dtype)
    n_rows, vocab = logits.shape
    loss_rows = torch.zeros(n_rows, dtype=acc, device=logits.device)
    lse = torch.zeros(n_rows, dtype=acc, device=logits.device)
    active = active_rows(row_scale)
    for part in _chunks(active.numel(), LOGITS_CHUNK_ELEMENTS // max(1, vocab)):
        idx = active[part]
        z = logits.index_select(0, idx).to(acc)
        apply_softcap_(z, softcap, keep_tanh=False)
        rows_loss, rows_lse = loss_and_probs_(z, labels.index_select(0, idx), label_smoothing, z_loss)
        loss_rows.index_copy_(0, idx, rows_loss)
        lse.index_copy_(0, idx, rows_lse)
    weighted = loss_rows * row_scale.to(acc)
    return (weighted.sum() if reduce else weighted), lse


def cross_entropy_backward(grad_loss, logits, labels, row_scale, lse, label_smoothing: float, z_loss: float,
                           softcap: float | None):
    """grad_loss (0-dim or [N]) -> grad_logits [N, V] in logits' dtype; skipped rows are 0."""
    acc = accumulation_dtype(logits.dtype)
    scale = row_scale.to(acc) * grad_loss.to(acc)
    active = active_rows(scale)
    grad = torch.zeros_like(logits) if active.numel() < logits.shape[0] else torch.empty_like(logits)
    for part in _chunks(active.numel(), LOGITS_CHUNK_ELEMENTS // max(1, logits.shape[1])):
        idx = active[part]
        z = logits.index_select(0, idx).to(acc)
        tanh = apply_softcap_(z, softcap, keep_tanh=True)
        rows_lse = lse.index_select(0, idx)
        z.sub_(rows_lse.unsqueeze(1)).exp_()
        probs_to_grad_(z, labels.index_select(0, idx), scale.index_select(0, idx), rows_lse, label_smoothing,
                       z_loss, tanh)
        grad.index_copy_(0, idx, z.to(logits.dtype))
    return grad


def _chunk_loss(make_logits, labels, scale, with_grad: bool, label_smoothing: float, z_loss: float,
                softcap: float | None):
    """linear_cross_entropy_pass's per-chunk step (see host.cross_entropy.chunked_linear_pass), in PyTorch."""
    logits = make_logits()
    z = logits.to(accumulation_dtype(logits.dtype))
    del logits
    tanh = apply_softcap_(z, softcap, keep_tanh=with_grad)
    rows_loss, lse = loss_and_probs_(z, labels, label_smoothing, z_loss)
    if not with_grad:
        return rows_loss, None
    probs_to_grad_(z, labels, scale, lse, label_smoothing, z_loss, tanh)
    return rows_loss, z


def linear_cross_entropy_pass(hidden, weight, bias, labels, scale, label_smoothing: float, z_loss: float,
                              softcap: float | None, chunk_budget_bytes: int, need_hidden: bool, need_weight: bool,
                              need_bias: bool):
    """One chunked pass over the rows with scale != 0.

    hidden [N, H], weight [V, H], bias [V] | None, labels [N], scale [N] (row_scale, times the
    incoming gradient in backward). Returns (l_t [N] unscaled, grad_hidden [N, H] | None,
    grad_weight [V, H] | None, grad_bias [V] | None); grads are d(sum_t scale_t l_t).
    """
    chunk_loss = functools.partial(_chunk_loss, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    bytes_per_logit = chunk_bytes_per_logit(hidden.dtype, softcap, need_hidden or need_weight or need_bias)
    return chunked_linear_pass(chunk_loss, bytes_per_logit, hidden, weight, bias, labels, scale, chunk_budget_bytes,
                               need_hidden, need_weight, need_bias)


# the backend API of fusedpeft.ops.cross_entropy on this module's pass
linear_cross_entropy_forward, linear_cross_entropy_backward = by_chunks(linear_cross_entropy_pass)
