"""MoRA on the C++ kernels: compress / decompress without padded copies, ATen GEMMs.

Same API as fusedpeft.torch_backend.mora. Two strategies, chosen as on the torch path
(host.mora.choose_strategy):
- "merged" (dropout off, fp32/fp64, many rows): y = x @ (W + ΔW)^T and dX = dY @ (W + ΔW),
  W + ΔW built in one pass over W (type 6 on CPU: fusedpeft_C::mora_rope_merge; else
  host.mora.merged_weight), so the forward and dX cost the base GEMMs alone;
  dM = decompress^T(dY)^T @ compress(x) by the kernels below (type 6 without dropout: R x R
  products of column blocks, rotated afterwards, by fusedpeft_C::mora_rope_weight_grad on CPU).
- "explicit": z = compress(dropout(x)) (fusedpeft_C::mora_compress: [N, R] for types 1-4, the
  rotated chunks [N, n R] for type 6, mask generated in-kernel), y_slots = z @ M^T (ATen; type 6
  as [N n, R] rows), y = bias + decompress(y_slots) (fusedpeft_C::mora_decompress), then
  y += x @ W^T accumulated by addmm_. Backward: h = decompress^T(dY); dM = h^T z;
  dX = compress^T(h M) (mask re-generated in-kernel) + dY @ W, again by addmm_.
Compute dtype: float32 (float64 for float64 x); z, h and M stay in it for 16-bit x.
Saved for backward: x, M and the seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedpeft._C  # noqa: F401  (registers torch.ops.fusedpeft_C)
from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.core.mora import MoraGeometry, rope_tables
from fusedpeft.cpp_backend import seed_value, unavailable_reason  # noqa: F401  (read by fusedpeft.backends)
from fusedpeft.cpp_backend.dequant import dequantize_4bit
from fusedpeft.host.lora import add_base_input_grad_
from fusedpeft.host.mora import adapter_weight_grad, choose_strategy, geometry, merged_weight
from fusedpeft.quantized import dense_weight

_ops = torch.ops.fusedpeft_C


def _tables(g: MoraGeometry, device: torch.device):
    return rope_tables(g.r_hat, g.n_chunks, device) if g.mora_type == 6 else (None, None)


def _slot_width(g: MoraGeometry) -> int:
    """Columns of z per row: n R for type 6, R otherwise (explicit, so that 0 rows reshape too)."""
    return g.n_chunks * g.r_hat if g.mora_type == 6 else g.r_hat


def _compress(x, g: MoraGeometry, dropout_p: float, seed) -> torch.Tensor:
    """x [N, K] -> z [N n_z, R] in the compute dtype (n_z = 1, or n chunks for type 6)."""
    cos, sin = _tables(g, x.device)
    z = _ops.mora_compress(x, g.r_hat, g.mora_type, dropout_p, seed_value(seed, dropout_p), cos, sin)
    return z.view(-1, g.r_hat)


def _decompress_transpose(grad_y, g: MoraGeometry) -> torch.Tensor:
    """grad_y [N, D] -> h [N n_z, R] in the compute dtype."""
    return _ops.mora_decompress_backward(grad_y, g.r_hat, g.mora_type, g.n_chunks).view(-1, g.r_hat)


def _merged_weight(weight, M, g: MoraGeometry) -> torch.Tensor:
    """W + ΔW [D, K] in weight's dtype (type 6 on CPU: one kernel pass, fusedpeft_C::mora_rope_merge)."""
    if g.mora_type == 6 and weight.device.type == "cpu":
        return _ops.mora_rope_merge(weight, M, g.r_hat, *_tables(g, weight.device))
    return merged_weight(weight, M, g)


def _rotated_weight_grad(x, grad_y, g: MoraGeometry) -> torch.Tensor:
    """dM [R, R] of type 6 without dropout, compute dtype (on CPU: fusedpeft_C::mora_rope_weight_grad)."""
    if x.device.type == "cpu":
        return _ops.mora_rope_weight_grad(x, grad_y, g.r_hat, *_tables(g, x.device))
    return adapter_weight_grad(x, grad_y, g)


def mora_forward(x, weight, bias, M, mora_type: int, dropout_p: float, seed, strategy: str | None = None):
    """x [N, K], weight [D, K], bias [D] | None, M [R, R] -> y [N, D] in x's dtype."""
    g = geometry(weight, M, mora_type)
    strategy = strategy or choose_strategy(x, dropout_p, weight)
    weight = dense_weight(weight, x.dtype, dequantize_4bit)  # a quantized weight: see fusedpeft.quantized
    if strategy == "merged":
        return F.linear(x, _merged_weight(weight, M, g), bias)
    n = x.shape[0]
    y_slots = _compress(x, g, dropout_p, seed) @ M.to(accumulation_dtype(x.dtype)).t()
    y = _ops.mora_decompress(y_slots.view(n, _slot_width(g)), g.out_features, g.r_hat, mora_type, bias, x.dtype)
    return y if weight is None else y.addmm_(x, weight.t())


def mora_backward(grad_y, x, weight, M, mora_type: int, dropout_p: float, seed, need_x: bool, need_M: bool,
                  strategy: str | None = None):
    """grad_y [N, D] -> (grad_x [N, K] | None, grad_M [R, R] | None)."""
    g = geometry(weight, M, mora_type)
    grad_y = grad_y.to(x.dtype).contiguous()
    strategy = strategy or choose_strategy(x, dropout_p, weight)
    weight = dense_weight(weight, x.dtype, dequantize_4bit) if need_x else None
    # type 6 without dropout: dM from R x R products of column blocks of x and dY, rotated after
    # the product (torch backend), instead of the rotated copy of x the compress kernel builds
    rotate_products = mora_type == 6 and dropout_p == 0.0
    explicit_dx = need_x and strategy != "merged"
    h = _decompress_transpose(grad_y, g) if explicit_dx or (need_M and not rotate_products) else None
    grad_M = None
    if need_M:
        grad_M = (_rotated_weight_grad(x, grad_y, g) if rotate_products
                  else h.t() @ _compress(x, g, dropout_p, seed)).to(M.dtype)
    if not need_x:
        return None, grad_M
    if strategy == "merged":
        return grad_y @ _merged_weight(weight, M, g), grad_M
    cos, sin = _tables(g, x.device)
    grad_z = (h @ M.to(h.dtype)).view(x.shape[0], _slot_width(g))
    grad_x = _ops.mora_compress_backward(grad_z, g.in_features, g.r_hat, mora_type, dropout_p,
                                         seed_value(seed, dropout_p), cos, sin, x.dtype)
    return add_base_input_grad_(grad_x, grad_y, weight), grad_M
