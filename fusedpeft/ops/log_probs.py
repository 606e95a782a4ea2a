"""The linear_log_probs op: per-token log p(target) of a linear head (and, when asked, the
entropy, log sum p^2, mean logit and top-1 flag of each row), in the chunk loop of the linear
cross-entropy, never rows x V logits (docs/contract.md §4).

Which code runs:
- log p alone (no other output asked for, no temperature after a softcap): the backend's own
  linear cross-entropy with reduction "none" (torch, cpu, cuda or triton row kernels), since
  log p_t = -l_t of the plain cross-entropy; its backward likewise, with the incoming gradient
  -g folded into the row scale.
- otherwise (other outputs, or a temperature after a softcap): the forward of
  FORWARD_IMPLEMENTATIONS[backend] (triton: one row kernel reading each chunk's logits once),
  else host.log_probs's chunk step (all of them in one pass over the vocabulary, PyTorch ops on
  each chunk, any device); the backward is host.log_probs's (PyTorch, every backend) when the
  entropy receives a gradient or a temperature follows a softcap, else the backend's
  cross-entropy backward as above.
Both go through host.cross_entropy.chunked_linear_pass.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from fusedpeft.backends import implementation, resolve_backend
from fusedpeft.ops._common import eager_twin, empty_result, maybe, no_autocast, run, run_backward
from fusedpeft.ops.cross_entropy import AUTO_BUDGET_MAX_BYTES, auto_chunk_budget
from fusedpeft.host import log_probs as host_log_probs
from fusedpeft.host.cross_entropy import accumulation_dtype

OUTPUTS = host_log_probs.OUTPUTS
# chunk_budget_bytes=None: auto_chunk_budget (the linear cross-entropy's rule), but at least
# MIN_CHUNK_ROWS rows of logits per chunk (capped at AUTO_BUDGET_MAX_BYTES): measured on CPU (1024
# rows, H 512, V 32000, fp32) the aspect-ratio rule alone gave ~16-row chunks and a forward 3.6x
# slower than TRL's own head, 256 rows 1.9x faster (fwd+bwd 2.4x). TRL's head holds a 4096 x 32768 tile.
MIN_CHUNK_ROWS = 256
# backends with their own linear_log_probs_forward (host.log_probs's arguments and result)
FORWARD_IMPLEMENTATIONS = {"triton": "fusedpeft.kernels.log_probs"}


def _wanted(outputs: int) -> list[bool]:
    return [index == 0 or bool(outputs >> index & 1) for index in range(len(OUTPUTS))]


def _kernel_path(outputs: int, inv_temperature: float) -> bool:
    """log p alone at temperature 1 (after any folding): the backend's cross-entropy computes it."""
    return outputs & ~1 == 0 and inv_temperature == 1.0


def _linear_log_probs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, row_mask: Tensor,
                      outputs: int, inv_temperature: float, softcap: Optional[float], chunk_budget_bytes: int,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], bias [V]?, targets [N] in [0, V), row_mask [N] (0: skipped,
    every output 0), outputs: bit i set asks for OUTPUTS[i] ->
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, lse), each [N] in the accumulation
    dtype (is_top1 as 1.0 / 0.0); those not asked for are 0 (lse is 0 on the kernel path)."""
    with no_autocast(hidden.device.type):
        if _kernel_path(outputs, inv_temperature):
            loss, *_ = implementation("cross_entropy", backend).linear_cross_entropy_forward(
                hidden, weight, bias, targets, row_mask, False, 0.0, 0.0, softcap, chunk_budget_bytes,
                False, False, False)
            zeros = torch.zeros_like(loss)
            return -loss, zeros, zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        module = importlib.import_module(FORWARD_IMPLEMENTATIONS[backend]) if backend in FORWARD_IMPLEMENTATIONS \
            else host_log_probs
        stats = module.linear_log_probs_forward(hidden, weight, bias, targets, row_mask, _wanted(outputs),
                                                inv_temperature, softcap, chunk_budget_bytes)
    return tuple(stats[index].clone() for index in range(6))


linear_log_probs_op = torch.library.custom_op("fusedpeft::linear_log_probs", _linear_log_probs, mutates_args=())


@linear_log_probs_op.register_fake
def _(hidden, weight, bias, targets, row_mask, outputs, inv_temperature, softcap, chunk_budget_bytes, backend):
    acc = accumulation_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[0], dtype=acc) for _ in range(6))


def _linear_log_probs_backward(grad_log_probs: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
                               bias: Optional[Tensor], targets: Tensor, row_mask: Tensor, lse: Tensor, entropy: Tensor,
                               inv_temperature: float, softcap: Optional[float], chunk_budget_bytes: int,
                               need_hidden: bool, need_weight: bool, need_bias: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) of sum_t g_lp,t log p_t + g_H,t H_t (g_H None: 0),
    recomputed chunk by chunk; a gradient not asked for is empty [0]."""
    acc = accumulation_dtype(hidden.dtype)
    grad_log_probs = grad_log_probs.to(acc) * row_mask.to(acc)
    with no_autocast(hidden.device.type):
        if grad_entropy is None and inv_temperature == 1.0:
            grads = implementation("cross_entropy", backend).linear_cross_entropy_backward(
                -grad_log_probs, hidden, weight, bias, targets, row_mask, 0.0, 0.0, softcap, chunk_budget_bytes,
                need_hidden, need_weight, need_bias)
        else:
            grad_entropy = None if grad_entropy is None else grad_entropy.to(acc) * row_mask.to(acc)
            grads = host_log_probs.linear_log_probs_backward(
                grad_log_probs, grad_entropy, hidden, weight, bias, targets, lse, entropy, inv_temperature, softcap,
                chunk_budget_bytes, need_hidden, need_weight, need_bias)
    return tuple(g if g is not None else empty_result(hidden) for g in grads)


linear_log_probs_backward_op = torch.library.custom_op(
    "fusedpeft::linear_log_probs_backward", _linear_log_probs_backward, mutates_args=())


@linear_log_probs_backward_op.register_fake
def _(grad_log_probs, grad_entropy, hidden, weight, bias, targets, row_mask, lse, entropy, inv_temperature, softcap,
      chunk_budget_bytes, need_hidden, need_weight, need_bias, backend):
    return (torch.empty_like(hidden) if need_hidden else empty_result(hidden),
            torch.empty_like(weight) if need_weight else empty_result(hidden),
            torch.empty_like(bias) if need_bias and bias is not None else empty_result(hidden))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, row_mask, outputs, inv_temperature, softcap, chunk_budget_bytes, backend = inputs
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, targets, row_mask, output[5], output[1])
    ctx.options = (inv_temperature, softcap, chunk_budget_bytes)
    ctx.backend = backend


def _backward(ctx, grad_log_probs, grad_entropy, *unused):
    if grad_log_probs is None and grad_entropy is None:
        return (None,) * 10
    hidden, weight, bias, targets, row_mask, lse, entropy = ctx.saved_tensors
    if grad_log_probs is None:
        grad_log_probs = torch.zeros_like(lse)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = run_backward(ctx, linear_log_probs_backward_op, _linear_log_probs_backward, grad_log_probs.contiguous(),
                         None if grad_entropy is None else grad_entropy.contiguous(), hidden, weight, bias, targets,
                         row_mask, lse, entropy, *ctx.options, need_hidden, need_weight,
                         need_bias and bias is not None, ctx.backend)
    grads = [maybe(g) if need else None for g, need in zip(grads, (need_hidden, need_weight, need_bias))]
    return (*grads, None, None, None, None, None, None, None)


linear_log_probs_op.register_autograd(_backward, setup_context=_setup_context)
_LinearLogProbsEager = eager_twin(_linear_log_probs, _setup_context, _backward)


def linear_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                     outputs=("log_probs",), temperature: float = 1.0, softcap: float | None = None,
                     ignore_index: int = -100, chunk_budget_bytes=None, backend=None) -> dict[str, Tensor]:
    """hidden [..., H], weight [V, H], bias [V]?, targets [...] -> {name: [...] tensor} for each name
    in ``outputs`` (log_probs always); validated inputs. Rows whose target is ignore_index (or
    outside [0, V)) give 0 in every output. log_probs and entropy are differentiable (float32, or
    float64 for float64 inputs); log_sum_sq_probs and mean_logits are too but carry no gradient,
    is_top1 is bool. A temperature without softcap is folded into hidden and bias."""
    vocab = weight.shape[0]
    inv_temperature = 1.0 / float(temperature)
    if softcap is None and inv_temperature != 1.0:
        hidden = hidden * inv_temperature
        bias = None if bias is None else bias * inv_temperature
        inv_temperature = 1.0
    flat = targets.reshape(-1)
    valid = (flat != ignore_index) & (flat >= 0) & (flat < vocab)
    acc = accumulation_dtype(hidden.dtype)
    safe = torch.where(valid, flat, torch.zeros_like(flat)).long()
    if chunk_budget_bytes is None:
        rows = MIN_CHUNK_ROWS * vocab * (2 * torch.empty((), dtype=acc).element_size() + hidden.element_size())
        chunk_budget_bytes = min(AUTO_BUDGET_MAX_BYTES, max(
            rows, auto_chunk_budget(flat.numel(), hidden.shape[-1], vocab, hidden.element_size())))
    bits = sum(1 << OUTPUTS.index(name) for name in outputs)
    name = resolve_backend("cross_entropy", backend, hidden.device)
    results = run(linear_log_probs_op, _LinearLogProbsEager, hidden.reshape(-1, hidden.shape[-1]).contiguous(),
                  weight, bias, safe, valid.to(acc), bits | 1, inv_temperature,
                  None if softcap is None else float(softcap), int(chunk_budget_bytes), name)
    out = {}
    for index, key in enumerate(OUTPUTS):
        if index == 0 or key in outputs:
            value = results[index].reshape(targets.shape)
            out[key] = value.bool() if key == "is_top1" else value
    return out
