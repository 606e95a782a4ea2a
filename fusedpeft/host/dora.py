"""The DoRA pieces shared by the torch, cpu and triton backends: the weight norm without any
[D, K] tensor, the p = 0 forward, and the expand / magnitude gradients (the formulas, and what is
saved between forward and backward: fusedpeft/torch_backend/dora.py). g = m / n [D] throughout.
"""

from __future__ import annotations

import torch

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.host.lora import expand_onto_base
from fusedpeft.quantized import dense_weight
from fusedpeft.quantized import row_blocks as weight_row_blocks


# Rows of an [*, F] operand per block of the row-blocked passes: ~4 MiB of fp32 per temporary.
BLOCK_ELEMENTS = 1 << 20


def row_blocks(n_rows: int, n_cols: int):
    """Row slices of an [n_rows, n_cols] operand, BLOCK_ELEMENTS elements per block."""
    step = max(1, BLOCK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


# ------------------------------------------------------------------------------------------------
# the weight norm, factored
# ------------------------------------------------------------------------------------------------


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 [D] in fp32 (fp64 for fp64 W); 16-bit W is upcast, a quantized one
    (fusedpeft.quantized.QuantizedWeight) dequantized, a row block at a time."""
    acc = accumulation_dtype(weight.dtype)
    if isinstance(weight, torch.Tensor) and weight.dtype == acc:
        return torch.linalg.vector_norm(weight.detach(), dim=1).square()
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for rows, w in weight_row_blocks(weight, acc, BLOCK_ELEMENTS):
        out[rows] = torch.linalg.vector_norm(w, dim=1).square()
    return out


def _weight_times_At(weight: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """W A^T [D, r] in A's dtype (the accumulation dtype); 16-bit W upcast, a quantized one
    dequantized, a row block at a time."""
    if isinstance(weight, torch.Tensor) and weight.dtype == A.dtype:
        return weight.detach() @ A.t()
    out = torch.empty(weight.shape[0], A.shape[0], dtype=A.dtype, device=weight.device)
    for rows, w in weight_row_blocks(weight, A.dtype, BLOCK_ELEMENTS):
        torch.mm(w, A.t(), out=out[rows])
    return out


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """n [D] = ||W_i + s (B A)_i||_2, detached, in fp32 (fp64 for fp64 W), never forming [D, K]:

        n_i^2 = ||W_i||^2 + 2 s (B * (W A^T))_i . 1 + s^2 (B (A A^T) * B)_i . 1

    weight [D, K], lora_A [r, K], lora_B [D, r]; weight_sq: ||W_i||^2 [D] when cached by the
    caller (weight_sq_norm). FLOPs 2 D K r + 2 r^2 K + 2 D r^2; reads W once.
    """
    acc = accumulation_dtype(weight.dtype)
    A = lora_A.detach().to(acc)
    B = lora_B.detach().to(acc)
    sq = weight_sq_norm(weight) if weight_sq is None else weight_sq.to(acc)
    # both r-wide terms from one [D, r] matrix T = W A^T + (s/2) B (A A^T): n^2 = ||W||^2 + 2s (B * T) . 1
    # (three small GEMMs and [D, r]-sized elementwise ops: each parallel region costs on a busy CPU)
    T = _weight_times_At(weight, A).addmm_(B, A @ A.t(), alpha=0.5 * scaling)
    return torch.add(sq, torch.linalg.vecdot(B, T), alpha=2.0 * scaling).clamp_min_(0.0).sqrt_()


# ------------------------------------------------------------------------------------------------
# forward (p = 0) and the gradients
# ------------------------------------------------------------------------------------------------


def dora_weights(weight, dtype: torch.dtype, dropout_p: float, dequantize_4bit=None):
    """(W for the base product, W for V = x' W^T), each [D, K] in ``dtype`` or None.

    A dense or 4-bit weight is both (a 4-bit one dequantized once, by ``dequantize_4bit`` when
    given, else by bitsandbytes: fusedpeft.quantized.dense_weight). An 8-bit one has no base
    product here (None: fusedpeft.ops.dora scales bitsandbytes' own output); with dropout V
    reads its int8 rows times their scales (what PEFT's DoRA multiplies x' by), else None."""
    if isinstance(weight, torch.Tensor) or weight.kind != "8bit":
        w = dense_weight(weight, dtype, dequantize_4bit)
        return w, w
    if dropout_p == 0.0:
        return None, None
    v = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for rows, block in weight_row_blocks(weight, dtype):
        v[rows] = block
    return None, v


MERGED_MIN_ROWS = 64


def merged_strategy(x: torch.Tensor, weight, dropout_p: float) -> bool:
    """Whether the "merged" form applies (weight: the dense W or None): dropout off, fp32 / fp64, a
    dense W and N >= max(64, K / 2) rows. y = x W''^T + bias and dX = dY W'' with W'' = g (W + s B A)
    [D, K] (built in forward, rebuilt in backward, never saved), so y and dX cost exactly the base
    GEMMs: no [N, D] rank-r product, no pass over y, no dY * g. In 16-bit W'' would round s B A
    away (as MoRA's merged strategy, torch_backend/mora.py)."""
    return (dropout_p == 0.0 and isinstance(weight, torch.Tensor) and x.dtype in (torch.float32, torch.float64)
            and x.shape[0] >= max(MERGED_MIN_ROWS, weight.shape[1] // 2))


def merged_weight(weight: torch.Tensor, lora_A, lora_B, g, scaling: float) -> torch.Tensor:
    """W'' = g W + (s g B) A [D, K] in W's dtype (fp32 / fp64), a fresh buffer: one row-scale pass
    over W, then the rank-r product accumulated in place."""
    dt = weight.dtype
    gd = g.to(dt)
    return torch.mul(weight, gd[:, None]).addmm_(lora_B.to(dt) * (scaling * gd)[:, None], lora_A.to(dt))


def scale_output_(y: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = g * y + bias in place (one pass). y [N, D], g [D], bias [D] | None."""
    if bias is None:
        return y.mul_(g)
    return torch.addcmul(bias, y, g, out=y)


def forward_no_dropout(x, weight, bias, lora_A, lora_B, g, scaling: float, build_merged=merged_weight):
    """dora_forward at p = 0: (y = g * (x W^T + s S B^T) + bias [N, D], S = x A^T [N, r], an empty
    [0] for V), in x's dtype: LoRA's expand_onto_base gives u in y's buffer, one in-place pass
    scales it by g and adds the bias; or the merged form (merged_strategy), its W'' from
    ``build_merged`` (merged_weight's signature). weight: a dense W, or None for an 8-bit base
    (no base product)."""
    S = x @ lora_A.to(x.dtype).t()
    if merged_strategy(x, weight, 0.0):
        return torch.nn.functional.linear(x, build_merged(weight, lora_A, lora_B, g, scaling), bias), S, x.new_empty(0)
    y = expand_onto_base(S, x, weight, None, lora_B, scaling)
    return scale_output_(y, g, bias), S, x.new_empty(0)


def colsum_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t a_tj b_tj [D] in the accumulation dtype, a row block at a time. a, b [N, D].

    fp32 / fp64: blocks of ~256K elements (cache-sized) through one reused scratch block (a
    fresh multi-MiB temporary per block costs its page faults, measured 4x the arithmetic)."""
    acc = accumulation_dtype(a.dtype)
    out = torch.zeros(a.shape[1], dtype=acc, device=a.device)
    if a.dtype == acc and b.dtype == acc and a.shape[0] > 0:
        step = max(1, (BLOCK_ELEMENTS // 4) // max(1, a.shape[1]))
        scratch = a.new_empty(min(step, a.shape[0]), a.shape[1])
        for start in range(0, a.shape[0], step):
            stop = min(start + step, a.shape[0])
            out += torch.mul(a[start:stop], b[start:stop], out=scratch[: stop - start]).sum(0)
        return out
    for rows in row_blocks(*a.shape):
        out += (a[rows].to(acc) * b[rows].to(acc)).sum(0)
    return out


def _unscaled_columns(x, weight, lora_B, S, scaling: float, cols: torch.Tensor) -> torch.Tensor:
    """u[:, cols] = x W[cols]^T + s S B[cols]^T [N, len(cols)] in the accumulation dtype (no x W^T
    term when weight is None: an 8-bit base, whose product is outside the op)."""
    acc = accumulation_dtype(x.dtype)
    if weight is not None and not isinstance(weight, torch.Tensor):
        weight = dora_weights(weight, x.dtype, 0.0)[0]
    u = (S.to(acc) @ lora_B[cols].to(acc).t()).mul_(scaling)
    return u if weight is None else u.addmm_(x.to(acc), weight[cols].to(acc).t())


def expand_grads(dy, S, lora_B, g, scaling: float, need_S: bool, need_sdyS: bool):
    """dS = dY (s g B) [N, r] in dY's dtype and s dY^T S [D, r] (LoRA's grad_B) in the
    accumulation dtype; None when not needed."""
    dS = dy @ (lora_B * (scaling * g)[:, None]).to(dy.dtype) if need_S else None
    sdyS = torch.mm(S.t(), dy).t().to(accumulation_dtype(dy.dtype)).mul_(scaling) if need_sdyS else None
    return dS, sdyS


def grad_B_from(sdyS, lora_B, g) -> torch.Tensor:
    """dB = g * (s dY^T S) [D, r] in lora_B's dtype."""
    return (sdyS * g.to(sdyS.dtype)[:, None]).to(lora_B.dtype).contiguous()


def magnitude_grad_from_sums(num, dy, x, weight, lora_B, g, S, scaling: float) -> torch.Tensor:
    """dg [D] (p = 0) = num / g with num = colsum(dY * (Y - bias)) = g * colsum(dY * u); for the
    columns where g == 0 (Y holds no u there) from u recomputed for those columns only."""
    gg = g.to(num.dtype)
    zero = gg == 0
    if not bool(zero.any()):
        return num / gg
    dg = num / torch.where(zero, torch.ones_like(gg), gg)
    cols = zero.nonzero().squeeze(1)
    dg[cols] = (dy[:, cols].to(num.dtype) * _unscaled_columns(x, weight, lora_B, S, scaling, cols)).sum(0)
    return dg


def magnitude_grad_with_dropout(dy, V, lora_B, sdyS, g) -> torch.Tensor:
    """dg [D] (p > 0) = colsum(dY * V) + rowsum(B * (s dY^T S')), in g's dtype."""
    return (colsum_product(dy, V) + (lora_B.to(sdyS.dtype) * sdyS).sum(1)).to(g.dtype)
