"""The host side of chunked linear cross-entropy (docs/contract.md §4), shared by every backend:
the chunk loop (chunked_linear_pass: zero-scale rows dropped, chunks sized by one rule, each
chunk's dlogits contracted into the gradients at once, so rows x V never exists) and the forward /
backward built on a backend's pass. A backend gives only its per-chunk step and its bytes per
logit (torch: fusedpeft/torch_backend/cross_entropy.py; cpu: cpp_backend; triton: kernels).
"""

from __future__ import annotations

import functools

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def active_rows(scale: torch.Tensor) -> torch.Tensor:
    """Indices [n_active] of the rows with a non-zero scale.

    On GPU tensors ``nonzero`` is one host sync per pass, kept on purpose: the chunk loop must know
    how many rows remain to launch only their GEMMs, and without the count it would either run the
    GEMMs of every zero-weight row (a quarter to a half of the rows in completion-only SFT, and the
    GEMMs are nearly all of the cost) or launch chunks for rows that may not exist. The sync costs
    one pipeline drain per loss call (the loss's own GEMMs then queue behind it); not yet measured
    on a GPU. No sync on CPU tensors."""
    return scale.nonzero().squeeze(1)


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
    """Bytes per logit of the PyTorch chunk step (torch_backend; cpp_backend's with softcap=None):
    the logits in the input dtype (freed once upcast), their copy in the accumulation dtype turned
    into dlogits in place, tanh for softcap gradients, and the input-dtype dlogits before the GEMMs."""
    acc_size = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    in_size = torch.empty((), dtype=dtype).element_size()
    per_element = acc_size * (2 if (softcap is not None and with_grad) else 1)
    if in_size != acc_size:
        per_element += in_size * (2 if with_grad else 1)
    return per_element


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


def by_chunks(run_pass):
    """A backend's (linear_cross_entropy_forward, linear_cross_entropy_backward): forward_by_chunks
    and backward_by_chunks on its ``run_pass`` (linear_cross_entropy_pass's arguments and returns)."""
    return functools.partial(forward_by_chunks, run_pass), functools.partial(backward_by_chunks, run_pass)
