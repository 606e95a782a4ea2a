"""linear_log_probs: per-token log-probabilities of a linear LM head without the logits.

What TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) computes, on fusedpeft's chunk
loop and kernels: for row t with target y_t, z = softcap(h_t W^T + b) / temperature (softcap c:
c tanh(./c)), log_probs = z_y - logsumexp(z), and when asked entropy = -sum_j p_j log p_j,
log_sum_sq_probs = log sum_j p_j^2, mean_logits = mean_j z_j, is_top1 = (argmax_j z_j == y), the
first maximum winning ties. Labels are aligned with the rows (nothing is shifted inside).
"""

from __future__ import annotations

import math
import numbers

from fusedpeft.backends import check_backend_name
from fusedpeft.fused._checks import check_labels, check_positive_int
from fusedpeft.fused.losses import check_linear_head
from fusedpeft.ops._common import cast_for_autocast
from fusedpeft.ops.log_probs import OUTPUTS
from fusedpeft.ops.log_probs import linear_log_probs as linear_log_probs_op


def check_head_options(where: str, outputs, temperature, softcap) -> None:
    """outputs: names among OUTPUTS; temperature a finite number > 0; softcap None or one."""
    if isinstance(outputs, str) or not all(isinstance(name, str) for name in outputs):
        raise TypeError(f"{where}: outputs must be a tuple of names among {OUTPUTS}, got {outputs!r}")
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"{where}: unknown output(s) {unknown}; choose among {OUTPUTS}")
    for name, value, required in (("temperature", temperature, True), ("softcap", softcap, False)):
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {name} must be a finite number > 0{'' if required else ' or None'}, "
                             f"got {value!r}")


def linear_log_probs(hidden, weight, labels, bias=None, *, outputs=("log_probs",), temperature=1.0, softcap=None,
                     ignore_index=-100, chunk_budget_bytes=None, backend=None) -> dict:
    """Per-token outputs of the head weight [V, H] (bias [V]) on hidden [..., H] for labels [...].

    outputs: names among ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1");
    log_probs is always returned. Returns {name: tensor of labels' shape}: float32 (float64 for
    float64 inputs), is_top1 bool; every output is 0 (False) where the label is ignore_index.
    log_probs and entropy carry gradients to hidden, weight and bias (computed chunk by chunk in
    backward, never rows x V); log_sum_sq_probs, mean_logits and is_top1 none. Under autocast
    hidden, weight and bias are cast to the autocast dtype, as an nn.Linear head would be.
    chunk_budget_bytes: bytes of chunk temporaries (None: linear_cross_entropy's default, but at
    least 256 rows of logits per chunk, at most 256 MiB); backend as in linear_cross_entropy.
    """
    where = "fusedpeft.linear_log_probs"
    check_linear_head(where, hidden, weight, bias)
    check_head_options(where, outputs, temperature, softcap)
    if chunk_budget_bytes is not None:
        check_positive_int(where, "chunk_budget_bytes", chunk_budget_bytes)
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"{where}: ignore_index must be an int, got {ignore_index!r}")
    check_labels(where, labels, weight.shape[0], hidden.shape[:-1], "hidden.shape[:-1]", ignore_index, hidden.device)
    check_backend_name(backend)
    hidden, weight, bias = cast_for_autocast(hidden, weight, bias)
    return linear_log_probs_op(hidden, weight, labels, bias, outputs=tuple(outputs), temperature=temperature,
                               softcap=softcap, ignore_index=ignore_index, chunk_budget_bytes=chunk_budget_bytes,
                               backend=backend)
