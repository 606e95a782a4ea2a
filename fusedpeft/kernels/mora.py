"""The "triton" backend of the mora op family (docs/contract.md §3, §5): launchers for kernels/mora_jit.py.

    y = x @ W^T + bias + decompress(compress(dropout(x)) @ M^T)        x [N, K], W [D, K], M [R, R]

Two designs (docs/architecture.md §2); neither forms the wrap-padded / reshaped copy of x nor ΔW [D, K]:

- "tile" (design A): the ΔW tile is generated from M inside the base GEMM.
  Type 6: after the K loop, each output tile runs extra dots over the chunk(s) that feed it, with
  B_c = M R_c tiles built from M and the fp32 cos/sin row of the chunk: 2 N D R extra MMA FLOPs
  (R / K of the base GEMM), no extra HBM traffic, dropout regenerated on the chunk tile.
  Types 1-4: ΔW[o, i] = M[slot(o), slot(i)] (+ the wrapped column) is gathered and added to the W
  tile before the dot: no extra MMA FLOPs, but W + ΔW is rounded to x's dtype (in 16-bit that
  rounds ΔW to W's precision) and it cannot apply dropout (x and dropout(x) share the dot).
- "compressed" (design B, types 1-4): a pre-pass z = compress(dropout(x)) [N, R], the square
  matmul u = z @ M^T [N, R], and u[m, slot(col)] gathered into the base GEMM's epilogue:
  2 N R^2 extra FLOPs and ~4 N R + N K extra elements moved.
Rule (``choose_design``): type 6 -> "tile": design B for type 6 has the same FLOPs but stores
the rotated chunks (as large as x) and their products (as large as y): at 8192 tokens, 4096 ->
4096, r = 8, bf16, +805 MB moved vs +169 MB for "tile" (floor: the base forward + dX GEMMs, 550
GFLOP, 336 MB; both designs +51.5 GFLOP). Types 1-4 -> "tile" when dropout is off and x is
fp32 / fp64, else "compressed": at r = 256 (R = 1448) "tile" costs +34 GFLOP (dM only) and +279
MB against +103 GFLOP and +513 MB, but in 16-bit W + ΔW rounds away every ΔW entry below half an
ulp of W (early in training, all of them), so 16-bit keeps the exact "compressed" design until a
GPU bench shows the precision is acceptable (FUSEDPEFT_MORA_DESIGN=tile|compressed forces one for
benchmarking). The [N, R] intermediates are kept in x's dtype.

Backward: dX through the same fused GEMM with ΔW^T (type 6: G_c = dY summed over the output
tiles of chunk c, times B_c, plus the wrapped columns; types 1-4: W^T + ΔW^T tiles, or the
epilogue gather of h = decompress^T(dY) @ M); dropout's mask regenerated. dM is one split
reduction over (chunk, row block): types 1-4 G^T z from the pre-pass sums; type 6 G_c^T Z_c with
the rotated chunk Z_c of dropout(x) built in registers. Nothing but x (and M, the seed) is saved.

Dtypes: x, W, bias fp16 / bf16 / fp32 / fp64 (one dtype); M any float dtype. y and grad_x in x's
dtype, grad_M in M's. fp32 runs IEEE fp32 dots (no TF32), fp64 fp64 dots: correct, not fast.
Under TRITON_INTERPRET=1 bf16 is computed in fp32 (``for_launch``) with one small config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import torch
import triton

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.core.mora import MORA_TYPES, MoraGeometry, mora_padding, rope_tables
from fusedpeft.kernels._common import (
    DTYPES,
    arch_class,
    dot_precision,
    for_launch,
    interpreting,
    sm_count,
    tl_accumulation_dtype,
    unavailable_reason,  # noqa: F401  (read by fusedpeft.backends)
)
from fusedpeft.kernels.dequant import dequantize_4bit
from fusedpeft.kernels.mora_jit import _mora_dm_kernel, _mora_gemm_kernel, _mora_slot_sum_kernel
from fusedpeft.quantized import dense_weight

DESIGNS = ("tile", "compressed")
MODE_PLAIN, MODE_MERGE, MODE_SLOTS, MODE_ROPE = 0, 1, 2, 3

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per (arch class, element bytes, dropout on).
# 128x128 fp32 accumulators need 8 warps; with dropout, Philox on the chunk / output tile needs the
# narrower 128x64 tile (128x128 spills). Every config is compiled ahead of time for its arch under
# the CI's Triton and Triton 3.6 (the GPU image's) in tests/test_triton_mora_aot.py: no spills,
# wgmma on sm_90.
_GEMM_CONFIGS = {
    (90, 2, False): ((128, 128, 64, 8, 3), (128, 64, 64, 8, 3)),
    (90, 2, True): ((128, 64, 64, 8, 3),),
    (80, 2, False): ((128, 128, 32, 8, 3), (128, 64, 32, 8, 3)),
    (80, 2, True): ((128, 64, 32, 8, 3),),
    # IEEE fp32 / fp64 dots (FMA): 4 warps spill with dropout; Triton 3.6 spills the fp32 types
    # 1-4 gather with BLOCK_K = 32 (28 bytes on sm_90, 12 on sm_80), so the fp32 K step is 16
    (90, 4, False): ((64, 64, 16, 8, 3),),
    (80, 4, False): ((64, 64, 16, 8, 3),),
    (90, 8, False): ((64, 64, 32, 8, 2),),
    (80, 8, False): ((64, 64, 32, 8, 2),),
}
# MODE_MERGE (types 1-4, ΔW gathered from M into the W tile) holds the gathered tile beside the
# accumulator: at 128x128x64 on sm_90 Triton 3.6 spills 228 bytes, so 16-bit sm_90 uses K = 32.
_MERGE_GEMM_CONFIGS = {
    (90, 2): ((128, 128, 32, 8, 3), (128, 64, 64, 8, 3)),
}


def gemm_configs(arch: int, element_bytes: int, dropout: bool, mode: int = MODE_ROPE) -> tuple:
    """The fused-GEMM tile configs autotuned for ``arch`` (80 or 90), an element size in bytes,
    dropout on / off (fp32 / fp64 use one config either way) and the kernel MODE."""
    if mode == MODE_MERGE and (arch, element_bytes) in _MERGE_GEMM_CONFIGS:
        return _MERGE_GEMM_CONFIGS[(arch, element_bytes)]
    return _GEMM_CONFIGS.get((arch, element_bytes, dropout)) or _GEMM_CONFIGS[(arch, element_bytes, False)]


# dM reduction (BLOCK_A, BLOCK_B, BLOCK_M, num_warps, num_stages) and slot sums (BLOCK_M, BLOCK_R, warps).
# 16-bit: BLOCK_M = 64 rows spills 8 bytes on sm_90 under Triton 3.6 with RoPE and dropout; 32 does not.
DM_CONFIGS = {2: (128, 128, 32, 8, 3), 4: (64, 64, 32, 4, 3), 8: (64, 64, 32, 4, 2)}
# dM splits its (chunk, row block) items so that about DM_PROGRAMS_PER_SM programs run per SM in
# all (tiles * split, 2 programs under the interpreter): each is an MMA-bound tile of 8 warps (16-bit),
# so two per SM overlap one's loads with the other's dots; more would only add partial [R, R] fp32
# buffers (split * R^2, written and then summed by torch).
DM_PROGRAMS_PER_SM = 2
SLOT_SUM_CONFIG = (64, 64, 8)  # Philox on 64 x 64 with 4 warps spills on sm_80
INTERPRETER_GEMM_CONFIG = (64, 64, 32, 4, 1)
INTERPRETER_DM_CONFIG = (32, 32, 32, 4, 1)
GROUP_M = 8
ROPE_BLOCK = 16  # width of the type-6 chunk dots (BLOCK_R); 32 spills on sm_80 (tests/test_triton_mora_aot.py)


def choose_design(mora_type: int, dtype: torch.dtype, dropout_p: float) -> str:
    """"tile" or "compressed" (see the module docstring for the rule and why).

    For benchmarks, FUSEDPEFT_MORA_DESIGN=tile|compressed overrides the rule for types 1-4 where
    that design applies ("tile" needs dropout off)."""
    if mora_type == 6:
        return "tile"
    forced = os.environ.get("FUSEDPEFT_MORA_DESIGN")
    if forced == "compressed" or (forced == "tile" and dropout_p == 0.0):
        return forced
    return "tile" if dropout_p == 0.0 and dtype in (torch.float32, torch.float64) else "compressed"


def _name(t) -> str:
    return "None" if t is None else f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_inputs(x, weight, bias, M, mora_type, dropout_p, seed, design=None) -> None:
    """Raise ValueError / TypeError naming the argument before anything is launched."""
    for arg, t in (("x", x), ("weight", weight), ("M", M)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{arg} must be a 2-D tensor, got {_name(t) if isinstance(t, torch.Tensor) else t!r}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {_name(x)}")
    if weight.dtype != x.dtype or weight.device != x.device or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [out_features, {x.shape[1]}] with x's dtype {x.dtype} and device "
                         f"{x.device}, got {_name(weight)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be [{weight.shape[0]}] with x's dtype and device, got {_name(bias)}")
    if M.shape[0] != M.shape[1] or not M.is_floating_point() or M.device != x.device:
        raise ValueError(f"M must be a square float matrix [r_hat, r_hat] on {x.device}, got {_name(M)}")
    if mora_type not in MORA_TYPES:
        raise ValueError(f"mora_type must be one of {MORA_TYPES}, got {mora_type}")
    r_hat, k = M.shape[0], x.shape[1]
    if mora_type == 6 and r_hat % 2:
        raise ValueError(f"mora_type 6 needs an even r_hat (RoPE pairs), got M of {_name(M)}")
    if mora_padding(k, r_hat, mora_type) > k:
        raise ValueError(f"MoRA wrap padding of {mora_padding(k, r_hat, mora_type)} features exceeds "
                         f"in_features={k} (r_hat={r_hat}); use a smaller r or mora_type 2/3")
    if max(x.numel(), x.shape[0] * weight.shape[0], weight.numel()) >= 2**31:
        raise ValueError(f"the Triton MoRA kernels index with int32: x {_name(x)} and an output of "
                         f"{x.shape[0]} x {weight.shape[0]} must each have < 2**31 elements; split the batch")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed (0-dim int64 CPU tensor) is required when dropout_p > 0, got None")
    if design is not None and design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS} or None, got {design!r}")
    if design == "tile" and mora_type != 6 and dropout_p > 0.0:
        raise ValueError(f"design='tile' for mora_type {mora_type} cannot apply dropout (p={dropout_p}); "
                         f"use design='compressed' or None")
    if design == "compressed" and mora_type == 6:
        raise ValueError("design='compressed' is not shipped for mora_type 6 (see the module docstring); use 'tile'")


def _dense(weight, x: torch.Tensor) -> torch.Tensor:
    """The base weight the GEMMs read: a 4-bit one dequantized by kernels/dequant.py into a fresh
    buffer (fusedpeft.quantized). The MoRA GEMMs fold the branch into the base product's K loop,
    so an 8-bit base (whose output is bitsandbytes' own) has no Triton MoRA path."""
    if not isinstance(weight, torch.Tensor) and weight.kind == "8bit":
        raise TypeError("triton mora: an 8-bit (bitsandbytes Linear8bitLt) base is not supported by the Triton MoRA "
                        "kernels, which fuse the adapter into the base GEMM; use backend='torch' or 'cuda' for it")
    return dense_weight(weight, x.dtype, dequantize_4bit)


@contextlib.contextmanager
def _launching():
    """Under the interpreter, switch off Triton's integer-overflow sanitizer (an interpreter-only
    debugging aid that doubles the cost of every integer op) while our kernels run; restored after.
    On a GPU nothing changes."""
    if not interpreting():
        yield
        return
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)  # private: absent in some versions
    saved = getattr(builder, "options", None)
    if saved is None or not hasattr(saved, "sanitize_overflow"):
        yield
        return
    builder.options = dataclasses.replace(saved, sanitize_overflow=False)
    try:
        yield
    finally:
        builder.options = saved


def _with_launching(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _launching():
            return fn(*args, **kwargs)
    return wrapper


@functools.lru_cache(maxsize=None)
def _tuned_gemm(configs: tuple):
    return triton.autotune(
        [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M), num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in configs],
        key=["P", "Q", "R", "MODE", "TRANS"])(_mora_gemm_kernel)


def _dropout_args(dropout_p: float, seed, x: torch.Tensor) -> tuple:
    """(seed, p, 1 / (1 - p) as a 1-element tensor in the accumulation dtype) for the kernels."""
    scale = torch.full((1,), 1.0 / (1.0 - dropout_p), dtype=accumulation_dtype(x.dtype), device=x.device)
    return (int(seed), float(dropout_p), scale) if dropout_p > 0.0 else (0, 0.0, scale)


def _gemm(a, b, b_strides, out, g: MoraGeometry, mode: int, trans: bool, drop, M=None, u=None, bias=None, rope=None):
    """out [N, P] = a [N, Q] @ B^T + ... with B [P, Q] read through b_strides (see the kernel header)."""
    n, q = a.shape
    p_cols = out.shape[1]
    cos, sin = rope if rope is not None else (a, a)
    dropout = drop[1] > 0.0 and (mode == MODE_ROPE or (mode == MODE_SLOTS and trans))
    args = (a, b, out, bias if bias is not None else a, M if M is not None else a, u if u is not None else a, cos,
            sin, *drop, n, p_cols, q, a.stride(0), b_strides[0], b_strides[1], out.stride(0),
            u.stride(0) if u is not None else 0, g.K, g.D, g.R, g.pad, g.n_chunks, g.used, g.span, g.n_tiles)
    kwargs = dict(MODE=mode, TRANS=trans, OUT_CONTIG=g.out_contig, IN_CONTIG=g.in_contig, HAS_BIAS=bias is not None,
                  DROPOUT=dropout, ACC=tl_accumulation_dtype(a.dtype), PRECISION=dot_precision(a.dtype),
                  BLOCK_R=ROPE_BLOCK)
    if interpreting():
        bm, bn, bk, w, s = INTERPRETER_GEMM_CONFIG
        grid = (triton.cdiv(n, bm) * triton.cdiv(p_cols, bn),)
        _mora_gemm_kernel[grid](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=w,
                                num_stages=s)
        return out
    tuned = _tuned_gemm(gemm_configs(arch_class(a), a.element_size(), dropout, mode))
    tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(p_cols, meta["BLOCK_N"]),)](*args, **kwargs)
    return out


def _slot_sums(src, g: MoraGeometry, along_input: bool, drop) -> torch.Tensor:
    """[N, R] in src's dtype: compress(dropout(x)) (along_input) or decompress^T(dY) (types 1-4)."""
    n = src.shape[0]
    length = g.K if along_input else g.D
    contig = g.in_contig if along_input else g.out_contig
    extended = length + (g.pad if along_input else 0)
    n_iter = length // g.R + (length % g.R > 0) if contig else math.ceil(extended / g.R)
    out = torch.empty(n, g.R, dtype=src.dtype, device=src.device)
    bm, br, w = (32, 32, 4) if interpreting() else SLOT_SUM_CONFIG
    grid = (triton.cdiv(n, bm), triton.cdiv(g.R, br))
    _mora_slot_sum_kernel[grid](src, out, *drop, n, length, extended, g.R, n_iter, src.stride(0), out.stride(0),
                                CONTIG=contig, DROPOUT=along_input and drop[1] > 0.0,
                                ACC=tl_accumulation_dtype(src.dtype), BLOCK_M=bm, BLOCK_R=br, num_warps=w)
    return out


def _grad_M(g_src, z_src, g: MoraGeometry, drop, rope) -> torch.Tensor:
    """dM [R, R] (fp32, fp64 for fp64 inputs): split reduction over (chunk, row block), partials summed."""
    n, r = g_src.shape[0], g.R
    if interpreting():
        ba, bb, bm, w, s = INTERPRETER_DM_CONFIG
    else:
        ba, bb, bm, w, s = DM_CONFIGS[z_src.element_size()]
    tiles = triton.cdiv(r, ba) * triton.cdiv(r, bb)
    used = g.used if rope is not None else 1
    items = triton.cdiv(n, bm) * used
    target = 2 if interpreting() else DM_PROGRAMS_PER_SM * sm_count(z_src.device.index or 0)
    split = max(1, min(items, triton.cdiv(target, tiles)))
    partial = torch.empty(split, r, r, dtype=accumulation_dtype(z_src.dtype), device=z_src.device)
    cos, sin = rope if rope is not None else (z_src, z_src)
    _mora_dm_kernel[(tiles, split)](g_src, z_src, cos, sin, partial, *drop, n, r, g.K, g.D, g.n_chunks, used, g.span,
                                    g.n_tiles, split, g_src.stride(0), z_src.stride(0), ROPE=rope is not None,
                                    DROPOUT=rope is not None and drop[1] > 0.0,
                                    ACC=tl_accumulation_dtype(z_src.dtype), PRECISION=dot_precision(z_src.dtype),
                                    BLOCK_A=ba, BLOCK_B=bb, BLOCK_M=bm, num_warps=w, num_stages=s)
    return partial.sum(0)


@_with_launching
def mora_forward(x, weight, bias, M, mora_type: int, dropout_p: float, seed, design: str | None = None):
    """y = x @ W^T + bias + MoRA branch of dropout(x).

    x [N, K] fp16/bf16/fp32/fp64; weight [D, K] and bias [D] | None in x's dtype; M [R, R] any
    float dtype; seed: 0-dim int64 CPU tensor (dropout_p > 0). Returns y [N, D] in x's dtype.
    design: None (``choose_design``), "tile" or "compressed" (tests and benchmarks).
    """
    weight = _dense(weight, x)
    check_inputs(x, weight, bias, M, mora_type, dropout_p, seed, design)
    g = MoraGeometry(x.shape[1], weight.shape[0], M.shape[0], mora_type)
    design = design or choose_design(mora_type, x.dtype, dropout_p)
    xl, wl = for_launch(x).contiguous(), for_launch(weight).contiguous()
    bl, Ml = for_launch(bias), for_launch(M).contiguous()
    drop = _dropout_args(dropout_p, seed, x)
    y = torch.empty(x.shape[0], g.D, dtype=xl.dtype, device=x.device)
    if x.shape[0] == 0:
        return y.to(x.dtype)
    if mora_type == 6:
        rope = rope_tables(g.R, g.n_chunks, x.device)
        _gemm(xl, wl, (g.K, 1), y, g, MODE_ROPE, False, drop, M=Ml, bias=bl, rope=rope)
    elif design == "tile":
        _gemm(xl, wl, (g.K, 1), y, g, MODE_MERGE, False, drop, M=Ml, bias=bl)
    else:
        z = _slot_sums(xl, g, True, drop)
        u = _gemm(z, Ml, (g.R, 1), torch.empty_like(z), g, MODE_PLAIN, False, drop)
        _gemm(xl, wl, (g.K, 1), y, g, MODE_SLOTS, False, drop, u=u, bias=bl)
    return y.to(x.dtype)


@_with_launching
def mora_backward(grad_y, x, weight, M, mora_type: int, dropout_p: float, seed, need_x: bool, need_M: bool,
                  design: str | None = None):
    """Gradients of mora_forward.

    grad_y [N, D]; x [N, K]; weight [D, K]; M [R, R]; same seed as the forward.
    Returns (grad_x [N, K] in x's dtype | None, grad_M [R, R] in M's dtype | None).
    """
    weight = _dense(weight, x)
    check_inputs(x, weight, None, M, mora_type, dropout_p, seed, design)
    if grad_y.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_y must be [{x.shape[0]}, {weight.shape[0]}], got {_name(grad_y)}")
    g = MoraGeometry(x.shape[1], weight.shape[0], M.shape[0], mora_type)
    design = design or choose_design(mora_type, x.dtype, dropout_p)
    xl, wl, Ml = for_launch(x).contiguous(), for_launch(weight).contiguous(), for_launch(M).contiguous()
    gy = for_launch(grad_y.to(x.dtype)).contiguous()
    drop = _dropout_args(dropout_p, seed, x)
    grad_x = torch.empty_like(xl) if need_x else None
    grad_M = None
    if x.shape[0] == 0:
        return (grad_x.to(x.dtype) if need_x else None), (torch.zeros_like(M) if need_M else None)
    if mora_type == 6:
        rope = rope_tables(g.R, g.n_chunks, x.device)
        if need_x:
            _gemm(gy, wl, (1, g.K), grad_x, g, MODE_ROPE, True, drop, M=Ml, rope=rope)
        if need_M:
            grad_M = _grad_M(gy, xl, g, drop, rope)
    else:
        slots = _slot_sums(gy, g, False, drop) if need_M or (need_x and design == "compressed") else None
        if need_x and design == "tile":
            _gemm(gy, wl, (1, g.K), grad_x, g, MODE_MERGE, True, drop, M=Ml)
        elif need_x:
            h = _gemm(slots, Ml, (1, g.R), torch.empty_like(slots), g, MODE_PLAIN, False, drop)
            _gemm(gy, wl, (1, g.K), grad_x, g, MODE_SLOTS, True, drop, u=h)
        if need_M:
            grad_M = _grad_M(slots, _slot_sums(xl, g, True, drop), g, drop, None)
    return (grad_x.to(x.dtype) if need_x else None), (grad_M.to(M.dtype) if need_M else None)
