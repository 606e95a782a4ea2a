"""SPEC §5 dropout for the PyTorch path: the mask regenerated block by block from the seed.

Nothing of size x is ever stored: callers walk the rows of x[M, K] in blocks and get, per block,
the multiplier keep / (1 - p) in x's dtype. Regenerating the Philox stream in plain PyTorch costs
about 60 int64 tensor operations per element; the C++ and Triton backends do it in registers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fusedpeft.reference import dropout_keep_mask

# Elements of x per block: on CPU the int64 temporaries stay cache-sized (~512 KiB each); on a
# GPU, blocks are large so that the ~60 elementwise kernels per block are not launch-bound.
BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}


def row_blocks(n_rows: int, n_cols: int, device_type: str = "cpu") -> Iterator[slice]:
    """Slices of rows whose blocks hold about BLOCK_ELEMENTS[device_type] elements."""
    step = max(1, BLOCK_ELEMENTS.get(device_type, 1 << 20) // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def dropout_multiplier(seed: torch.Tensor, p: float, rows: slice, n_cols: int, dtype, device) -> torch.Tensor:
    """keep(m, j) / (1 - p) for the rows ``rows`` of an [M, n_cols] input -> [len(rows), n_cols]."""
    keep = dropout_keep_mask(int(seed), rows.stop - rows.start, n_cols, p, row_start=rows.start, device=device)
    return keep.to(dtype) * torch.tensor(1.0 / (1.0 - p), dtype=dtype, device=device)


def dropped_blocks(x: torch.Tensor, p: float, seed: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """For x [M, K]: yields (rows, multiplier [b, K], dropout(x)[rows] [b, K]) block by block."""
    for rows in row_blocks(x.shape[0], x.shape[1], x.device.type):
        multiplier = dropout_multiplier(seed, p, rows, x.shape[1], x.dtype, x.device)
        yield rows, multiplier, x[rows] * multiplier
