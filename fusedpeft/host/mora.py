"""The host side of MoRA that every backend shares (docs/contract.md §3): the geometry of a layer,
W + ΔW and ΔW built from M, the per-call strategy rule and dM from the branch input and dY.
The chunk / compress maps these use are in fusedpeft/host/mora_maps.py.
"""

from __future__ import annotations

import torch

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.core.mora import MoraGeometry
from fusedpeft.host.mora_maps import (
    chunk_input,
    chunk_input_add_,
    chunk_output_grad,
    chunk_targets,
    compress,
    decompress_transpose,
    rope_blocks,
    rotate_rows,
    shared_merged_weight,
)

# "merged" pays a fixed cost per call, one extra pass over W (W read, W + ΔW [D, K] written and read
# again by the GEMM); "explicit" pays per row. The GEMM does 2 N FLOPs per weight element: below 64
# rows that is under 32 FLOPs per fp32 byte of W, near or under the ridge point of CPUs (~10-30) and
# of GPUs' fp32 units (~20), so the GEMM is mostly bound by reading W and the extra pass costs about
# as much as the GEMM; with more rows the pass is a shrinking part. An estimate from this count, not a
# tuned value.
MERGED_MIN_ROWS = 64


def geometry(weight: torch.Tensor, M: torch.Tensor, mora_type: int) -> MoraGeometry:
    return MoraGeometry(weight.shape[1], weight.shape[0], M.shape[0], mora_type)


def merged_weight(weight: torch.Tensor, M: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    """W + ΔW [D, K] in weight's dtype (ΔW built in M's dtype for type 6, cast per block)."""
    if g.mora_type != 6:
        return shared_merged_weight(weight, M, g)
    out = weight.clone()
    blocks = rope_blocks(M, g).to(out.dtype)
    for i in range(g.used):
        for start, stop in chunk_targets(i, g):
            chunk_input_add_(out[start:stop], blocks[i, : stop - start], i, g)
    return out


def delta_weight(M: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    """ΔW [D, K] (fp32 when M is 16-bit, else M's dtype) with x @ ΔW^T == the MoRA branch."""
    dtype = torch.float32 if M.element_size() < 4 else M.dtype
    return merged_weight(torch.zeros(g.out_features, g.in_features, dtype=dtype, device=M.device), M, g)


def choose_strategy(x: torch.Tensor, dropout_p: float, weight=None) -> str:
    """"merged" or "explicit" (module docstring). A quantized base weight (not a tensor) always
    takes "explicit": W + ΔW would be a second dense weight next to the dequantized one."""
    quantized = weight is not None and not isinstance(weight, torch.Tensor)
    merged_ok = dropout_p == 0.0 and x.dtype in (torch.float32, torch.float64) and not quantized
    return "merged" if merged_ok and x.shape[0] >= MERGED_MIN_ROWS else "explicit"


def adapter_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, g: MoraGeometry) -> torch.Tensor:
    """dM [R, R] in fp32 (fp64 for fp64 inputs) from the branch input x [N, K] and grad_y [N, D]."""
    acc = accumulation_dtype(x.dtype)
    if g.mora_type != 6:
        return (decompress_transpose(grad_y, g).t() @ compress(x, g)).to(acc)
    n, r = x.shape[0], g.r_hat
    # chunks that are plain column blocks of both x and grad_y: one batched GEMM over views
    aligned = min(g.full_chunks, g.out_features // r) if g.n_chunks * r >= g.out_features else 0
    products = torch.bmm(grad_y[:, : aligned * r].view(n, aligned, r).permute(1, 2, 0),
                         x[:, : aligned * r].view(n, aligned, r).transpose(0, 1)).to(acc)
    grad_M = rotate_rows(products, slice(0, aligned), g).sum(0)
    for i in range(aligned, g.used):
        product = chunk_output_grad(grad_y, i, g).t() @ chunk_input(x, i, g)
        grad_M += rotate_rows(product.to(acc), i, g)
    return grad_M
