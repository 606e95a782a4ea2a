"""The cross_entropy op family (docs/contract.md §4): masked / weighted cross-entropy from logits, and the
linear cross-entropy that never materialises rows x V logits.

The op layer folds ignore_index, instruction_mask / instruction_weight, token_weights and the
reduction's normaliser into one per-row factor ``row_scale`` (a device tensor: no host sync for
num_items_in_batch), so every backend computes sum_t row_scale[t] * l_t (or the per-row values
for reduction "none") and skips rows whose factor is 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedpeft.backends import implementation, resolve_backend
from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.core.token_weights import token_loss_weights
from fusedpeft.ops._common import eager_twin, empty_result, maybe, no_autocast, run, run_backward

# chunk_budget_bytes=None: the aspect-ratio rule of Liger's and torch's chunked linear CE (chunk
# logits about the size of the hidden states: next_pow2(ceil(N / ceil(V / H))) rows), in bytes,
# less what this op holds beyond the budget (two chunk-row copies of H values, ~64 bytes per row
# of row vectors), so its peak stays at or below torch's F.linear_cross_entropy with
# LinearCrossEntropyOptions() (grad_hidden + one such logits buffer) while the chunks keep its
# GEMM sizes. Measured on CPU with the bench ce suite: a plain budget of 0.875 x the hidden bytes
# was always below torch's peak but 1.36x slower than torch for 1024 rows and a trainable head
# (14-row chunks), the rule here 0.6x. AUTO_BUDGET_MAX_BYTES caps the chunk at large batches.
AUTO_BUDGET_MAX_BYTES = 256 * 2**20
_ROW_VECTOR_BYTES = 64


def auto_chunk_budget(n_rows: int, hidden_size: int, vocab: int, itemsize: int) -> int:
    """The default chunk budget in bytes for hidden [n_rows, hidden_size] of ``itemsize`` bytes
    and a head of ``vocab`` rows (see AUTO_BUDGET_MAX_BYTES)."""
    target = -(-n_rows // max(1, -(-vocab // max(1, hidden_size))))
    rows = min(1 << max(0, target - 1).bit_length(), max(1, n_rows))
    budget = rows * itemsize * (vocab - 2 * hidden_size) - _ROW_VECTOR_BYTES * n_rows
    return max(1, min(AUTO_BUDGET_MAX_BYTES, max(rows * itemsize * vocab // 2, budget)))


# ------------------------------------------------------------------------ from logits


def _cross_entropy(logits: Tensor, labels: Tensor, row_scale: Tensor, reduce: bool, label_smoothing: float,
                     z_loss: float, softcap: Optional[float], backend: str) -> tuple[Tensor, Tensor]:
    """logits [N, V], labels [N], row_scale [N] -> (loss: 0-dim if reduce else [N], lse [N]), fp32."""
    with no_autocast(logits.device.type):
        return implementation("cross_entropy", backend).cross_entropy_forward(
            logits, labels, row_scale, reduce, label_smoothing, z_loss, softcap)


cross_entropy_op = torch.library.custom_op("fusedpeft::cross_entropy", _cross_entropy, mutates_args=())


@cross_entropy_op.register_fake
def _(logits, labels, row_scale, reduce, label_smoothing, z_loss, softcap, backend):
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((), dtype=acc) if reduce else logits.new_empty(logits.shape[0], dtype=acc)
    return loss, logits.new_empty(logits.shape[0], dtype=acc)


def _cross_entropy_backward(grad_loss: Tensor, logits: Tensor, labels: Tensor, row_scale: Tensor, lse: Tensor,
                              label_smoothing: float, z_loss: float, softcap: Optional[float], backend: str) -> Tensor:
    """grad_loss (0-dim or [N]) -> grad_logits [N, V] in logits' dtype."""
    with no_autocast(logits.device.type):
        return implementation("cross_entropy", backend).cross_entropy_backward(
            grad_loss, logits, labels, row_scale, lse, label_smoothing, z_loss, softcap)


cross_entropy_backward_op = torch.library.custom_op("fusedpeft::cross_entropy_backward", _cross_entropy_backward,
                                                    mutates_args=())


@cross_entropy_backward_op.register_fake
def _(grad_loss, logits, labels, row_scale, lse, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs, output):
    logits, labels, row_scale, reduce, label_smoothing, z_loss, softcap, backend = inputs
    ctx.save_for_backward(logits, labels, row_scale, output[1])
    ctx.options = (label_smoothing, z_loss, softcap, backend)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_loss, grad_lse):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None
    logits, labels, row_scale, lse = ctx.saved_tensors
    grad = run_backward(ctx, cross_entropy_backward_op, _cross_entropy_backward, grad_loss.contiguous(), logits, labels,
                        row_scale, lse, *ctx.options)
    return grad, None, None, None, None, None, None, None


cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)
_CrossEntropyEager = eager_twin(_cross_entropy, _ce_setup_context, _ce_backward)


# ------------------------------------------------------------------------ linear (fused LM head)


def _linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, row_scale: Tensor,
                            reduce: bool, label_smoothing: float, z_loss: float, softcap: Optional[float],
                            chunk_budget_bytes: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V]?, labels [N], row_scale [N] ->
    (loss: 0-dim if reduce else [N], grad_hidden [N, H], grad_weight [V, H], grad_bias [V]).

    With reduce the gradients asked for by need_* are computed in this pass (the incoming
    gradient is a scalar); otherwise, and for gradients not asked for, they are empty [0].
    """
    with no_autocast(hidden.device.type):
        loss, *grads = implementation("cross_entropy", backend).linear_cross_entropy_forward(
            hidden, weight, bias, labels, row_scale, reduce, label_smoothing, z_loss, softcap, chunk_budget_bytes,
            need_hidden, need_weight, need_bias)
    return loss, *(g if g is not None else empty_result(hidden) for g in grads)


linear_cross_entropy_op = torch.library.custom_op("fusedpeft::linear_cross_entropy", _linear_cross_entropy,
                                                  mutates_args=())


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, row_scale, reduce, label_smoothing, z_loss, softcap, chunk_budget_bytes,
      need_hidden, need_weight, need_bias, backend):
    acc = accumulation_dtype(hidden.dtype)
    loss = hidden.new_empty((), dtype=acc) if reduce else hidden.new_empty(hidden.shape[0], dtype=acc)
    return (loss,
            torch.empty_like(hidden) if reduce and need_hidden else empty_result(hidden),
            torch.empty_like(weight) if reduce and need_weight else empty_result(hidden),
            torch.empty_like(bias) if reduce and need_bias and bias is not None else empty_result(hidden))


def _linear_cross_entropy_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                     labels: Tensor, row_scale: Tensor, label_smoothing: float, z_loss: float,
                                     softcap: Optional[float], chunk_budget_bytes: int, need_hidden: bool,
                                     need_weight: bool, need_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """grad_loss [N] (reduction "none") -> (grad_hidden, grad_weight, grad_bias), recomputed chunk by chunk."""
    with no_autocast(hidden.device.type):
        grads = implementation("cross_entropy", backend).linear_cross_entropy_backward(
            grad_loss, hidden, weight, bias, labels, row_scale, label_smoothing, z_loss, softcap, chunk_budget_bytes,
            need_hidden, need_weight, need_bias)
    return tuple(g if g is not None else empty_result(hidden) for g in grads)


linear_cross_entropy_backward_op = torch.library.custom_op(
    "fusedpeft::linear_cross_entropy_backward", _linear_cross_entropy_backward, mutates_args=())


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, labels, row_scale, label_smoothing, z_loss, softcap, chunk_budget_bytes,
      need_hidden, need_weight, need_bias, backend):
    return (torch.empty_like(hidden) if need_hidden else empty_result(hidden),
            torch.empty_like(weight) if need_weight else empty_result(hidden),
            torch.empty_like(bias) if need_bias and bias is not None else empty_result(hidden))


def _lce_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, row_scale, reduce, label_smoothing, z_loss, softcap, chunk_budget_bytes,
     need_hidden, need_weight, need_bias, backend) = inputs
    ctx.reduce = reduce
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if reduce:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, row_scale)
        ctx.options = (label_smoothing, z_loss, softcap, chunk_budget_bytes, need_hidden, need_weight, need_bias,
                       backend)


def _scale_precomputed(grads: list, grad_loss: Tensor) -> list:
    """The gradients computed in the forward (reduction to a scalar) times the incoming 0-dim
    gradient. In place when this backward is the graph's last use of them (no retain_graph, no
    create_graph): then the saved buffers become the returned gradients and no second copy of
    grad_hidden / grad_weight exists. A 1.0 is skipped on CPU tensors (reading it is free there);
    on a GPU the multiply is not skipped, to avoid a host sync: one read + write of the gradients,
    memory-bound (~(N H + V H) x 2 x itemsize bytes, tens of microseconds at Llama sizes). Traced
    by torch.compile or opcheck, out of place (a trace cannot see whether the graph is retained)."""
    traced = torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor  # fake / functional tensors
    last_use = (not traced and not torch.is_grad_enabled()
                and not torch._C._autograd._get_current_graph_task_keep_graph())
    if not last_use:
        return [None if g is None else (g * grad_loss).to(g.dtype) for g in grads]
    if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        return grads
    return [None if g is None else g.mul_(grad_loss) for g in grads]


def _lce_backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 14
    if ctx.reduce:
        grads = [maybe(g) for g in ctx.saved_tensors]
        grads = _scale_precomputed(grads, grad_loss)
    else:
        hidden, weight, bias, labels, row_scale = ctx.saved_tensors
        grads = [maybe(g) for g in run_backward(
            ctx, linear_cross_entropy_backward_op, _linear_cross_entropy_backward, grad_loss.contiguous(), hidden,
            weight, bias, labels, row_scale, *ctx.options)]
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = [g if need else None for g, need in zip(grads, (need_hidden, need_weight, need_bias))]
    return (*grads, None, None, None, None, None, None, None, None, None, None, None)


linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)
_LinearCrossEntropyEager = eager_twin(_linear_cross_entropy, _lce_setup_context, _lce_backward)


# ------------------------------------------------------------------------ entry points


def row_scale_and_labels(labels: Tensor, vocab: int, *, instruction_mask=None, instruction_weight=0.0,
                         token_weights=None, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                         normalize="token", sequence_ids=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """labels [...] -> (row_scale [N], labels [N] clamped into [0, V)).

    normalize "token": row_scale = w_t / denominator for "mean" (sum_t w_t, or num_items_in_batch;
    0 everywhere when the denominator is 0), else w_t. normalize "sequence": w_t is first divided
    by the sum of w over its sequence (so "sum" adds per-sequence weighted means and "none" gives
    terms that add up to them), and "mean" divides by the number of sequences with a positive
    weight sum, or by num_items_in_batch (then a number of sequences).
    A label outside [0, V) that is not ignore_index (only reachable on GPU without
    FUSEDPEFT_CHECKS=1) gets weight 0 and is never read out of bounds.
    """
    flat = labels.reshape(-1)
    w = token_loss_weights(flat, ignore_index=ignore_index, instruction_weight=instruction_weight,
                           instruction_mask=None if instruction_mask is None else instruction_mask.reshape(-1),
                           token_weights=None if token_weights is None else token_weights.reshape(-1),
                           dtype=dtype).to(dtype)
    in_range = (flat >= 0) & (flat < vocab)
    w = torch.where(in_range, w, torch.zeros_like(w))
    safe_labels = torch.where(in_range, flat, torch.zeros_like(flat)).long()
    count = None
    if normalize == "sequence":
        w, count = _per_sequence(w, labels, sequence_ids)
    if reduction != "mean":
        return w, safe_labels
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=w.device).to(dtype).reshape(())
    else:
        denom = w.sum() if count is None else count
    inv = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))
    return w * inv, safe_labels


def _per_sequence(w: Tensor, labels: Tensor, sequence_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """w [N] -> (w_t / sum of w over t's sequence [N] (0 where that sum is 0), number of sequences
    with a positive sum, 0-dim), on the device without a host sync.

    Sequences: tokens with equal ``sequence_ids`` (labels' shape, ints in [0, N); an id outside is
    clamped, only reachable without FUSEDPEFT_CHECKS on GPU), or each row of labels [..., T] when
    None (the whole of a 1-D labels).
    """
    n = w.numel()
    if sequence_ids is None:
        ids = torch.arange(n, device=w.device) // max(1, labels.shape[-1] if labels.dim() else 1)
    else:
        ids = sequence_ids.reshape(-1).long().clamp(0, max(n - 1, 0))
    totals = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, ids, w)
    per_row = totals.index_select(0, ids)
    share = torch.where(per_row > 0, w / torch.where(per_row > 0, per_row, torch.ones_like(per_row)),
                        torch.zeros_like(w))
    return share, (totals > 0).sum().to(w.dtype)


def cross_entropy(logits: Tensor, labels: Tensor, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                  backend=None, **weighting) -> Tensor:
    """logits [..., V], labels [...] -> float32 loss (labels' shape for "none"). Validated inputs."""
    vocab = logits.shape[-1]
    scale, safe_labels = row_scale_and_labels(labels, vocab, reduction=reduction, dtype=accumulation_dtype(logits.dtype),
                                              **weighting)
    name = resolve_backend("cross_entropy", backend, logits.device)
    loss, _ = run(cross_entropy_op, _CrossEntropyEager, logits.reshape(-1, vocab).contiguous(), safe_labels, scale,
                  reduction != "none", float(label_smoothing), float(z_loss),
                  None if softcap is None else float(softcap), name)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
                         reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         chunk_budget_bytes=None, backend=None, **weighting) -> Tensor:
    """hidden [..., H], weight [V, H], bias [V]?, labels [...] -> float32 loss. Validated inputs;
    chunk_budget_bytes None = auto_chunk_budget(...)."""
    if chunk_budget_bytes is None:
        chunk_budget_bytes = auto_chunk_budget(labels.numel(), hidden.shape[-1], weight.shape[0],
                                               hidden.element_size())
    vocab = weight.shape[0]
    scale, safe_labels = row_scale_and_labels(labels, vocab, reduction=reduction, dtype=accumulation_dtype(hidden.dtype),
                                              **weighting)
    name = resolve_backend("cross_entropy", backend, hidden.device)
    grad_on = torch.is_grad_enabled()
    loss, *_ = run(
        linear_cross_entropy_op, _LinearCrossEntropyEager, hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight,
        bias, safe_labels, scale, reduction != "none", float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), int(chunk_budget_bytes), grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad, name)
    return loss.reshape(labels.shape) if reduction == "none" else loss
