"""The "cpu" and "cuda" backends: the kernels of the C++/CUDA extension ``fusedpeft._C``
(``torch.ops.fusedpeft_C.*``, see csrc/ops.cpp) with the GEMMs left to ATen (MKL / cuBLAS).

One module per op family (lora, mora, cross_entropy) serves both backends: the extension's
dispatcher picks the CPU or the CUDA kernel from the tensors' device. Importing a family
module loads the extension; fusedpeft.backends only does so once the extension imports.
"""

from __future__ import annotations

import functools

import torch

OP_NAMES = ("ce_forward", "ce_backward", "ce_loss_and_grad_", "lora_shrink", "lora_shrink_backward",
            "mora_compress", "mora_compress_backward", "mora_decompress", "mora_decompress_backward", "dequantize_4bit")
# CPU-only helpers of the CPU backend (the CUDA path keeps these steps in ATen / Triton)
CPU_ONLY_OP_NAMES = ("lora_expand_backward", "mora_rope_merge", "mora_rope_weight_grad")


@functools.lru_cache(maxsize=None)
def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether ``fusedpeft_C::name`` has a kernel for ``dispatch_key``. Fixed once the extension has
    loaded, so asked once per process: every layer call resolves its backend, and the dispatcher
    look-ups cost ~3.5 us each (~50 us per DoRA step)."""
    import fusedpeft._C  # noqa: F401  (registers the ops)

    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedpeft_C::{name}", dispatch_key)


def has_kernels_for(dispatch_key: str) -> bool:
    """True when every op of the extension has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    names = OP_NAMES + CPU_ONLY_OP_NAMES if dispatch_key == "CPU" else OP_NAMES
    return all(has_kernel(name, dispatch_key) for name in names)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the extension cannot run on ``device`` (None when it can)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return f"the C++ extension has no kernels for {device.type} tensors"
    if not has_kernels_for(key):
        return (f"fusedpeft._C was built without {key} kernels (CUDA needs nvcc and a CUDA build of torch at "
                "install time; FUSEDPEFT_SKIP_CUDA=1 turns them off)")
    return None


def seed_value(seed: torch.Tensor | None, dropout_p: float) -> int:
    """The 64-bit dropout seed as a Python int (0 when dropout is off)."""
    return int(seed) if dropout_p > 0.0 else 0
