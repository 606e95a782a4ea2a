"""The triton backend of linear_log_probs' forward (docs/contract.md §4): the chunk loop every
backend shares (host.cross_entropy.chunked_linear_pass) with the row kernel of
``log_probs_jit`` as the chunk step, so each chunk's logits (cuBLAS, input dtype) are read ONCE
for lse, log p, entropy, log sum p^2, mean logit and is_top1. The backward is not here: the op
layer uses the triton cross-entropy backward for log p alone, host.log_probs's PyTorch
chunk step when the entropy gets a gradient or a temperature follows a softcap.

Autotuning: (BLOCK_V, num_warps) per architecture (sm_90+, and sm_80 for the rest), keyed on V
and the constexprs; one fixed config under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch
import triton

from fusedpeft.kernels._common import device_capability, for_launch, interpreting
from fusedpeft.kernels.log_probs_jit import _log_probs_fwd_kernel
from fusedpeft.host.cross_entropy import accumulation_dtype, chunked_linear_pass

# every entry is AOT-compiled by tests/test_triton_log_probs_aot.py for its arch without spills
# (also with an odd V; (8192, 16) spilled 8 bytes there on sm_90, Triton 3.8)
CONFIGS = {
    90: [(2048, 4), (4096, 8)],
    80: [(2048, 4), (4096, 8)],
}
INTERPRETER_CONFIG = (32, 1)
_KEY = ["V", "ENTROPY", "LOG_SUM_SQ", "MEAN", "TOP1", "HAS_SOFTCAP"]


@functools.lru_cache(maxsize=None)
def _tuned(arch: int):
    pairs = [INTERPRETER_CONFIG] if interpreting() else CONFIGS[arch]
    configs = [triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in pairs]
    return triton.autotune(configs=configs, key=_KEY)(_log_probs_fwd_kernel)


def row_log_probs(logits, targets, rows, stats, wanted, inv_temperature: float, softcap):
    """logits [n, V] (unit column stride), targets [N] int64 in [0, V), rows [n] int64 ids in
    [0, N), stats [6, N] zeroed, in the accumulation dtype -> log p [n] (accumulation dtype); writes
    stats[i, rows] for i in 1..4 where wanted[i] (host.log_probs.OUTPUTS order) and
    stats[5, rows] = lse."""
    n, vocab = logits.shape
    log_probs = torch.empty(n, dtype=stats.dtype, device=logits.device)
    if n == 0:
        return log_probs
    src = for_launch(logits)
    arch = 90 if device_capability(src)[0] >= 9 else 80
    _tuned(arch)[(n,)](src, targets, rows, log_probs, stats, vocab, src.stride(0), stats.stride(0),
                       1.0 if softcap is None else float(softcap), float(inv_temperature), ENTROPY=bool(wanted[1]),
                       LOG_SUM_SQ=bool(wanted[2]), MEAN=bool(wanted[3]), TOP1=bool(wanted[4]),
                       HAS_SOFTCAP=softcap is not None)
    return log_probs


def _forward_step(make_logits, rows, scale, with_grad, *, targets, stats, wanted, softcap, inv_temperature):
    """chunked_linear_pass's chunk step: the chunk's logits (input dtype), one kernel launch."""
    logits = make_logits()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return row_log_probs(logits, targets, rows, stats, wanted, inv_temperature, softcap), None


def linear_log_probs_forward(hidden, weight, bias, targets, row_mask, wanted, inv_temperature: float,
                             softcap: float | None, chunk_budget_bytes: int):
    """host.log_probs.linear_log_probs_forward (same arguments and result: stats [6, N]),
    one [rows, V] buffer of input-dtype logits per chunk, read once by the row kernel."""
    n_rows = hidden.shape[0]
    stats = torch.zeros(6, n_rows, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
    step = functools.partial(_forward_step, targets=targets.contiguous(), stats=stats, wanted=tuple(wanted),
                             softcap=softcap, inv_temperature=float(inv_temperature))
    rows = torch.arange(n_rows, device=hidden.device)
    log_probs, *_ = chunked_linear_pass(step, hidden.element_size(), hidden, weight, bias, rows, row_mask,
                                        chunk_budget_bytes, False, False, False)
    stats[0] = log_probs
    return stats
