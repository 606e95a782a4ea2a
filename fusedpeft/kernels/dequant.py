"""The "triton" backend's 4-bit dequantization: one memory-bound kernel writing W into a buffer that
the existing fused LoRA / MoRA GEMMs (kernels/lora.py, kernels/mora.py) then read as a dense weight.

Why a separate kernel rather than dequantizing inside the GEMM's K loop (counted with docs/architecture.md §2's
rules at the training size of the issue: N = 8192 tokens, 4096 -> 4096, bf16, NF4 blocksize 64,
128 x 128 GEMM tiles; one GEMM of the forward, the dX GEMM of the backward costs the same):
- FLOPs: the GEMM is 2 N K D = 275 GFLOP on tensor cores either way. In the K loop every one of
  the N / 128 = 64 row blocks dequantizes the whole weight again: 64 x 16.8 M = 1.07 G
  dequantizations (unpack, 16-entry table lookup, scale multiply, convert: ~5 ops each, ~5.4 G
  CUDA-core ops, plus a gather from the code table) inside the loop that feeds the tensor cores.
  A separate kernel dequantizes each element once: 16.8 M dequantizations (~84 M ops), 64x fewer.
- Bytes (HBM): in the K loop W is read packed, 8.4 MB (+ 1 MB of scales), once per GEMM from
  HBM (L2 serves the other row blocks). The buffer costs 8.4 MB read + 33.5 MB bf16 written +
  33.5 MB read by the GEMM = 75 MB, ~16 us at 4.8 TB/s, against a GEMM of ~280-400 us: +4-6 %.
- The K-loop variant would save those ~16 us per GEMM but spend ~5.4 G ops of ALU work on the
  critical path of every K step (at ~60 TOP/s of CUDA-core throughput that alone is ~90 us, and
  Triton cannot overlap it with the MMAs without warp specialisation), and its lookup tile adds
  registers to GEMMs that are already at the no-spill limit (kernels/lora.py). It wins only
  when few row blocks share the weight (N <= ~128: decoding, bitsandbytes' gemv_4bit regime).
So at training sizes the count favours the buffer; that is what ships. The buffer is a fresh
allocation per call (the caching allocator hands back the same block), freed after the GEMM: at
most one dequantized weight exists per layer call, in forward and again in backward.

Bit-exact with bitsandbytes: W[e] = round(code[q_e] * absmax[e // blocksize]) in quant_state.dtype
(round to nearest even), double-quantized scales decoded as code2[a] * absmax2[b // blocksize2]
+ offset in two fp32 roundings: the kernel is launched with fp fusion off, so no FMA merges them.
Layout: fusedpeft/quantized.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedpeft.kernels._common import interpreting
from fusedpeft.quantized import QuantizedWeight, nested_absmax

BLOCK_BYTES = 1024  # bytes per program: 2048 outputs
NUM_WARPS = 4


@triton.jit
def _dequant_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, out_ptr, offset, n_bytes, numel,
                         blocksize, blocksize2, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_bytes
    byte = tl.load(packed_ptr + i, mask=ok, other=0).to(tl.int32)
    hi_code = tl.load(code_ptr + (byte >> 4), mask=ok, other=0.0)
    lo_code = tl.load(code_ptr + (byte & 15), mask=ok, other=0.0)
    block = (2 * i) // blocksize  # blocksize is even: both elements of a byte share a block
    if NESTED:
        a = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + a, mask=ok, other=0.0) * tl.load(absmax2_ptr + block // blocksize2, mask=ok,
                                                                      other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * i, (hi_code * scale).to(out_ty), mask=ok & (2 * i < numel))
    tl.store(out_ptr + 2 * i + 1, (lo_code * scale).to(out_ty), mask=ok & (2 * i + 1 < numel))


def dequantize_4bit(q: QuantizedWeight) -> torch.Tensor:
    """W [out, in] in quant_state.dtype, bit-exact with bitsandbytes.functional.dequantize_4bit."""
    state = q.quant_state
    code2, absmax2, blocksize2, offset = nested_absmax(q)
    packed = q.packed
    numel = state.shape[0] * state.shape[1]
    out_dtype = state.dtype
    # the interpreter (CPU tests) computes bf16 wrongly: write fp32 there and round afterwards (RNE as well)
    launch_dtype = torch.float32 if interpreting() and out_dtype == torch.bfloat16 else out_dtype
    out = torch.empty(numel, dtype=launch_dtype, device=packed.device)
    n_bytes = packed.numel()
    if numel:
        nested = code2 is not None
        absmax = state.absmax
        grid = (triton.cdiv(n_bytes, BLOCK_BYTES),)
        _dequant_4bit_kernel[grid](packed, state.code, absmax, code2 if nested else absmax,
                                   absmax2 if nested else absmax, out, float(offset), n_bytes, numel,
                                   int(state.blocksize), max(blocksize2, 1), NESTED=nested, BLOCK=BLOCK_BYTES,
                                   num_warps=NUM_WARPS, **({} if interpreting() else {"enable_fp_fusion": False}))
    return out.to(out_dtype).view(state.shape)
