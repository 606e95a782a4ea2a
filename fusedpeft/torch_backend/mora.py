"""MoRA on the PyTorch path, two strategies chosen per call.

- "merged" (dropout off, fp32/fp64, at least host.mora.MERGED_MIN_ROWS rows): y = x @ (W + ΔW)^T and
  dX = dY @ (W + ΔW): W + ΔW [D, K] is built from M in one pass over W (types 1-4: broadcast
  adds of M over views of W; type 6: the blocks M·R_i added on W's block diagonal), so the
  forward and dX cost exactly the base GEMMs — no reshaped square matmul. Only dM needs its own
  reduction. In 16-bit dtypes W + ΔW would round ΔW away, so this strategy is fp32/fp64 only.
- "explicit" (dropout on, 16-bit, or few rows): compress x to [N, R], z @ M^T, decompress-add into
  the base output in place (types 1-4: 2 N R^2 extra FLOPs); type 6 runs each chunk through its
  block, x_i @ (M·R_i)^T, added into the output's columns in place (2 N R min(K + pad, D) FLOPs).
dM: types 1-4: decompress^T(dY)^T @ compress(x); type 6: sum_i rot_i(dY_i^T @ x_i) — the rotation
is applied to the R x R product, never to x. Saved for backward: x, M and the seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.core.mora import MoraGeometry
from fusedpeft.host.lora import add_base_input_grad_, base_input_grad
from fusedpeft.host.mora import adapter_weight_grad, choose_strategy, geometry, merged_weight
from fusedpeft.host.mora_maps import (
    chunk_input,
    chunk_input_add_,
    chunk_output_grad,
    chunk_targets,
    compress,
    compress_transpose_add_,
    decompress_add_,
    decompress_transpose,
    rope_blocks,
)
from fusedpeft.quantized import dense_weight
from fusedpeft.torch_backend.dropout import dropped_blocks


def _adapter_add_(y: torch.Tensor, x: torch.Tensor, M_x: torch.Tensor, g: MoraGeometry) -> None:
    """y [N, D] += MoRA branch of x [N, K]; M_x is M (types 1-4) or the blocks [n, R, R], in x's dtype."""
    if g.mora_type != 6:
        decompress_add_(y, compress(x, g) @ M_x.t(), g)
        return
    for i in range(g.used):
        x_i = chunk_input(x, i, g)
        targets = chunk_targets(i, g)
        if len(targets) == 1 and targets[0][1] - targets[0][0] == g.r_hat:
            y[:, targets[0][0] : targets[0][1]].addmm_(x_i, M_x[i].t())
            continue
        y_i = x_i @ M_x[i].t()
        for start, stop in targets:
            y[:, start:stop] += y_i[:, : stop - start]


def _adapter_input_grad_add_(out: torch.Tensor, grad_y: torch.Tensor, M_x: torch.Tensor, g: MoraGeometry) -> None:
    """out [N, K] += gradient of the MoRA branch wrt its input, from grad_y [N, D]."""
    if g.mora_type != 6:
        compress_transpose_add_(out, decompress_transpose(grad_y, g) @ M_x, g)
        return
    for i in range(g.used):
        chunk_input_add_(out, chunk_output_grad(grad_y, i, g) @ M_x[i], i, g)


def base_output(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, g: MoraGeometry):
    """x @ W^T + bias [N, D] (bias alone, or zeros, when weight is None: an 8-bit base's layer adds its own)."""
    if weight is not None:
        return F.linear(x, weight, bias)
    y = x.new_zeros(x.shape[0], g.out_features)
    return y if bias is None else y.add_(bias)


def _m_in(x_dtype: torch.dtype, M: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    return (rope_blocks(M, g) if g.mora_type == 6 else M).to(x_dtype)


def mora_forward(x, weight, bias, M, mora_type: int, dropout_p: float, seed, strategy: str | None = None):
    """x [N, K], weight [D, K], bias [D] | None, M [R, R] -> y [N, D] in x's dtype."""
    g = geometry(weight, M, mora_type)
    strategy = strategy or choose_strategy(x, dropout_p, weight)
    weight = dense_weight(weight, x.dtype)  # a quantized weight: see fusedpeft.quantized
    if strategy == "merged":
        return F.linear(x, merged_weight(weight, M, g), bias)
    y = base_output(x, weight, bias, g)
    M_x = _m_in(x.dtype, M, g)
    if dropout_p > 0.0:
        for rows, x_dropped in dropped_blocks(x, dropout_p, seed):
            _adapter_add_(y[rows], x_dropped, M_x, g)
    else:
        _adapter_add_(y, x, M_x, g)
    return y


def mora_backward(grad_y, x, weight, M, mora_type: int, dropout_p: float, seed, need_x: bool, need_M: bool,
                  strategy: str | None = None):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_M [R, R] | None)."""
    g = geometry(weight, M, mora_type)
    grad_y = grad_y.to(x.dtype).contiguous()
    strategy = strategy or choose_strategy(x, dropout_p, weight)
    weight = dense_weight(weight, x.dtype) if need_x else None
    grad_M = None
    if strategy == "merged":
        grad_x = grad_y @ merged_weight(weight, M, g) if need_x else None
        if need_M:
            grad_M = adapter_weight_grad(x, grad_y, g).to(M.dtype)
        return grad_x, grad_M
    M_x = _m_in(x.dtype, M, g)
    if dropout_p > 0.0:
        acc_dtype = accumulation_dtype(x.dtype)
        acc = torch.zeros(M.shape, dtype=acc_dtype, device=x.device) if need_M else None
        grad_x = torch.empty_like(x) if need_x else None

        def branch(rows: slice) -> torch.Tensor:  # the adapter's input gradient for rows, before dropout'
            out = x.new_zeros(rows.stop - rows.start, x.shape[1])
            _adapter_input_grad_add_(out, grad_y[rows], M_x, g)
            return out

        for rows, x_dropped in dropped_blocks(x, dropout_p, seed, grad_x, branch if need_x else None):
            if need_M:
                acc += adapter_weight_grad(x_dropped, grad_y[rows], g)
        grad_M = acc.to(M.dtype) if need_M else None
        grad_x = add_base_input_grad_(grad_x, grad_y, weight) if need_x else None
    else:
        grad_x = base_input_grad(grad_y, weight, x) if need_x else None
        if need_M:
            grad_M = adapter_weight_grad(x, grad_y, g).to(M.dtype)
        if need_x:
            _adapter_input_grad_add_(grad_x, grad_y, M_x, g)
    return grad_x, grad_M
