"""Launch-side helpers shared by the Triton kernels of every op family."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def for_launch(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a kernel should read it: unchanged on a GPU; under the interpreter, which computes
    bf16 arithmetic and bf16 tl.dot wrongly without any error, bf16 is upcast to fp32."""
    if t is not None and t.dtype == torch.bfloat16 and interpreting():
        return t.float()
    return t


@functools.lru_cache(maxsize=None)
def capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` ((0, 0) under the interpreter)."""
    if interpreting() or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(index)


def device_capability(t: torch.Tensor) -> tuple[int, int]:
    """Compute capability of the device holding ``t`` ((0, 0) for CPU tensors)."""
    return capability(t.device.index or 0) if t.is_cuda else (0, 0)
