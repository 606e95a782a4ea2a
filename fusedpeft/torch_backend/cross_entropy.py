"""Masked / weighted cross-entropy (docs/contract.md §4) on the PyTorch path, chunked and in place.

Per row t: w_t already folded with the reduction's normaliser into ``row_scale[t]`` by the op
layer, so every function here computes sum_t row_scale[t] * l_t (or the per-row products).
Rows with row_scale == 0 are skipped: no softmax work, and in linear_cross_entropy no matmul.

- cross_entropy_forward: logits chunk -> fp32 copy -> softcap, logsumexp, loss; saves lse only
  (F.cross_entropy keeps a full rows x V log-softmax for backward).
- cross_entropy_backward: the gradient is recomputed chunk by chunk from logits and lse.
- linear_cross_entropy_pass: hidden rows in chunks whose logits fit ``chunk_budget_bytes``; each
  chunk's logits are turned into dlogits in place and immediately contracted into grad_hidden,
  grad_weight and grad_bias, so rows x V never exists. Its loop, chunked_linear_pass, is the one
  every backend runs (cpu and triton give only their per-chunk step and its bytes per logit).
"""

from __future__ import annotations

import functools

import torch

LOGITS_CHUNK_ELEMENTS = 1 << 22  # fp32 temporaries of cross_entropy_* stay <= 16 MiB


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def active_rows(scale: torch.Tensor) -> torch.Tensor:
    """Indices [n_active] of the rows with a non-zero scale.

    On GPU tensors ``nonzero`` is one host sync per pass, kept on purpose: the chunk loop must know
    how many rows remain to launch only their GEMMs, and without the count it would either run the
    GEMMs of every zero-weight row (a quarter to a half of the rows in completion-only SFT, and the
    GEMMs are nearly all of the cost) or launch chunks for rows that may not exist. The sync costs
    one pipeline drain per loss call (the loss's own GEMMs then queue behind it); not yet measured
    on a GPU. No sync on CPU tensors."""
    return scale.nonzero().squeeze(1)


def _chunks(n: int, rows_per_chunk: int):
    for start in range(0, n, max(1, rows_per_chunk)):
        yield slice(start, min(start + max(1, rows_per_chunk), n))


def apply_softcap_(z: torch.Tensor, softcap: float | None, keep_tanh: bool) -> torch.Tensor | None:
    """z [n, V] <- softcap * tanh(z / softcap) in place; returns tanh(z / softcap) when asked."""
    if softcap is None:
        return None
    if not keep_tanh:
        z.div_(softcap).tanh_().mul_(softcap)
        return None
    tanh = torch.div(z, softcap).tanh_()
    torch.mul(tanh, softcap, out=z)
    return tanh


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


def probs_to_grad_(p, labels, scale, lse, label_smoothing: float, z_loss: float, tanh, softcap):
    """p [n, V] (softmax) <- d(scale_t * l_t)/d(raw logits) in place.

    dl/dz_j = p_j (1 + 2 z_loss lse) - (1 - eps) [j == y] - eps / V, then the softcap chain rule
    (1 - tanh^2). The target column is recomputed from p in the accumulation dtype.
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
                       z_loss, tanh, softcap)
        grad.index_copy_(0, idx, z.to(logits.dtype))
    return grad


def rows_per_chunk(vocab: int, bytes_per_logit: int, chunk_budget_bytes: int) -> int:
    """Rows whose chunk temporaries ([rows, V] at ``bytes_per_logit`` bytes per logit, as the
    backend's chunk step declares) fit the budget; a multiple of 128 (whole GEMM tiles) when at
    least 256 rows fit. The one chunk-size rule of every backend."""
    rows = max(1, chunk_budget_bytes // (vocab * bytes_per_logit))
    return rows // 128 * 128 if rows >= 256 else rows


def chunked_linear_pass(chunk_loss, bytes_per_logit: int, hidden, weight, bias, labels, scale,
                        chunk_budget_bytes: int, need_hidden: bool, need_weight: bool, need_bias: bool):
    """The chunk loop of linear_cross_entropy_pass, shared by every backend (torch, cpu, triton).

    Rows with scale != 0 go in chunks of rows_per_chunk(V, bytes_per_logit, budget) rows. Per
    chunk, the backend's ``chunk_loss(make_logits, labels, scale, with_grad)`` returns (l_t [rows]
    unscaled, in the accumulation dtype; d(sum scale l)/dlogits [rows, V] in any float dtype, or
    None without gradients). It calls make_logits() itself, so it holds the only reference and
    can let the input-dtype logits go once upcast (or write the gradient over them). The gradient
    is contracted into grad_hidden, grad_weight and grad_bias at once, so one chunk's logits are
    alive at a time and rows x V never is.

    grad_weight of a 16-bit head: never an fp32 [V, H] accumulator outside the budget. When the
    accumulator and its final 16-bit copy fit in half the budget, it is taken out of the budget
    (the chunks get the rest) and the sum is fp32 with one final rounding. Otherwise the gradient
    is accumulated in the head's own dtype. Precision then: each chunk adds ONE GEMM dlogits^T h
    whose sum over the chunk's rows runs in fp32 (cuBLAS / oneDNN compute type for 16-bit
    operands; beta = 1 reads the running sum into that fp32 accumulation), rounded once to the
    head's dtype: K chunks give K roundings of unit roundoff u (2^-8 bf16, 2^-11 fp16) instead
    of one, an error <= K u sum|partials|, ~sqrt(K) u typically (tests/test_losses.py: 64 chunks,
    3.7x the one-rounding error in bf16), against the u of the stored 16-bit gradient itself.
    K = active rows / rows per chunk (~35 for 8192 Llama-3 rows at the default budget); a larger
    chunk_budget_bytes buys fp32 accumulation. fp32 / fp64 heads accumulate in their own dtype
    exactly as before. Same arguments and returns as linear_cross_entropy_pass.
    """
    acc = accumulation_dtype(hidden.dtype)
    with_grad = need_hidden or need_weight or need_bias
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    scale = scale.to(acc)
    active = active_rows(scale)
    compact = active.numel() < n_rows
    new = torch.zeros if compact else torch.empty
    loss_rows = new(n_rows, dtype=acc, device=hidden.device)
    grad_hidden = new(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    fp32_weight_grad = need_weight and weight.dtype != acc and \
        weight.numel() * (scale.element_size() + weight.element_size()) <= chunk_budget_bytes // 2
    if fp32_weight_grad:
        chunk_budget_bytes -= weight.numel() * (scale.element_size() + weight.element_size())
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    else:
        grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    step = rows_per_chunk(vocab, bytes_per_logit, chunk_budget_bytes)
    for start in range(0, active.numel(), step):
        rows = slice(start, min(start + step, active.numel()))
        idx = active[rows] if compact else None
        pick = (lambda t: t.index_select(0, idx)) if compact else (lambda t: t[rows])
        h = pick(hidden)

        def make_logits(h=h):
            return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())

        rows_loss, dz = chunk_loss(make_logits, pick(labels), pick(scale), with_grad)
        if compact:
            loss_rows.index_copy_(0, idx, rows_loss)
        else:
            loss_rows[rows] = rows_loss
        if dz is None:
            continue
        if need_bias:
            grad_bias += dz.sum(0, dtype=acc)
        if fp32_weight_grad:
            _add_weight_grad_fp32(grad_weight, dz, h)
        dz = dz.to(weight.dtype)  # no-op unless an fp32 gradient of 16-bit logits (counted in bytes_per_logit)
        if need_weight and not fp32_weight_grad:
            grad_weight.addmm_(dz.t(), h)
        if need_hidden and compact:
            grad_hidden.index_copy_(0, idx, dz @ weight)
        elif need_hidden:
            torch.matmul(dz, weight, out=grad_hidden[rows])
        del dz  # before the next chunk's logits exist
    if fp32_weight_grad:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_rows, grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype)


def _add_weight_grad_fp32(grad_weight, dz, h) -> None:
    """grad_weight [V, H] (fp32) += dz^T [V, c] @ h [c, H] (16-bit h; dz fp32 or 16-bit)."""
    if dz.dtype != grad_weight.dtype and grad_weight.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):
        # cuBLAS: 16-bit operands, fp32 accumulator and output (torch >= 2.8), no fp32 operand copies
        torch.addmm(grad_weight, dz.t(), h, out_dtype=grad_weight.dtype, out=grad_weight)
        return
    grad_weight.addmm_(dz.t().to(grad_weight.dtype), h.to(grad_weight.dtype))


def chunk_bytes_per_logit(dtype: torch.dtype, softcap, with_grad: bool) -> int:
    """Bytes per logit of this backend's chunk step: the logits in the input dtype (freed once
    upcast), their copy in the accumulation dtype turned into dlogits in place, tanh for softcap
    gradients, and the input-dtype dlogits before the GEMMs."""
    acc_size = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    in_size = torch.empty((), dtype=dtype).element_size()
    per_element = acc_size * (2 if (softcap is not None and with_grad) else 1)
    if in_size != acc_size:
        per_element += in_size * (2 if with_grad else 1)
    return per_element


def _chunk_loss(make_logits, labels, scale, with_grad: bool, label_smoothing: float, z_loss: float,
                softcap: float | None):
    """linear_cross_entropy_pass's per-chunk step (see chunked_linear_pass), in PyTorch."""
    logits = make_logits()
    z = logits.to(accumulation_dtype(logits.dtype))
    del logits
    tanh = apply_softcap_(z, softcap, keep_tanh=with_grad)
    rows_loss, lse = loss_and_probs_(z, labels, label_smoothing, z_loss)
    if not with_grad:
        return rows_loss, None
    probs_to_grad_(z, labels, scale, lse, label_smoothing, z_loss, tanh, softcap)
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


def forward_by_chunks(run_pass, hidden, weight, bias, labels, row_scale, reduce: bool, label_smoothing: float,
                      z_loss: float, softcap: float | None, chunk_budget_bytes: int, need_hidden: bool,
                      need_weight: bool, need_bias: bool):
    """linear_cross_entropy_forward on top of a chunked pass with linear_cross_entropy_pass's arguments.

    hidden [N, H], weight [V, H], bias [V] | None, labels [N], row_scale [N] -> (loss: 0-dim if
    reduce else [N], grad_hidden | None, grad_weight | None, grad_bias | None). With reduce, the
    incoming gradient is one scalar, so the gradients are computed here, in the same pass as the
    loss, and only scaled in backward. Without reduce they are left to backward.
    """
    precompute = reduce and (need_hidden or need_weight or need_bias)
    loss_rows, *grads = run_pass(
        hidden, weight, bias, labels, row_scale, label_smoothing, z_loss, softcap, chunk_budget_bytes,
        need_hidden and precompute, need_weight and precompute, need_bias and precompute)
    weighted = loss_rows * row_scale.to(loss_rows.dtype)
    return (weighted.sum() if reduce else weighted), *grads


def backward_by_chunks(run_pass, grad_loss, hidden, weight, bias, labels, row_scale, label_smoothing: float,
                       z_loss: float, softcap: float | None, chunk_budget_bytes: int, need_hidden: bool,
                       need_weight: bool, need_bias: bool):
    """grad_loss [N] (reduction "none") -> (grad_hidden | None, grad_weight | None, grad_bias | None),
    recomputed by ``run_pass`` with grad_loss folded into the row scale."""
    scale = row_scale.to(accumulation_dtype(hidden.dtype)) * grad_loss
    _, *grads = run_pass(hidden, weight, bias, labels, scale, label_smoothing, z_loss, softcap, chunk_budget_bytes,
                         need_hidden, need_weight, need_bias)
    return grads


def linear_cross_entropy_forward(*args):
    """forward_by_chunks with this module's pass (same arguments after run_pass)."""
    return forward_by_chunks(linear_cross_entropy_pass, *args)


def linear_cross_entropy_backward(*args):
    """backward_by_chunks with this module's pass (same arguments after run_pass)."""
    return backward_by_chunks(linear_cross_entropy_pass, *args)
