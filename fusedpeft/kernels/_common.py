"""Launch rules shared by the Triton kernels of every op family (lora, dora, mora, cross_entropy,
dequant): which tensors they accept, which config class a GPU gets, the dot precision and the
accumulation dtype a dtype runs with, the SM count that sizes split reductions, and the
interpreter (TRITON_INTERPRET=1, CPU tests) special cases."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

from fusedpeft.core.dtypes import accumulation_dtype

# dtypes of x / W / logits the kernels compute in (adapters may be any float dtype: cast on load)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"the Triton kernels need CUDA tensors (got {device.type})"


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


def arch_class_of(cap: tuple[int, int]) -> int:
    """The config class of a compute capability: 90 for the data-centre GPUs with ~227 KB of shared
    memory per block and Triton's large-tile MMA paths (sm_90 Hopper: wgmma; sm_100 / sm_103
    Blackwell: tcgen05), 80 for everything else (sm_80 / sm_86 / sm_89, and sm_120 / sm_121
    consumer Blackwell, which has ~99 KB of shared memory per block and mma.sync only, so the sm_90 tiles
    would not fit). The configs of each class are compiled ahead of time in tests/test_triton_*_aot.py."""
    return 90 if cap[0] in (9, 10) else 80


def arch_class(t: torch.Tensor) -> int:
    """arch_class_of the device holding ``t`` (80 for CPU tensors under the interpreter)."""
    return arch_class_of(device_capability(t))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: IEEE for fp32 / fp64 (fp32 matches PyTorch's default fp32 matmul,
    no TF32), "tf32" for 16-bit inputs (where it has no effect)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def tl_accumulation_dtype(dtype: torch.dtype):
    """fusedpeft.core.dtypes.accumulation_dtype as a triton.language dtype (a kernel's ACC constexpr)."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``: sizes the split reductions."""
    return torch.cuda.get_device_properties(index).multi_processor_count
