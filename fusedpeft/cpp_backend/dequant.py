"""4-bit dequantization on the extension's kernels (fusedpeft_C::dequantize_4bit, csrc/cpu/dequant_4bit.cpp).

The format and the rule that W is bitsandbytes' own dequantization live in fusedpeft.quantized;
this module only hands a QuantizedWeight's tensors to the kernel.
"""

from __future__ import annotations

import torch

import fusedpeft._C  # noqa: F401  (registers torch.ops.fusedpeft_C)
from fusedpeft.quantized import QuantizedWeight, nested_absmax


def dequantize_4bit(q: QuantizedWeight) -> torch.Tensor:
    """W [out, in] in quant_state.dtype, bit-exact with bitsandbytes.functional.dequantize_4bit."""
    state = q.quant_state
    code2, absmax2, blocksize2, offset = nested_absmax(q)
    numel = state.shape[0] * state.shape[1]
    flat = torch.ops.fusedpeft_C.dequantize_4bit(q.packed, state.code, state.absmax, code2, absmax2, offset,
                                                 int(state.blocksize), blocksize2, numel, state.dtype)
    return flat.view(state.shape)
