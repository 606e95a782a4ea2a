"""docs/contract.md §5 dropout for the PyTorch path: the mask regenerated block by block from the seed.

Nothing of size x is ever stored: callers walk the rows of x[M, K] in blocks and get, per block,
the multiplier keep / (1 - p) in x's dtype. The Philox stream in eager PyTorch costs about 120
int64 tensor operations per element (measured ~70x slower than F.dropout on CPU), so the mask
comes from a torch.compile'd copy of the reference formula, fused with the multiplier and the
dropped block (one loop, same bits; one compile per process and device type, ~8 s on CPU, then
Inductor's cache), with the keys, first row and p passed as tensors so that one graph serves
every seed, block and p. Where compiling
fails (no C++ compiler, an unsupported device) the eager formula runs, with one warning;
FUSEDPEFT_EAGER_DROPOUT=1 forces it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import torch

from fusedpeft.reference import _MASK32, philox4x32_words, uniform_from_word

# Elements of x per block. Compiled mask: 2^20 on CPU. Measured on the loaded 2-core VM (2048 x
# 1024 fp32, r=16, p=0.05, LoRA fwd+bwd): 2^20 ~280-310 ms and 64 MiB peak extra memory (block
# temporaries, bounded by the block, not by x), 2^18 440-750 ms / 28 MiB, 2^16 1.7-2 s / 19 MiB; PEFT
# 170-230 ms / 40 MiB. Each block costs a few parallel regions, and on a loaded machine every one
# waits for both threads; a single mask for all rows (one compiled call) measured 98 MiB.
# Eager formula: on CPU its int64 temporaries stay cache-sized (~512 KiB each); on a GPU, blocks
# are large so that the kernels per block are not launch-bound.
BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
EAGER_BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}
_COMPILED: dict[str, object] = {}  # device type -> compiled mask function, or None after a failed compile


def row_blocks(n_rows: int, n_cols: int, device_type: str = "cpu") -> Iterator[slice]:
    """Slices of rows whose blocks hold about BLOCK_ELEMENTS[device_type] elements
    (EAGER_BLOCK_ELEMENTS when the eager formula makes the mask)."""
    eager = os.environ.get("FUSEDPEFT_EAGER_DROPOUT") == "1" or _COMPILED.get(device_type, True) is None
    sizes = EAGER_BLOCK_ELEMENTS if eager else BLOCK_ELEMENTS
    step = max(1, sizes.get(device_type, 1 << 20) // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def mask_from_keys(k0: torch.Tensor, k1: torch.Tensor, row_start: torch.Tensor, n_rows: int, n_cols: int,
                   p: torch.Tensor) -> torch.Tensor:
    """reference.dropout_keep_mask with tensor arguments: k0 / k1 the seed's low / high 32 bits and
    row_start (0-dim int64), p (0-dim float32) -> bool [n_rows, n_cols], True where kept."""
    rows = torch.arange(n_rows, dtype=torch.int64, device=k0.device).unsqueeze(1) + row_start
    cols = torch.arange(n_cols, dtype=torch.int64, device=k0.device).unsqueeze(0)
    word = philox4x32_words(k0, k1, ((rows * n_cols + cols) & _MASK32, 0, 0, 0))[0]
    return uniform_from_word(word) >= p


def dropped_block(x: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, row_start: torch.Tensor,
                  p: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, K] (global rows row_start ..) -> (multiplier keep / (1 - p) [b, K], dropout(x) [b, K]),
    both in x's dtype; scale = 1 / (1 - p) as a 0-dim tensor of x's dtype."""
    multiplier = mask_from_keys(k0, k1, row_start, x.shape[0], x.shape[1], p).to(x.dtype) * scale
    return multiplier, x * multiplier


def _block_function(device: torch.device):
    """dropped_block compiled for ``device``'s type (on first use), else the eager one."""
    if os.environ.get("FUSEDPEFT_EAGER_DROPOUT") == "1" or torch.compiler.is_compiling():
        return dropped_block  # inside a user's torch.compile the formula is traced into their graph
    if device.type not in _COMPILED:
        _COMPILED[device.type] = torch.compile(dropped_block, dynamic=True)
    return _COMPILED[device.type] or dropped_block


def dropout_multiplier_and_input(x: torch.Tensor, seed: torch.Tensor, p: float, rows: slice
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For the block x[rows] of x [M, K]: (keep / (1 - p), dropout(x)[rows]), each [len(rows), K] in x's dtype."""
    device = x.device
    seed = torch.as_tensor(seed, dtype=torch.int64).to(device)
    args = (x[rows], seed & _MASK32, (seed >> 32) & _MASK32, torch.tensor(rows.start, dtype=torch.int64, device=device),
            torch.tensor(p, dtype=torch.float32, device=device),
            torch.tensor(1.0 / (1.0 - p), dtype=x.dtype, device=device))
    fn = _block_function(device)
    if fn is dropped_block:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any compile failure: the eager formula gives the same bits
        _COMPILED[device.type] = None
        warnings.warn(f"fusedpeft torch backend: compiling the dropout mask for {device.type} failed "
                      f"({type(exc).__name__}: {str(exc)[:200]}); using the eager formula (same mask, much slower)",
                      RuntimeWarning, stacklevel=2)
        return dropped_block(*args)


def dropped_blocks(x: torch.Tensor, p: float, seed: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """For x [M, K]: yields (rows, multiplier [b, K], dropout(x)[rows] [b, K]) block by block."""
    for rows in row_blocks(x.shape[0], x.shape[1], x.device.type):
        yield rows, *dropout_multiplier_and_input(x, seed, p, rows)
