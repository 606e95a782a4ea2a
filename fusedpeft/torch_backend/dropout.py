"""docs/contract.md §5 dropout for the PyTorch path: the mask made block by block from the seed.

Callers walk the rows of x[M, K] in blocks. Forward: ``dropped_blocks(x, p, seed)`` yields
dropout(x) per block. Backward: ``dropped_blocks(x, p, seed, grad_x, branch)`` first writes
dropout'(branch(rows)) (the branch gradient [b, K] times keep / (1 - p)) into grad_x[rows], from
the same mask, then yields dropout(x) for the block: each block's mask is made once per pass;
callers then add the base layer's dY @ W as the GEMM's beta = 1 accumulation. Nothing of size x
is stored between forward and backward, except where the LoRA op saves the mask (bool [M, K],
host.lora.stores_keep_mask: CPU): the forward's ``keep_out`` receives it and ``kept_blocks``
replays it in backward with three elementwise passes per block instead of the Philox.

The mask is the Philox4x32-10 first word per element. In eager PyTorch that is ~100 int64 tensor
operations per element, so core/philox.py's keep_mask is compiled by torch.compile (one loop per
block, same bits; one compile per graph, dtype and device type, ~10 s on CPU, then Inductor's
cache), with the keys, first row and p passed as tensors so that one graph serves every seed,
block and p. Inductor is told not to materialise the int64 intermediates (by default it writes
four [b, K] int64 buffers per block: 4x the memory of an fp32 block and slower).
Measured on the loaded 2-core VM, one thread, CPU time, x 2048 x 1024 fp32: the compiled mask
and dropped x ~9 ms, PEFT's F.dropout ~12 ms; the pure Philox (mask count only) ~8 ms.
Where compiling fails (no C++ compiler, an unsupported device) the eager formula runs, with one
warning; FUSEDPEFT_EAGER_DROPOUT=1 forces it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import torch

from fusedpeft.core.philox import MASK32, keep_mask as keep_mask_at

# Elements of x per block: bounds every temporary (the dropped block, the branch gradient) to a
# block. Compiled, CPU, LoRA 2048 x 1024 -> 1024 fp32 r16 fwd+bwd against PEFT in the same process
# (one thread, CPU time, loaded VM): 2^20 0.94x PEFT's time, 28 MiB peak extra (PEFT 40 MiB);
# 2^18 1.04x, 19 MiB (each compiled call costs ~0.2 ms of guards and wrappers); all of x in
# one call 1.0x, 32 MiB. Eager formula: its int64 temporaries stay cache-sized (~512 KiB each);
# on a GPU, blocks are large so that the kernels per block are not launch-bound.
BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
EAGER_BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}
# Inductor options for the compiled mask: keep the whole Philox in one loop (its defaults
# realise intermediates of more than ~30 ops, here four int64 [b, K] buffers per block).
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1 << 14}
_COMPILED: dict[tuple[str, str], object] = {}  # (graph, device type) -> compiled function, None after a failure


def keep_mask(k0: torch.Tensor, k1: torch.Tensor, row_start: torch.Tensor, n_rows: int, n_cols: int,
              p: torch.Tensor) -> torch.Tensor:
    """The contract's keep mask of rows row_start .. row_start + n_rows of an [M, n_cols] input, with
    tensor arguments: k0 / k1 the seed's low / high 32 bits, row_start (0-dim int64), p (0-dim
    float32) -> bool [n_rows, n_cols], True where kept."""
    rows = torch.arange(n_rows, dtype=torch.int64, device=k0.device).unsqueeze(1) + row_start
    cols = torch.arange(n_cols, dtype=torch.int64, device=k0.device).unsqueeze(0)
    return keep_mask_at(k0, k1, rows * n_cols + cols, p)


def dropped_block(x: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, row_start: torch.Tensor,
                  p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [b, K] (global rows row_start ..) -> dropout(x) [b, K] in x's dtype;
    scale = 1 / (1 - p) as a 0-dim tensor of x's dtype."""
    return x * (keep_mask(k0, k1, row_start, x.shape[0], x.shape[1], p).to(x.dtype) * scale)


def dropped_block_and_keep(x: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, row_start: torch.Tensor,
                           p: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped_block(x, ...) [b, K], the keep mask as int32 [b, K], 1 where kept) from one
    evaluation of the mask. int32, not bool: Inductor's CPU loop with a 1-byte output is not
    vectorised (measured, 1024 x 1024 fp32, one thread: 3.9 ms with an int32 mask, 14.0 ms with a
    bool one, 8.0 ms with uint8; 3.7 ms without the mask); the caller narrows it to bool."""
    keep = keep_mask(k0, k1, row_start, x.shape[0], x.shape[1], p)
    return x * (keep.to(x.dtype) * scale), keep.to(torch.int32)


def dropped_block_and_grad_(x: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, row_start: torch.Tensor,
                            p: torch.Tensor, scale: torch.Tensor, grad_x: torch.Tensor,
                            branch: torch.Tensor) -> torch.Tensor:
    """dropped_block(x, ...) [b, K], and grad_x [b, K] = branch [b, K] * keep / (1 - p), written in place."""
    multiplier = keep_mask(k0, k1, row_start, x.shape[0], x.shape[1], p).to(x.dtype) * scale
    grad_x.copy_(branch * multiplier)
    return x * multiplier


_GRAPHS = {"forward": dropped_block, "forward_keep": dropped_block_and_keep, "backward": dropped_block_and_grad_}


def _eager() -> bool:
    return os.environ.get("FUSEDPEFT_EAGER_DROPOUT") == "1"


def _function(graph: str, device: torch.device):
    """The graph compiled for ``device``'s type (on first use), else the eager one."""
    if _eager() or torch.compiler.is_compiling():
        return _GRAPHS[graph]  # inside a user's torch.compile the formula is traced into their graph
    key = (graph, device.type)
    if key not in _COMPILED:
        import torch._inductor.config as inductor_config

        options = {k: v for k, v in _INDUCTOR_OPTIONS.items() if hasattr(inductor_config, k)}
        _COMPILED[key] = torch.compile(_GRAPHS[graph], dynamic=True, options=options)
    return _COMPILED[key] or _GRAPHS[graph]


def _call(graph: str, device: torch.device, *args):
    fn = _function(graph, device)
    if fn is _GRAPHS[graph]:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any compile failure: the eager formula gives the same bits
        _COMPILED[(graph, device.type)] = None
        warnings.warn(f"fusedpeft torch backend: compiling the dropout mask for {device.type} failed "
                      f"({type(exc).__name__}: {str(exc)[:200]}); using the eager formula (same mask, much slower)",
                      RuntimeWarning, stacklevel=3)
        return _GRAPHS[graph](*args)


def row_blocks(n_rows: int, n_cols: int, device_type: str = "cpu") -> Iterator[slice]:
    """Slices of rows whose blocks hold about BLOCK_ELEMENTS[device_type] elements
    (EAGER_BLOCK_ELEMENTS when the eager formula makes the mask)."""
    eager = _eager() or any(_COMPILED.get((g, device_type), True) is None for g in _GRAPHS)
    sizes = EAGER_BLOCK_ELEMENTS if eager else BLOCK_ELEMENTS
    step = max(1, sizes.get(device_type, 1 << 20) // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def dropped_blocks(x: torch.Tensor, p: float, seed: torch.Tensor, grad_x: torch.Tensor | None = None,
                   branch: Callable[[slice], torch.Tensor] | None = None,
                   keep_out: torch.Tensor | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """For x [M, K]: yields (rows, dropout(x)[rows] [b, K]) block by block, in x's dtype.

    Backward use: with grad_x [M, K] (x's dtype, contiguous) and branch(rows) -> [b, K], each block
    first sets grad_x[rows] = branch(rows) * keep / (1 - p), from the same mask as the yielded block.
    Forward use with keep_out (bool [M, K]): each block's mask is also written there (kept_blocks
    then replays it in backward).
    """
    device = x.device
    seed = torch.as_tensor(seed, dtype=torch.int64).to(device)
    keys = (seed & MASK32, (seed >> 32) & MASK32)
    p_t = torch.tensor(p, dtype=torch.float32, device=device)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype, device=device)
    for rows in row_blocks(x.shape[0], x.shape[1], device.type):
        args = (x[rows], *keys, torch.tensor(rows.start, dtype=torch.int64, device=device), p_t, scale)
        if grad_x is not None:
            yield rows, _call("backward", device, *args, grad_x[rows], branch(rows).to(x.dtype))
        elif keep_out is not None:
            dropped, keep = _call("forward_keep", device, *args)
            keep_out[rows] = keep
            yield rows, dropped
        else:
            yield rows, _call("forward", device, *args)


def kept_blocks(x: torch.Tensor, keep: torch.Tensor, p: float, grad_x: torch.Tensor | None = None,
                branch_into: Callable[[slice, torch.Tensor], object] | None = None
                ) -> Iterator[tuple[slice, torch.Tensor]]:
    """dropped_blocks' backward use from a mask saved in forward (keep bool [M, K], dropped_blocks'
    keep_out): yields (rows, dropout(x)[rows]), first setting grad_x[rows] = branch * keep / (1 - p)
    when grad_x is given, where branch_into(rows, out) writes the branch gradient [b, K] into out
    (grad_x[rows] itself: no temporary). Elementwise passes in eager PyTorch, no Philox."""
    scale = 1.0 / (1.0 - p)
    for rows in row_blocks(x.shape[0], x.shape[1], x.device.type):
        multiplier = keep[rows].to(x.dtype).mul_(scale)
        if grad_x is not None:
            branch_into(rows, grad_x[rows])
            grad_x[rows].mul_(multiplier)
        yield rows, multiplier.mul_(x[rows])
