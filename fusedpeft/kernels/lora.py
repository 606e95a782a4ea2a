"""The "triton" backend of the lora op family: launchers for the kernels of kernels/lora_jit.py.

Forward (2 launches):  S = dropout(x) @ A^T (shrink), then y = x @ W^T + bias + scaling S @ B^T
                       in one GEMM whose accumulator starts as the rank-r product.
Backward (2 launches): dS = scaling dY @ B and dB = scaling dY^T @ S in one pass over dY;
                       dX = dY @ W + dropout'(dS @ A) in one GEMM, which also adds
                       dA += dS^T @ dropout(x) tile by tile (x read once, the mask generated
                       once); without grad_x, dA is its own pass over x.
Saved between them by the op layer: x, S and the seed. Grouped layers (q/k/v, gate/up) share one
shrink, one dA pass over x and one dX accumulator (``lora_grouped_forward/backward``).
dA and dB are summed over row blocks with fp32 atomics: equal up to fp32 rounding order from run
to run, not bitwise (y, S, dS and dX are deterministic).

Dtypes: x, W, bias fp16 / bf16 / fp32 / fp64 (one dtype); adapters any float dtype (cast to x's
dtype tile by tile). y, S, grad_x come back in x's dtype, grad_A / grad_B in the adapters'.
fp32 GEMMs run with IEEE fp32 dots (no TF32), fp64 with fp64 dots: correct, not fast.
Under TRITON_INTERPRET=1 (CPU tests) bf16 tensors are computed in fp32 (``for_launch``) and one
small tile config is used; on a GPU the two GEMMs are autotuned over a few configs per arch.
"""

from __future__ import annotations

import functools

import torch
import triton

from fusedpeft.kernels._common import device_capability, for_launch, interpreting
from fusedpeft.kernels.dequant import dequantize_4bit
from fusedpeft.kernels.lora_jit import (
    _lora_bwd_da_kernel,
    _lora_bwd_ds_db_kernel,
    _lora_bwd_dx_kernel,
    _lora_fwd_kernel,
    _lora_shrink_kernel,
)
from fusedpeft.quantized import dense_weight

MAX_R_BLOCK = 128  # rank chunk of the thin kernels; larger ranks add a program axis
# Rank chunk of the GEMMs' prologue; larger ranks loop. 32 keeps dX (dropout mask, x tile and the
# fused dA live at once) within 255 registers at 128 x 128 tiles; 64 spills, and a 128x256 tile
# spills at any rank (ptxas, sm_90).
MAX_GEMM_R_BLOCK = 32
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), keyed by (arch class, element
# bytes). 128x128 fp32 accumulators need 8 warps on sm_90 (4 spill, see docs/verifying.md §4). dX has
# more live registers than the forward (its prologue holds the dropout mask, the x tile and the
# dA tile); its 2-byte configs differ where ptxas spilled. Every 2-byte config is compiled ahead
# of time for its arch in tests/test_triton_lora_aot.py.
GEMM_CONFIGS = {
    (90, 2): ((128, 128, 64, 8, 4), (64, 128, 64, 4, 4)),
    (80, 2): ((128, 128, 32, 8, 4), (64, 128, 32, 4, 4)),
    (90, 4): ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3)),
    (80, 4): ((128, 64, 32, 4, 3), (64, 64, 32, 4, 3)),
    (90, 8): ((64, 64, 32, 4, 2),),
    (80, 8): ((64, 64, 32, 4, 2),),
}
DX_CONFIGS = {
    (90, 2): ((128, 128, 64, 8, 4), (64, 128, 64, 8, 4)),
    (80, 2): ((128, 64, 32, 8, 4), (64, 128, 32, 4, 4)),
}
# Under the interpreter a program instance costs ~0.1 ms per op plus its dots (numpy, not BLAS):
# 64-wide tiles were the fastest for the test shapes, which still cross tile edges with them.
INTERPRETER_GEMM_CONFIG = (64, 64, 64, 4, 1)
GROUP_M = 8


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"the Triton LoRA kernels need CUDA tensors (got {device.type})"


def rank_block(r: int) -> int:
    """Rank chunk width: the next power of two >= max(r, 16) (tl.dot's minimum K), capped at 128."""
    return min(MAX_R_BLOCK, max(16, triton.next_power_of_2(r)))


def gemm_rank_block(r: int) -> int:
    """Rank chunk width of the two GEMMs' prologue: rank_block(r) capped at MAX_GEMM_R_BLOCK."""
    return min(MAX_GEMM_R_BLOCK, rank_block(r))


def _arch_class(t: torch.Tensor) -> int:
    return 90 if device_capability(t)[0] in (9, 10) else 80


def gemm_configs(arch: int, element_bytes: int, kind: str = "fwd") -> tuple:
    """The tile configs autotuned for GEMM ``kind`` ("fwd" or "dx") on ``arch`` (80 or 90) for an
    element size in bytes."""
    if kind == "dx" and (arch, element_bytes) in DX_CONFIGS:
        return DX_CONFIGS[(arch, element_bytes)]
    return GEMM_CONFIGS[(arch, element_bytes)]


def small_kernel_config(kind: str, r_block: int, interpreted: bool | None = None) -> dict:
    """Tile sizes and warps of the thin kernels (shrink, ds_db, da) for a rank chunk width, on a
    GPU or (interpreted, default: whether TRITON_INTERPRET=1) under the interpreter.

    Memory-bound: one fixed config per rank chunk width, sized so that accumulators stay in
    registers (checked ahead of time in tests/test_triton_lora_aot.py)."""
    if interpreting() if interpreted is None else interpreted:
        blocks = {"shrink": dict(BLOCK_M=64, BLOCK_K=64), "ds_db": dict(BLOCK_M=64, BLOCK_D=64),
                  "da": dict(BLOCK_M=64, BLOCK_K=64)}[kind]
        return dict(blocks, num_warps=4, num_stages=1)
    wide = r_block >= 64
    blocks = {"shrink": dict(BLOCK_M=64, BLOCK_K=64 if wide else 128),
              "ds_db": dict(BLOCK_M=64, BLOCK_D=64 if r_block == 128 else 128),
              "da": dict(BLOCK_M=64, BLOCK_K=64 if wide else 128)}[kind]
    # 4 warps spill a few bytes for the shrink on sm_80 (ptxas); 8 everywhere it is cheap
    return dict(blocks, num_warps=8 if (r_block == 128 or kind == "shrink") else 4, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tuned(kernel, configs: tuple, restore: tuple = ()):
    """``kernel`` autotuned over ``configs`` on (D, K, R) and the dtypes (cached per config set)."""
    return _tuned_cached(kernel, configs, restore)


@functools.lru_cache(maxsize=None)
def _tuned_cached(kernel, configs, restore):
    return triton.autotune(
        [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M), num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in configs],
        key=["D", "K", "R"], restore_value=list(restore))(kernel)


def _launch_gemm(kernel, t: torch.Tensor, rows: int, cols: int, args: tuple, kwargs: dict, restore: tuple = ()):
    """Launch a GEMM kernel over an output of rows x cols: autotuned on a GPU, one config under
    the interpreter."""
    if interpreting():
        bm, bn, bk, w, s = INTERPRETER_GEMM_CONFIG
        grid = (triton.cdiv(rows, bm) * triton.cdiv(cols, bn),)
        kernel[grid](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=w, num_stages=s)
        return
    kind = "dx" if kernel is _lora_bwd_dx_kernel else "fwd"
    tuned = _tuned(kernel, gemm_configs(_arch_class(t), t.element_size(), kind), restore)
    tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)](*args, **kwargs)


def _dropout_args(dropout_p: float, seed) -> tuple[int, float, float]:
    if dropout_p <= 0.0:
        return 0, 0.0, 1.0
    return int(seed), float(dropout_p), 1.0 / (1.0 - dropout_p)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# single launches (tensors already as the kernels read them: see for_launch)
# ------------------------------------------------------------------------------------------------


def shrink(x: torch.Tensor, A: torch.Tensor, dropout_p: float, seed, out: torch.Tensor | None = None) -> torch.Tensor:
    """S = dropout(x) @ A^T: x [N, K] contiguous, A [R, K] any float dtype -> S [N, R] in x's dtype
    (written into ``out`` when given: an [N, R] view with unit column stride)."""
    N, K = x.shape
    R = A.shape[0]
    S = x.new_empty(N, R) if out is None else out
    if N == 0 or R == 0:
        return S
    seed_i, p, scale = _dropout_args(dropout_p, seed)
    r_block = rank_block(R)
    cfg = small_kernel_config("shrink", r_block)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(R, r_block))
    if K == 0:
        return S.zero_()
    _lora_shrink_kernel[grid](x, A, S, N, K, R, x.stride(0), A.stride(0), A.stride(1), S.stride(0), seed_i, p, scale,
                              HAS_DROPOUT=dropout_p > 0.0, FP64=x.dtype == torch.float64,
                              PRECISION=_precision(x.dtype), R_BLOCK=r_block, **cfg)
    return S


def forward_gemm(x, weight, bias, S, B, scaling: float) -> torch.Tensor:
    """y = x @ W^T + bias + scaling S @ B^T: x [N, K] contiguous, weight [D, K] | None (no base
    product: the base loop runs over 0 columns), bias [D] | None, S [N, R] (unit column stride),
    B [D, R] -> y [N, D] in x's dtype."""
    N, K = x.shape
    D, R = B.shape[0], S.shape[1]
    y = x.new_empty(N, D)
    if N == 0 or D == 0:
        return y
    bias = bias.contiguous() if bias is not None else None
    w, k_base = (weight, K) if weight is not None else (x, 0)
    args = (x, w, bias if bias is not None else y, S, B, y, N, D, k_base, R, x.stride(0),
            weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 1,
            S.stride(0), B.stride(0), B.stride(1), y.stride(0), float(scaling))
    kwargs = dict(HAS_BIAS=bias is not None, FP64=x.dtype == torch.float64, PRECISION=_precision(x.dtype),
                  R_BLOCK=gemm_rank_block(R))
    _launch_gemm(_lora_fwd_kernel, x, N, D, args, kwargs)
    return y


def ds_db(dy, B, S, scaling: float, need_S: bool, need_B: bool, ds_out: torch.Tensor | None = None):
    """One pass over dY [N, D] (contiguous): dS = scaling dY @ B [N, R] in dY's dtype (into
    ``ds_out`` when given) and dB = scaling dY^T @ S [D, R] in fp32 (fp64 for fp64 dY);
    either is None when not needed. B [D, R], S [N, R] with unit column stride."""
    N, D = dy.shape
    R = B.shape[1]
    dS = (dy.new_empty(N, R) if ds_out is None else ds_out) if need_S else None
    dB = torch.zeros(D, R, dtype=_acc_dtype(dy.dtype), device=dy.device) if need_B else None
    if N == 0 or R == 0 or not (need_S or need_B):
        return dS, dB
    if D == 0:
        return (dS.zero_() if dS is not None else None), dB
    r_block = rank_block(R)
    cfg = small_kernel_config("ds_db", r_block)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(R, r_block))
    ds_arg = dS if dS is not None else dy
    db_arg = dB if dB is not None else dy
    _lora_bwd_ds_db_kernel[grid](dy, B, S, ds_arg, db_arg, N, D, R, dy.stride(0), B.stride(0), B.stride(1),
                                 S.stride(0), ds_arg.stride(0), db_arg.stride(0), float(scaling),
                                 NEED_S=need_S, NEED_B=need_B, FP64=dy.dtype == torch.float64,
                                 PRECISION=_precision(dy.dtype), R_BLOCK=r_block, **cfg)
    return dS, dB


def da(dS, x, dropout_p: float, seed) -> torch.Tensor:
    """dA = dS^T @ dropout(x): dS [N, R] (unit column stride), x [N, K] contiguous -> [R, K] in
    fp32 (fp64 for fp64 x)."""
    N, K = x.shape
    R = dS.shape[1]
    dA = torch.zeros(R, K, dtype=_acc_dtype(x.dtype), device=x.device)
    if N == 0 or R == 0 or K == 0:
        return dA
    seed_i, p, scale = _dropout_args(dropout_p, seed)
    r_block = rank_block(R)
    cfg = small_kernel_config("da", r_block)
    tiles = triton.cdiv(K, cfg["BLOCK_K"]) * triton.cdiv(R, r_block)
    row_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    split = 1  # the N-long reduction is split over programs (fp32 atomics) to fill the GPU
    if x.is_cuda and not interpreting():
        split = max(1, min(row_blocks, 4 * _sm_count(x.device.index or 0) // tiles))
    rows_per_split = triton.cdiv(row_blocks, split) * cfg["BLOCK_M"]
    grid = (triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(R, r_block), triton.cdiv(N, rows_per_split))
    _lora_bwd_da_kernel[grid](dS, x, dA, N, K, R, dS.stride(0), x.stride(0), dA.stride(0), rows_per_split,
                              seed_i, p, scale, HAS_DROPOUT=dropout_p > 0.0, FP64=x.dtype == torch.float64,
                              PRECISION=_precision(x.dtype), R_BLOCK=r_block, **cfg)
    return dA


def dx_gemm(dy, weight, dS, A, dropout_p: float, seed, out: torch.Tensor | None = None,
            x: torch.Tensor | None = None, dA: torch.Tensor | None = None) -> torch.Tensor:
    """dX = dY @ W + dropout'(dS @ A): dy [N, D] contiguous, weight [D, K], dS [N, R] | None (no
    rank term when None), A [R, K] -> [N, K] in dy's dtype. With ``out`` (contiguous [N, K]) the
    result is added to what ``out`` holds. With x [N, K] (contiguous) and dA [R, K] (zeroed fp32 /
    fp64), dA += dS^T @ dropout(x) is computed in the same kernel (needs dS). weight None: no
    dY @ W term (its loop runs over 0 columns; K is then A's)."""
    N, D = dy.shape
    K = weight.shape[1] if weight is not None else A.shape[1]
    if weight is None:
        weight, D = dy.new_empty(0, K), 0
    accumulate = out is not None
    dx = dy.new_empty(N, K) if out is None else out
    if N == 0 or K == 0:
        return dx
    seed_i, p, scale = _dropout_args(dropout_p, seed)
    has_lora = dS is not None and dS.shape[1] > 0
    fuse_da = has_lora and dA is not None
    R = dS.shape[1] if has_lora else 0
    args = (dy, weight, dS if has_lora else dy, A if has_lora else weight, dx, x if fuse_da else dy,
            dA if fuse_da else dx, N, K, D, R, dy.stride(0), weight.stride(0), weight.stride(1),
            dS.stride(0) if has_lora else 0, A.stride(0) if has_lora else 0, A.stride(1) if has_lora else 0,
            dx.stride(0), x.stride(0) if fuse_da else 0, dA.stride(0) if fuse_da else 0, seed_i, p, scale)
    kwargs = dict(HAS_LORA=has_lora, HAS_DROPOUT=has_lora and dropout_p > 0.0, ACCUMULATE=accumulate,
                  FUSE_DA=fuse_da, FP64=dy.dtype == torch.float64, PRECISION=_precision(dy.dtype),
                  R_BLOCK=gemm_rank_block(max(R, 1)))
    # autotuning runs the kernel repeatedly: what it accumulates into must be put back afterwards
    restore = ("dx_ptr",) * accumulate + ("da_ptr",) * fuse_da
    _launch_gemm(_lora_bwd_dx_kernel, dy, N, K, args, kwargs, restore=restore)
    return dx


# ------------------------------------------------------------------------------------------------
# the backend API (fusedpeft.ops.lora / fusedpeft.ops.lora_grouped)
# ------------------------------------------------------------------------------------------------


def _dense(weight, x: torch.Tensor) -> torch.Tensor | None:
    """The base weight as the GEMMs read it: a 4-bit one dequantized by kernels/dequant.py into a
    fresh buffer; None for an 8-bit base (its output is the layer's own; see fusedpeft.quantized)."""
    return dense_weight(weight, x.dtype, dequantize_4bit)


def _check(x: torch.Tensor, weights, lora_As, lora_Bs) -> None:
    reason = unavailable_reason(x.device)
    if reason:
        raise RuntimeError(reason)
    if x.dtype not in DTYPES:
        raise TypeError(f"triton lora: x has dtype {x.dtype}; the kernels support {DTYPES}")
    for i, (w, A, B) in enumerate(zip(weights, lora_As, lora_Bs)):
        if w is None:  # no base product (8-bit base)
            w = x
        if w.dtype != x.dtype:
            raise TypeError(f"triton lora: weight[{i}] has dtype {w.dtype} but x has {x.dtype}; they must match")
        for name, t in (("weight", w), ("lora_A", A), ("lora_B", B)):
            if t.device != x.device:
                raise ValueError(f"triton lora: {name}[{i}] is on {t.device} but x is on {x.device}")
            if not t.is_floating_point():
                raise TypeError(f"triton lora: {name}[{i}] must be floating point, got {t.dtype}")


def lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """x [N, K], weight [D, K], bias [D] | None, lora_A [r, K], lora_B [D, r] -> (y [N, D], S [N, r]).

    y and S in x's dtype; seed: 0-dim int64 tensor, needed when dropout_p > 0."""
    weight = _dense(weight, x)
    _check(x, (weight,), (lora_A,), (lora_B,))
    xl = for_launch(x).contiguous()
    S = shrink(xl, for_launch(lora_A), dropout_p, seed)
    y = forward_gemm(xl, for_launch(weight), for_launch(bias), S, for_launch(lora_B), scaling)
    return y.to(x.dtype), S.to(x.dtype)


def lora_backward(grad_y, x, weight, lora_A, lora_B, S, scaling: float, dropout_p: float, seed,
                  need_x: bool, need_A: bool, need_B: bool):
    """grad_y [N, D] (any strides) -> (grad_x [N, K] | None, grad_A [r, K] | None, grad_B [D, r] | None).

    grad_x in x's dtype, grad_A / grad_B in lora_A's / lora_B's dtypes."""
    weight = _dense(weight, x) if need_x else None
    _check(x, (weight,), (lora_A,), (lora_B,))
    xl = for_launch(x).contiguous()
    dy = for_launch(grad_y.to(x.dtype)).contiguous()  # a stride-0 expanded gradient becomes a real one
    Sl = for_launch(S.to(x.dtype))
    dS, dB = ds_db(dy, for_launch(lora_B), Sl, scaling, need_x or need_A, need_B)
    grad_x = dA = None
    if need_x:
        dA = torch.zeros(lora_A.shape, dtype=_acc_dtype(xl.dtype), device=x.device) if need_A else None
        grad_x = dx_gemm(dy, for_launch(weight), dS, for_launch(lora_A), dropout_p, seed, x=xl, dA=dA).to(x.dtype)
    elif need_A:
        dA = da(dS, xl, dropout_p, seed)
    return grad_x, dA.to(lora_A.dtype) if need_A else None, dB.to(lora_B.dtype) if need_B else None


def lora_grouped_forward(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p: float, seed):
    """Layers i = 0..G-1 reading one x [N, K]: weights[i] [D_i, K], biases[i] [D_i] | None,
    lora_As[i] [r_i, K], lora_Bs[i] [D_i, r_i] -> (ys: list of [N, D_i], S [N, sum r_i]).

    One shrink pass over x for every adapter (with one dropout mask from one seed), then one
    fused GEMM per layer reading its column slice of S. Outputs in x's dtype."""
    _check(x, weights, lora_As, lora_Bs)
    xl = for_launch(x).contiguous()
    S = shrink(xl, torch.cat([for_launch(A) for A in lora_As]), dropout_p, seed)
    ys, start = [], 0
    for w, b, B, scaling in zip(weights, biases, lora_Bs, scalings):
        r = B.shape[1]
        ys.append(forward_gemm(xl, for_launch(w), for_launch(b), S[:, start:start + r], for_launch(B), scaling)
                  .to(x.dtype))
        start += r
    return ys, S.to(x.dtype)


def lora_grouped_backward(grad_ys, x, weights, lora_As, lora_Bs, S, scalings, dropout_p: float, seed,
                          need_x: bool, need_A: bool, need_B: bool):
    """grad_ys[i] [N, D_i] | None (an unused output) -> (grad_x [N, K] | None, grad_As: list of
    [r_i, K] | None, grad_Bs: list of [D_i, r_i] | None).

    dS and dB per layer (one pass over each dY_i), then ONE dA pass over x for all adapters and
    one dX accumulator: the first layer's GEMM adds the whole rank-sum_r term, the others add
    their dY_i @ W_i."""
    _check(x, weights, lora_As, lora_Bs)
    xl = for_launch(x).contiguous()
    Sl = for_launch(S.to(x.dtype))
    need_S = need_x or need_A
    dS = xl.new_zeros(xl.shape[0], Sl.shape[1]) if need_S else None
    dys, grad_Bs, start = [], [], 0
    for g, B, scaling in zip(grad_ys, lora_Bs, scalings):
        r = B.shape[1]
        if g is None:
            dys.append(None)
            grad_Bs.append(torch.zeros_like(B) if need_B else None)
        else:
            dy = for_launch(g.to(x.dtype)).contiguous()
            dys.append(dy)
            _, dB = ds_db(dy, for_launch(B), Sl[:, start:start + r], scaling, need_S, need_B,
                          ds_out=dS[:, start:start + r] if need_S else None)
            grad_Bs.append(dB.to(B.dtype) if need_B else None)
        start += r
    grad_x = dA = None
    if need_A:
        dA = torch.zeros(Sl.shape[1], xl.shape[1], dtype=_acc_dtype(xl.dtype), device=x.device)
    live = [(dy, w) for dy, w in zip(dys, weights) if dy is not None]
    if need_x and live:
        A_cat = torch.cat([for_launch(A) for A in lora_As])
        for i, (dy, w) in enumerate(live):  # the first launch adds the whole rank term (and dA)
            grad_x = dx_gemm(dy, for_launch(w), dS if i == 0 else None, A_cat, dropout_p, seed, out=grad_x,
                             x=xl, dA=dA if i == 0 else None)
    elif need_x:
        grad_x = xl.new_zeros(xl.shape)
    elif need_A:
        dA = da(dS, xl, dropout_p, seed)
    grad_As = None
    if need_A:
        grad_As = [g.to(A.dtype, copy=True) for g, A in zip(dA.split([A.shape[0] for A in lora_As]), lora_As)]
    return None if grad_x is None else grad_x.to(x.dtype), grad_As, grad_Bs if need_B else None
