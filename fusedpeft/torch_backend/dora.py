"""DoRA on the PyTorch path (PEFT's use_dora=True), reusing the LoRA path's pieces.

With g = m / n [D] (n detached, computed by ``weight_norm`` below without any [D, K] tensor):

  p = 0:  y = g * (x W^T + s S B^T) + bias,  S = x A^T [N, r]
          (LoRA's expand_onto_base gives u = x W^T + s S B^T in y's buffer; one in-place pass
          scales it by g and adds the bias.)
          "merged" (fp32 / fp64, a dense W, N >= max(64, K / 2) rows): y = x W''^T + bias and
          dX = dY W'' with W'' = g (W + s B A) [D, K] (built in forward, rebuilt in backward:
          one D x r x K product and one row-scale pass over W each), so y and dX cost exactly
          the base GEMMs: no [N, D] rank-r product, no pass over y, no dY * g. In 16-bit W''
          would round s B A away (as MoRA's merged strategy, torch_backend/mora.py).
  p > 0:  y = x W^T + bias + (g - 1) * V + g s S' B^T,  S' = x' A^T, V = x' W^T, x' = dropout(x)
          (PEFT's formula: the middle term uses the dropped-out x, a second GEMM over x.)

Backward (dY [N, D]):
  dS = dY (s g B) [N, r];  dB = s g * (dY^T S) [D, r];  dA = dS^T x';
  p = 0:  dX = (dY * g) W + dS A,  row block by row block (no [N, D] temporary);
  p > 0:  dX = dY W + dropout'((dY * (g - 1)) W + dS A);
  dg_i = sum_t dY_ti u_ti with u the unscaled update: p > 0: colsum(dY * V) + s rowsum(B * (dY^T S')),
          p = 0: colsum(dY * (Y - bias)) / g (u recovered from the output Y; columns with g = 0,
          where Y carries no u, recompute u from x, W and S).

What is saved for dg, counted (N tokens, D outputs, K inputs; fp32, N = 2048, D = K = 1024):
  - recompute u = x W^T + s S B^T in backward: one more N x D x K GEMM, +50% of the frozen base's
    forward + backward FLOPs (4 N D K);
  - save u: one more [N, D] tensor alive from forward to backward (+8 MiB here, 1.5x the frozen
    layer's peak extra memory), and one elementwise pass;
  - save the output Y (p = 0, chosen): Y - bias = g * u, so u costs nothing to keep (Y is the
    op's own output, kept by autograd like tanh's) and one fused pass over (dY, Y) in backward.
    Its cost: Y must not be modified in place before backward (autograd raises if it is).
  - p > 0 (chosen: save V = x' W^T): the forward computes V anyway; recomputing it would take a
    GEMM plus the mask again, saving it costs one [N, D] tensor.
Accumulations (norm, dg, dA) are fp32, fp64 for fp64 inputs.
"""

from __future__ import annotations

import torch

from fusedpeft.quantized import dense_weight, row_blocks
from fusedpeft.torch_backend.dropout import dropped_blocks
from fusedpeft.torch_backend.lora import base_input_grad, expand_onto_base


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows of an [*, F] operand per block of the row-blocked passes: ~4 MiB of fp32 per temporary.
_BLOCK_ELEMENTS = 1 << 20


def _blocks(n_rows: int, n_cols: int):
    step = max(1, _BLOCK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


# ------------------------------------------------------------------------------------------------
# the weight norm, factored
# ------------------------------------------------------------------------------------------------


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_i||^2 [D] in fp32 (fp64 for fp64 W); 16-bit W is upcast, a quantized one
    (fusedpeft.quantized.QuantizedWeight) dequantized, a row block at a time."""
    acc = acc_dtype(weight.dtype)
    if isinstance(weight, torch.Tensor) and weight.dtype == acc:
        return torch.linalg.vector_norm(weight.detach(), dim=1).square()
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for rows, w in row_blocks(weight, acc, _BLOCK_ELEMENTS):
        out[rows] = torch.linalg.vector_norm(w, dim=1).square()
    return out


def _weight_times_At(weight: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """W A^T [D, r] in A's dtype (the accumulation dtype); 16-bit W upcast, a quantized one
    dequantized, a row block at a time."""
    if isinstance(weight, torch.Tensor) and weight.dtype == A.dtype:
        return weight.detach() @ A.t()
    out = torch.empty(weight.shape[0], A.shape[0], dtype=A.dtype, device=weight.device)
    for rows, w in row_blocks(weight, A.dtype, _BLOCK_ELEMENTS):
        torch.mm(w, A.t(), out=out[rows])
    return out


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """n [D] = ||W_i + s (B A)_i||_2, detached, in fp32 (fp64 for fp64 W), never forming [D, K]:

        n_i^2 = ||W_i||^2 + 2 s (B * (W A^T))_i . 1 + s^2 (B (A A^T) * B)_i . 1

    weight [D, K], lora_A [r, K], lora_B [D, r]; weight_sq: ||W_i||^2 [D] when cached by the
    caller (weight_sq_norm). FLOPs 2 D K r + 2 r^2 K + 2 D r^2; reads W once.
    """
    acc = acc_dtype(weight.dtype)
    A = lora_A.detach().to(acc)
    B = lora_B.detach().to(acc)
    sq = weight_sq_norm(weight) if weight_sq is None else weight_sq.to(acc)
    # both r-wide terms from one [D, r] matrix T = W A^T + (s/2) B (A A^T): n^2 = ||W||^2 + 2s (B * T) . 1
    # (three small GEMMs and [D, r]-sized elementwise ops: each parallel region costs on a busy CPU)
    T = _weight_times_At(weight, A).addmm_(B, A @ A.t(), alpha=0.5 * scaling)
    return (B * T).sum(1).mul_(2.0 * scaling).add_(sq).clamp_min_(0.0).sqrt_()


# ------------------------------------------------------------------------------------------------
# forward / backward (the backend API of fusedpeft.ops.dora)
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
    for rows, block in row_blocks(weight, dtype):
        v[rows] = block
    return None, v


MERGED_MIN_ROWS = 64


def merged_strategy(x: torch.Tensor, weight, dropout_p: float) -> bool:
    """Whether the "merged" form of the module docstring applies (weight: the dense W or None)."""
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


def dora_forward(x, weight, bias, lora_A, lora_B, g, scaling: float, dropout_p: float, seed):
    """x [N, K], weight [D, K], bias [D] | None, lora_A [r, K], lora_B [D, r], g [D] (m / n) ->
    (y [N, D], S [N, r], V [N, D] when dropout_p > 0 else an empty [0]), all in x's dtype.
    weight may be a fusedpeft.quantized.QuantizedWeight (see dora_weights)."""
    weight, v_weight = dora_weights(weight, x.dtype, dropout_p)
    A = lora_A.to(x.dtype)
    if dropout_p == 0.0:
        S = x @ A.t()
        if merged_strategy(x, weight, dropout_p):
            return torch.nn.functional.linear(x, merged_weight(weight, A, lora_B, g, scaling), bias), S, x.new_empty(0)
        y = expand_onto_base(S, x, weight, None, lora_B, scaling)
        return scale_output_(y, g, bias), S, x.new_empty(0)
    S = x.new_empty(x.shape[0], A.shape[0])
    V = x.new_empty(x.shape[0], v_weight.shape[0])
    for rows, _, x_dropped in dropped_blocks(x, dropout_p, seed):
        torch.mm(x_dropped, A.t(), out=S[rows])
        torch.mm(x_dropped, v_weight.t(), out=V[rows])
    y = expand_onto_base(S, x, weight, bias, lora_B * g[:, None], scaling)
    return y.addcmul_(V, g - 1), S, V


def colsum_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t a_tj b_tj [D] in the accumulation dtype, a row block at a time. a, b [N, D].

    fp32 / fp64: blocks of ~256K elements (cache-sized) through one reused scratch block (a
    fresh multi-MiB temporary per block costs its page faults, measured 4x the arithmetic)."""
    acc = acc_dtype(a.dtype)
    out = torch.zeros(a.shape[1], dtype=acc, device=a.device)
    if a.dtype == acc and b.dtype == acc and a.shape[0] > 0:
        step = max(1, (_BLOCK_ELEMENTS // 4) // max(1, a.shape[1]))
        scratch = a.new_empty(min(step, a.shape[0]), a.shape[1])
        for start in range(0, a.shape[0], step):
            stop = min(start + step, a.shape[0])
            out += torch.mul(a[start:stop], b[start:stop], out=scratch[: stop - start]).sum(0)
        return out
    for rows in _blocks(*a.shape):
        out += (a[rows].to(acc) * b[rows].to(acc)).sum(0)
    return out


def _unscaled_columns(x, weight, lora_B, S, scaling: float, cols: torch.Tensor) -> torch.Tensor:
    """u[:, cols] = x W[cols]^T + s S B[cols]^T [N, len(cols)] in the accumulation dtype (no x W^T
    term when weight is None: an 8-bit base, whose product is outside the op)."""
    acc = acc_dtype(x.dtype)
    if weight is not None and not isinstance(weight, torch.Tensor):
        weight = dora_weights(weight, x.dtype, 0.0)[0]
    u = (S.to(acc) @ lora_B[cols].to(acc).t()).mul_(scaling)
    return u if weight is None else u.addmm_(x.to(acc), weight[cols].to(acc).t())


def expand_grads(dy, S, lora_B, g, scaling: float, need_S: bool, need_sdyS: bool):
    """dS = dY (s g B) [N, r] in dY's dtype and s dY^T S [D, r] (LoRA's grad_B) in the
    accumulation dtype; None when not needed."""
    dS = dy @ (lora_B * (scaling * g)[:, None]).to(dy.dtype) if need_S else None
    sdyS = torch.mm(S.t(), dy).t().to(acc_dtype(dy.dtype)).mul_(scaling) if need_sdyS else None
    return dS, sdyS


def grad_B_from(sdyS, lora_B, g) -> torch.Tensor:
    """dB = g * (s dY^T S) [D, r] in lora_B's dtype."""
    return (sdyS * g.to(sdyS.dtype)[:, None]).to(lora_B.dtype).contiguous()


def backward_no_dropout(dy, x, weight, bias, lora_A, lora_B, g, out, S, dS, scaling: float, need_x: bool,
                        need_A: bool, need_g: bool):
    """The p = 0 rest of the backward given dS: (grad_x, grad_A, grad_g).

    Row block by row block, through one reused scratch block: dX = (dY * g) W + dS A, and
    colsum(dY * Y); then num = colsum(dY * (Y - bias)) = colsum(dY * Y) - bias * colsum(dY). Few,
    large blocks: every elementwise op is one parallel region, and on a busy CPU each region can
    cost a scheduler time slice; fresh large allocations cost page faults, hence the reuse."""
    grad_A = (dS.t() @ x).to(lora_A.dtype) if need_A else None
    grad_x = torch.empty_like(x) if need_x else None
    acc = acc_dtype(x.dtype)
    num = torch.zeros(dy.shape[1], dtype=acc, device=dy.device) if need_g else None
    A = lora_A.to(x.dtype)
    gx = g.to(x.dtype)
    step = max(1, _BLOCK_ELEMENTS // max(1, dy.shape[1]))
    scratch = dy.new_empty(min(step, dy.shape[0]), dy.shape[1])
    for rows in _blocks(*dy.shape):
        dyb, buf = dy[rows], scratch[: rows.stop - rows.start]
        if need_x and weight is None:  # 8-bit base: its part of dX flows through bitsandbytes' own layer
            torch.mm(dS[rows], A, out=grad_x[rows])
        elif need_x:
            torch.mm(torch.mul(dyb, gx, out=buf), weight, out=grad_x[rows]).addmm_(dS[rows], A)
        if need_g:
            if acc == dy.dtype:
                num += torch.mul(dyb, out[rows], out=buf).sum(0)
            else:  # 16-bit: products and sums in fp32
                num += (dyb.to(acc) * out[rows].to(acc)).sum(0)
    grad_g = None
    if need_g:
        if bias is not None:
            num -= bias.to(acc) * dy.sum(0, dtype=acc)
        grad_g = magnitude_grad_from_sums(num, dy, x, weight, lora_B, g, S, scaling).to(g.dtype)
    return grad_x, grad_A, grad_g


def magnitude_grad_from_sums(num, dy, x, weight, lora_B, g, S, scaling: float) -> torch.Tensor:
    """dg [D] (p = 0) = num / g with num = colsum(dY * (Y - bias)) = g * colsum(dY * u); for the
    columns where g == 0 (Y holds no u there) from u recomputed for those columns only."""
    gg = g.to(num.dtype)
    zero = gg == 0
    dg = num / torch.where(zero, torch.ones_like(gg), gg)
    if bool(zero.any()):
        cols = zero.nonzero().squeeze(1)
        dg[cols] = (dy[:, cols].to(num.dtype) * _unscaled_columns(x, weight, lora_B, S, scaling, cols)).sum(0)
    return dg


def dora_backward(grad_y, x, weight, bias, lora_A, lora_B, g, saved, S, scaling: float, dropout_p: float, seed,
                  need_x: bool, need_A: bool, need_B: bool, need_g: bool):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_A [r, K] | None, grad_B [D, r] | None, grad_g [D] | None).

    saved: the output Y [N, D] when dropout_p == 0, V = x' W^T [N, D] otherwise. grad_x in x's
    dtype, grad_A / grad_B / grad_g in lora_A's / lora_B's / g's dtypes. weight may be a
    fusedpeft.quantized.QuantizedWeight (dequantized again here, see dora_weights)."""
    dy = grad_y.to(x.dtype)
    v_weight = None
    if need_x:  # else weight stays as given: only zero-magnitude columns of dg read it
        weight, v_weight = dora_weights(weight, x.dtype, dropout_p)
    need_S = need_x or need_A
    dS, sdyS = expand_grads(dy, S, lora_B, g, scaling, need_S, need_B or (need_g and dropout_p > 0.0))
    grad_B = grad_B_from(sdyS, lora_B, g) if need_B else None
    if dropout_p == 0.0:
        merged = need_x and merged_strategy(x, weight, 0.0)
        grad_x, grad_A, grad_g = backward_no_dropout(dy, x, weight, bias, lora_A, lora_B, g, saved, S, dS, scaling,
                                                     need_x and not merged, need_A, need_g)
        if merged:
            grad_x = dy @ merged_weight(weight, lora_A, lora_B, g, scaling)
        return grad_x, grad_A, grad_B, grad_g
    grad_g = magnitude_grad_with_dropout(dy, saved, lora_B, sdyS, g) if need_g else None
    grad_x = base_input_grad(dy, weight, x) if need_x else None
    A = lora_A.to(x.dtype)
    acc = acc_dtype(x.dtype)
    grad_A_acc = torch.zeros(A.shape, dtype=acc, device=x.device) if need_A else None
    if need_S:
        g1 = (g - 1).to(x.dtype)
        for rows, multiplier, x_dropped in dropped_blocks(x, dropout_p, seed):
            if need_A:
                grad_A_acc += (dS[rows].t() @ x_dropped).to(acc)
            if need_x:
                t = (dy[rows] * g1) @ v_weight
                grad_x[rows].addcmul_(t.addmm_(dS[rows], A), multiplier)
    grad_A = grad_A_acc.to(lora_A.dtype) if need_A else None
    return grad_x, grad_A, grad_B, grad_g


def magnitude_grad_with_dropout(dy, V, lora_B, sdyS, g) -> torch.Tensor:
    """dg [D] (p > 0) = colsum(dY * V) + rowsum(B * (s dY^T S')), in g's dtype."""
    return (colsum_product(dy, V) + (lora_B.to(sdyS.dtype) * sdyS).sum(1)).to(g.dtype)
