"""The "triton" backend of the cross_entropy op family (SPEC §4): launchers of the row kernels in
``cross_entropy_kernels`` with the torch backend's API (fusedpeft/torch_backend/cross_entropy.py).

Memory and traffic choices (8192 rows, V = 128256, bf16 numbers in the report):

- cross_entropy_forward reads the logits once and keeps lse [N] only; cross_entropy_backward
  reads them once more and writes the gradient, the one rows x V buffer the op must return.
  Computing the gradient in the forward while the row is hot would need it saved between forward
  and backward (the op saves logits, labels, row_scale and lse only) and a second rows x V buffer
  alive from forward to backward, as F.cross_entropy's saved log-softmax is; recomputing costs
  the same bytes (read + read + write either way, in place or not) and no memory beyond the output.
- linear_cross_entropy_forward drops zero-scale rows (``nonzero``: ONE host sync per call, two
  when reduction "none" also runs the backward), takes the rest in chunks whose logits fit
  ``chunk_budget_bytes`` (one chunk x V buffer in the input dtype), computes each chunk's logits
  with torch.matmul (cuBLAS), runs the forward kernel (lse, loss) and the backward kernel writing
  dlogits IN PLACE into the chunk buffer, then grad_hidden = dlogits @ W, grad_weight +=
  dlogits^T h (fp32 accumulator for 16-bit heads) and grad_bias += column sums by matmuls.
- cross_entropy_* never synchronise with the host.

Autotuning: a few (BLOCK_V, num_warps) configs per architecture (sm_90+, and sm_80 for the rest),
keyed on V and the dtypes; one fixed config under TRITON_INTERPRET=1. The in-place launch
restores the chunk buffer between benchmark runs (one clone of it, on the first call per key).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusedpeft.kernels._common import device_capability, for_launch, interpreting
from fusedpeft.kernels.cross_entropy_kernels import _ce_bwd_kernel, _ce_fwd_kernel

# (BLOCK_V, num_warps) per architecture; every entry is AOT-compiled by
# tests/test_triton_cross_entropy_aot.py for sm_90 and sm_80 without spills.
CONFIGS = {
    90: [(4096, 8), (8192, 16), (16384, 16)],
    80: [(4096, 8), (8192, 16)],
}
INTERPRETER_CONFIG = (256, 4)
_KEY = ["V", "HAS_SOFTCAP", "ACC"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _arch(t: torch.Tensor) -> int:
    major, _ = device_capability(t)
    return 90 if major >= 9 else 80


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, arch: int):
    """The autotuned kernel ("fwd", "bwd", or "bwd_inplace": the benchmark runs of the in-place
    launch restore the logits buffer after each config, one clone of it on the first call per key)."""
    kernel = {"fwd": _ce_fwd_kernel, "bwd": _ce_bwd_kernel, "bwd_inplace": _ce_bwd_kernel}[kernel_name]
    pairs = [INTERPRETER_CONFIG] if interpreting() else CONFIGS[arch]
    configs = [triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in pairs]
    restore = ["logits_ptr"] if kernel_name == "bwd_inplace" else None
    return triton.autotune(configs=configs, key=_KEY, restore_value=restore)(kernel)


def row_forward(logits, labels, scale, loss_out, lse_out, label_smoothing: float, z_loss: float, softcap):
    """Launch the forward row kernel.

    logits [n, V] (fp32/fp16/bf16/fp64, unit column stride), labels [n] int64 in [0, V),
    scale [n] (ACC dtype) -> writes loss_out [n] = scale * l_t and lse_out [n] (ACC dtype).
    """
    n, vocab = logits.shape
    if n == 0:
        return
    src = for_launch(logits)
    _tuned("fwd", _arch(src))[(n,)](
        src, labels, scale, loss_out, lse_out, vocab, src.stride(0), float(label_smoothing), float(z_loss),
        1.0 if softcap is None else float(softcap), HAS_SOFTCAP=softcap is not None,
        SMOOTHING=label_smoothing != 0.0, ACC=_tl_acc(logits.dtype))


def row_backward(logits, labels, scale, lse, grad_loss, grad_out, label_smoothing: float, z_loss: float, softcap):
    """Launch the backward row kernel: grad_out [n, V] = scale * grad_loss * dl/dlogits.

    grad_loss is 0-dim/[1] (broadcast) or [n]; grad_out may be ``logits`` itself (in place) and
    must have logits' dtype and unit column stride. Under the interpreter a bf16 grad_out is
    written through an fp32 copy.
    """
    n, vocab = logits.shape
    if n == 0:
        return
    src = for_launch(logits)
    dst = src if grad_out is logits else for_launch(grad_out)
    stride_grad_loss = 0 if grad_loss.numel() == 1 else grad_loss.stride(0)
    _tuned("bwd_inplace" if dst is src else "bwd", _arch(src))[(n,)](
        src, labels, scale, lse, grad_loss, dst, vocab, src.stride(0), dst.stride(0), stride_grad_loss,
        float(label_smoothing), float(z_loss), 1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, ACC=_tl_acc(logits.dtype))
    if dst is not grad_out:
        grad_out.copy_(dst)


def cross_entropy_forward(logits, labels, row_scale, reduce: bool, label_smoothing: float, z_loss: float,
                          softcap: float | None):
    """logits [N, V] (fp32/fp16/bf16/fp64), labels [N] int64 in [0, V), row_scale [N] ->
    (loss: 0-dim if reduce else [N], lse [N]), float32 (float64 for float64 logits).

    lse is 0 on rows with row_scale == 0. No host synchronisation.
    """
    acc = accumulation_dtype(logits.dtype)
    n_rows = logits.shape[0]
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    loss_rows = torch.empty(n_rows, dtype=acc, device=logits.device)
    lse = torch.empty(n_rows, dtype=acc, device=logits.device)
    row_forward(logits, labels.contiguous(), row_scale.to(acc).contiguous(), loss_rows, lse, label_smoothing,
                z_loss, softcap)
    return (loss_rows.sum() if reduce else loss_rows), lse


def cross_entropy_backward(grad_loss, logits, labels, row_scale, lse, label_smoothing: float, z_loss: float,
                           softcap: float | None):
    """grad_loss (0-dim or [N], float32/64) -> grad_logits [N, V] in logits' dtype (0 on rows with
    row_scale * grad_loss == 0). No host synchronisation."""
    acc = accumulation_dtype(logits.dtype)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    row_backward(logits, labels.contiguous(), row_scale.to(acc).contiguous(), lse.contiguous(),
                 grad_loss.to(acc).reshape(-1), grad, label_smoothing, z_loss, softcap)
    return grad


# ------------------------------------------------------------------------ linear (fused LM head)


def rows_per_chunk(vocab: int, dtype: torch.dtype, chunk_budget_bytes: int) -> int:
    """Rows whose logits [rows, V] in ``dtype`` fit the budget (the gradient reuses that buffer);
    a multiple of 128 (whole GEMM tiles) when at least 256 rows fit."""
    rows = max(1, chunk_budget_bytes // (vocab * torch.empty((), dtype=dtype).element_size()))
    return rows // 128 * 128 if rows >= 256 else rows


def _accumulate_weight_grad(grad_weight, dlogits, h) -> None:
    """grad_weight [V, H] (accumulation dtype) += dlogits^T [V, c] @ h [c, H]."""
    if dlogits.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), h)
        return
    if grad_weight.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):
        # cuBLAS: 16-bit operands, fp32 accumulator and output (torch >= 2.8), no fp32 operand copies
        torch.addmm(grad_weight, dlogits.t(), h, out_dtype=grad_weight.dtype, out=grad_weight)
        return
    # CPU (interpreter tests) or an older torch: fp32 operand copies (one more chunk-sized buffer)
    grad_weight.addmm_(dlogits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))


def linear_cross_entropy_pass(hidden, weight, bias, labels, scale, grad_scale, label_smoothing: float,
                              z_loss: float, softcap: float | None, chunk_budget_bytes: int, need_hidden: bool,
                              need_weight: bool, need_bias: bool):
    """One chunked pass over the rows with scale * grad_scale != 0 (one host sync: ``nonzero``).

    hidden [N, H], weight [V, H], bias [V] | None (one dtype: fp32/fp16/bf16/fp64), labels [N]
    int64, scale [N] (ACC dtype), grad_scale 0-dim or [N] (ACC dtype; multiplies scale for the
    gradients). Returns (scale_t l_t [N] in ACC, grad_hidden [N, H] | None, grad_weight [V, H] |
    None, grad_bias [V] | None), the gradients of sum_t scale_t grad_scale_t l_t.
    """
    acc = accumulation_dtype(hidden.dtype)
    with_grad = need_hidden or need_weight or need_bias
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    effective = scale * grad_scale if with_grad else scale
    active = effective.nonzero().squeeze(1)
    compact = active.numel() < n_rows
    loss_rows = torch.zeros(n_rows, dtype=acc, device=device) if compact else torch.empty(n_rows, dtype=acc,
                                                                                           device=device)
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.zeros_like(hidden) if compact else torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=device) if need_bias else None
    ones = torch.ones(1, dtype=acc, device=device)
    step = rows_per_chunk(vocab, hidden.dtype, chunk_budget_bytes)
    for start in range(0, active.numel(), step):
        stop = min(start + step, active.numel())
        if compact:
            idx = active[start:stop]
            h, rows_labels, rows_scale = hidden[idx], labels[idx], effective[idx]
        else:
            idx = None
            h, rows_labels, rows_scale = hidden[start:stop], labels[start:stop], effective[start:stop]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        rows_loss = torch.empty(stop - start, dtype=acc, device=device) if compact else loss_rows[start:stop]
        lse = torch.empty(stop - start, dtype=acc, device=device)
        row_forward(logits, rows_labels, rows_scale, rows_loss, lse, label_smoothing, z_loss, softcap)
        if compact:
            loss_rows.index_copy_(0, idx, rows_loss)
        if with_grad:
            row_backward(logits, rows_labels, rows_scale, lse, ones, logits, label_smoothing, z_loss, softcap)
            dlogits = logits
            if need_bias:
                grad_bias += dlogits.sum(0, dtype=acc)
            if need_weight:
                _accumulate_weight_grad(grad_weight, dlogits, h)
            if need_hidden and compact:
                grad_hidden.index_copy_(0, idx, dlogits @ weight)
            elif need_hidden:
                torch.matmul(dlogits, weight, out=grad_hidden[start:stop])
            del dlogits
        del logits  # before the next chunk's logits exist
    return (loss_rows, grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def linear_cross_entropy_forward(hidden, weight, bias, labels, row_scale, reduce: bool, label_smoothing: float,
                                 z_loss: float, softcap: float | None, chunk_budget_bytes: int, need_hidden: bool,
                                 need_weight: bool, need_bias: bool):
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N], row_scale [N] ->
    (loss: 0-dim if reduce else [N] in ACC, grad_hidden [N, H] | None, grad_weight [V, H] | None,
    grad_bias [V] | None).

    With reduce the incoming gradient is one scalar, so the asked-for gradients of the loss are
    computed in this pass (the op scales them in backward); without reduce they are left to
    linear_cross_entropy_backward.
    """
    acc = accumulation_dtype(hidden.dtype)
    precompute = reduce and (need_hidden or need_weight or need_bias)
    loss_rows, *grads = linear_cross_entropy_pass(
        hidden, weight, bias, labels.contiguous(), row_scale.to(acc).contiguous(), torch.ones((), dtype=acc,
                                                                                               device=hidden.device),
        label_smoothing, z_loss, softcap, chunk_budget_bytes, need_hidden and precompute,
        need_weight and precompute, need_bias and precompute)
    return (loss_rows.sum() if reduce else loss_rows), *grads


def linear_cross_entropy_backward(grad_loss, hidden, weight, bias, labels, row_scale, label_smoothing: float,
                                  z_loss: float, softcap: float | None, chunk_budget_bytes: int, need_hidden: bool,
                                  need_weight: bool, need_bias: bool):
    """grad_loss [N] (reduction "none") -> (grad_hidden [N, H] | None, grad_weight [V, H] | None,
    grad_bias [V] | None), recomputed chunk by chunk with grad_loss folded into the row scale."""
    acc = accumulation_dtype(hidden.dtype)
    _, *grads = linear_cross_entropy_pass(
        hidden, weight, bias, labels.contiguous(), row_scale.to(acc).contiguous(), grad_loss.to(acc).reshape(-1),
        label_smoothing, z_loss, softcap, chunk_budget_bytes, need_hidden, need_weight, need_bias)
    return grads
