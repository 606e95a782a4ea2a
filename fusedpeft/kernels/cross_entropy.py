"""The "triton" backend of the cross_entropy op family (docs/contract.md §4): launchers of the row kernels in
``cross_entropy_kernels`` with the torch backend's API (fusedpeft/torch_backend/cross_entropy.py).

Memory and traffic choices (8192 rows, V = 128256, bf16 numbers in the report):

- cross_entropy_forward reads the logits once and keeps lse [N] only; cross_entropy_backward
  reads them once more and writes the gradient, the one rows x V buffer the op must return.
  Computing the gradient in the forward while the row is hot would need it saved between forward
  and backward (the op saves logits, labels, row_scale and lse only) and a second rows x V buffer
  alive from forward to backward, as F.cross_entropy's saved log-softmax is; recomputing costs
  the same bytes (read + read + write either way, in place or not) and no memory beyond the output.
- linear_cross_entropy_* run the chunk loop every backend shares
  (host.cross_entropy.chunked_linear_pass: zero-scale rows dropped, chunks sized by one
  rule from ``chunk_budget_bytes``, grad_hidden / grad_weight / grad_bias contracted per chunk by
  cuBLAS); the Triton chunk step computes each chunk's logits with torch.matmul in the input dtype,
  runs the forward kernel (lse, loss) and the backward kernel writing dlogits IN PLACE into that
  buffer: one chunk x V buffer in the input dtype (2 bytes per logit in bf16).
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
from fusedpeft.host.cross_entropy import (
    accumulation_dtype,
    by_chunks,
    chunked_linear_pass,
)

# (BLOCK_V, num_warps) per architecture; every entry is AOT-compiled by
# tests/test_triton_cross_entropy_aot.py for sm_90 and sm_80 without spills.
CONFIGS = {
    90: [(4096, 8), (8192, 16), (16384, 16)],
    80: [(4096, 8), (8192, 16)],
}
INTERPRETER_CONFIG = (256, 4)
_KEY = ["V", "HAS_SOFTCAP", "ACC"]


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


def _chunk_loss(make_logits, labels, scale, with_grad: bool, label_smoothing: float, z_loss: float,
                softcap: float | None):
    """linear_cross_entropy_pass's per-chunk step (see host.cross_entropy.chunked_linear_pass): the
    forward kernel reads the input-dtype logits once (lse, l_t), the backward kernel writes
    d(scale l)/dlogits over them IN PLACE, so the chunk holds one [rows, V] buffer."""
    logits = make_logits()
    acc = accumulation_dtype(logits.dtype)
    n = logits.shape[0]
    rows_loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    ones = torch.ones(n, dtype=acc, device=logits.device)
    row_forward(logits, labels, ones, rows_loss, lse, label_smoothing, z_loss, softcap)  # unscaled l_t
    if not with_grad:
        return rows_loss, None
    row_backward(logits, labels, scale, lse, ones[:1], logits, label_smoothing, z_loss, softcap)
    return rows_loss, logits


def linear_cross_entropy_pass(hidden, weight, bias, labels, scale, label_smoothing: float, z_loss: float,
                              softcap: float | None, chunk_budget_bytes: int, need_hidden: bool, need_weight: bool,
                              need_bias: bool):
    """torch_backend.linear_cross_entropy_pass (same arguments and returns) with the row kernels
    as the per-chunk step: logits by cuBLAS in the input dtype, lse / loss / dlogits (in place) by
    the kernels, the contractions by cuBLAS. One [rows, V] buffer in the input dtype per chunk."""
    chunk_loss = functools.partial(_chunk_loss, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return chunked_linear_pass(chunk_loss, hidden.element_size(), hidden, weight, bias, labels.contiguous(),
                               scale, chunk_budget_bytes, need_hidden, need_weight, need_bias)


# the backend API of fusedpeft.ops.cross_entropy on this module's pass
linear_cross_entropy_forward, linear_cross_entropy_backward = by_chunks(linear_cross_entropy_pass)
