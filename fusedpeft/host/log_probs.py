"""Per-token log-probabilities of a linear head (and the entropy, log sum p^2, mean logit and
top-1 flag of each row) in the chunk loop of linear cross-entropy (docs/contract.md §4).

What TRL's fused LM head returns, without rows x V logits: the rows go through
host.cross_entropy.chunked_linear_pass (the one chunk loop of every backend) with their
own ROW IDS in place of the labels, so each chunk step reads its rows' targets and writes its
per-row statistics into [N] buffers by those ids. Logits of a row: z = softcap(h W^T + b) / T
(softcap c tanh(./c) when given, then the inverse temperature ``inv_temperature``).

- linear_log_probs_forward: one pass; log p_y always, the others when asked (``wanted``).
- linear_log_probs_backward: recomputes each chunk and turns it into
  g_lp ([j = y] - p_j) - g_H p_j (log p_j + H), the gradient of sum_t g_lp,t log p_t + g_H,t H_t
  w.r.t. z, times the softcap and temperature chain rule, contracted by the shared loop.
"""

from __future__ import annotations

import functools

import torch

from fusedpeft.host.cross_entropy import accumulation_dtype, apply_softcap_, chunked_linear_pass

# per-token outputs in the order of the forward's stacked result
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _bytes_per_logit(dtype: torch.dtype, softcap, buffers: int, with_grad: bool) -> int:
    """``buffers`` accumulation-dtype [rows, V] temporaries (+ tanh for softcap gradients), and the
    input-dtype logits (and input-dtype dlogits in backward) of a 16-bit head."""
    acc_size = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    in_size = torch.empty((), dtype=dtype).element_size()
    per = acc_size * (buffers + (1 if (softcap is not None and with_grad) else 0))
    if in_size != acc_size:
        per += in_size * (2 if with_grad else 1)
    return per


def _chunk_logits(make_logits, softcap, inv_temperature: float, keep_tanh: bool):
    """The chunk's z [rows, V] in the accumulation dtype, and tanh(y / softcap) when kept."""
    logits = make_logits()
    z = logits.to(accumulation_dtype(logits.dtype))
    del logits
    tanh = apply_softcap_(z, softcap, keep_tanh=keep_tanh)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z, tanh


def _forward_step(make_logits, rows, scale, with_grad, *, targets, stats, wanted, softcap, inv_temperature):
    z, _ = _chunk_logits(make_logits, softcap, inv_temperature, keep_tanh=False)
    y = targets.index_select(0, rows)
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    extra = {}
    if wanted[3]:
        extra[3] = z.mean(1)
    z_max, z_argmax = z.max(1)  # one pass; the index of the first maximum, as TRL counts ties
    if wanted[4]:
        extra[4] = (z_argmax == y).to(z.dtype)
    z.sub_(z_max.unsqueeze(1))  # d = z - max
    e = torch.exp(z) if (wanted[1] or wanted[2]) else z.exp_()  # exp(d); in place when d is not needed
    sum_e = e.sum(1)
    log_sum_e = sum_e.log()
    if wanted[1]:
        extra[1] = log_sum_e - torch.einsum("rv,rv->r", e, z) / sum_e  # H = lse - sum p d, no [rows, V] temporary
    if wanted[2]:
        extra[2] = e.mul_(e).sum(1).log() - 2.0 * log_sum_e  # log sum p^2
    for index, values in extra.items():
        stats[index].index_copy_(0, rows, values)
    stats[5].index_copy_(0, rows, z_max + log_sum_e)  # lse, kept for backward
    return z_y - z_max - log_sum_e, None


def linear_log_probs_forward(hidden, weight, bias, targets, row_mask, wanted, inv_temperature: float,
                             softcap: float | None, chunk_budget_bytes: int):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] in [0, V), row_mask [N] (rows with
    0 are skipped and give 0), wanted: 5 bools for OUTPUTS (log_probs always computed) ->
    stats [6, N] in the accumulation dtype: log p_y, entropy, log sum p^2, mean logit, is_top1
    (1.0 / 0.0), lse; rows not asked for are 0."""
    acc = accumulation_dtype(hidden.dtype)
    n_rows = hidden.shape[0]
    stats = torch.zeros(6, n_rows, dtype=acc, device=hidden.device)
    step = functools.partial(_forward_step, targets=targets, stats=stats, wanted=wanted, softcap=softcap,
                             inv_temperature=float(inv_temperature))
    rows = torch.arange(n_rows, device=hidden.device)
    buffers = 2 if (wanted[1] or wanted[2]) else 1  # z, and exp(z - max) beside it when z is read again
    log_probs, *_ = chunked_linear_pass(step, _bytes_per_logit(hidden.dtype, softcap, buffers, False), hidden,
                                        weight, bias, rows, row_mask, chunk_budget_bytes, False, False, False)
    stats[0] = log_probs
    return stats


def _backward_step(make_logits, rows, scale, with_grad, *, targets, grad_log_probs, grad_entropy, lse, entropy,
                   softcap, inv_temperature):
    z, tanh = _chunk_logits(make_logits, softcap, inv_temperature, keep_tanh=True)
    g_lp = grad_log_probs.index_select(0, rows).to(z.dtype)
    z.sub_(lse.index_select(0, rows).unsqueeze(1))  # log p
    if grad_entropy is None:
        z.exp_().mul_(g_lp.neg().unsqueeze(1))  # -g_lp p
    else:
        g_h = grad_entropy.index_select(0, rows).to(z.dtype)
        p = torch.exp(z)
        z.add_(entropy.index_select(0, rows).unsqueeze(1)).mul_(p).mul_(g_h.neg().unsqueeze(1))  # -g_H p (log p + H)
        z.sub_(p.mul_(g_lp.unsqueeze(1)))
        del p
    z[torch.arange(z.shape[0], device=z.device), targets.index_select(0, rows)] += g_lp
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    if tanh is not None:
        z.mul_(tanh.mul_(tanh).neg_().add_(1.0))
    return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device), z


def linear_log_probs_backward(grad_log_probs, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                              inv_temperature: float, softcap: float | None, chunk_budget_bytes: int,
                              need_hidden: bool, need_weight: bool, need_bias: bool):
    """grad_log_probs [N], grad_entropy [N] | None, lse and entropy [N] from the forward ->
    (grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None) of
    sum_t grad_log_probs[t] log p_t + grad_entropy[t] H_t; rows where both are 0 are skipped."""
    acc = accumulation_dtype(hidden.dtype)
    active = grad_log_probs != 0
    if grad_entropy is not None:
        active = active | (grad_entropy != 0)
    step = functools.partial(_backward_step, targets=targets, grad_log_probs=grad_log_probs,
                             grad_entropy=grad_entropy, lse=lse, entropy=entropy, softcap=softcap,
                             inv_temperature=float(inv_temperature))
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    buffers = 1 if grad_entropy is None else 2
    _, *grads = chunked_linear_pass(step, _bytes_per_logit(hidden.dtype, softcap, buffers, True), hidden, weight,
                                    bias, rows, active.to(acc), chunk_budget_bytes, need_hidden, need_weight,
                                    need_bias)
    return grads
