"""Every shipped config of the Triton LoRA kernels, compiled ahead of time for sm_90 and sm_80
(docs/architecture.md §3.3, tests/triton_aot.py): it compiles, the GEMMs use wgmma on sm_90 (mma.sync on
sm_80), nothing spills, shared memory fits.

The launches this mirrors: a Llama layer in fp16/bf16 with fp32 adapters (PEFT's default),
sizes and row strides multiples of 16, unit strides specialised to 1 (as Triton's launcher
does); the GEMMs at their widest rank chunk (32) and dX with dropout and the fused dA, the thin
kernels at rank chunks 16 and 128: the variants with the most live registers. ``python
tests/test_triton_lora_aot.py`` prints the table of the issue note.
"""

import functools

import pytest

from fusedpeft.kernels import lora as kl
from fusedpeft.kernels.lora_jit import (
    _lora_bwd_da_kernel,
    _lora_bwd_ds_db_kernel,
    _lora_bwd_dx_kernel,
    _lora_fwd_kernel,
    _lora_shrink_kernel,
)
from triton_aot import compile_for, report_table

DTYPES = {"fp16": "*fp16", "bf16": "*bf16"}


def _gemm_case(kind: str, dtype: str, r_block: int):
    """(kernel, signature, constexprs without the tile, aligned argument names)."""
    t = DTYPES[dtype]
    if kind == "fwd":
        sig = dict(x_ptr=t, w_ptr=t, bias_ptr=t, s_ptr=t, b_ptr="*fp32", y_ptr=t, N="i32", D="i32", K="i32", R="i32",
                   stride_xm="i32", stride_wd="i32", stride_sm="i32", stride_bd="i32", stride_ym="i32",
                   scaling="fp32")
        const = dict(stride_wk=1, stride_br=1, HAS_BIAS=True, FP64=False, PRECISION="tf32", R_BLOCK=r_block)
        return _lora_fwd_kernel, sig, const
    sig = dict(dy_ptr=t, w_ptr=t, ds_ptr=t, a_ptr="*fp32", dx_ptr=t, x_ptr=t, da_ptr="*fp32", N="i32", K="i32",
               D="i32", R="i32", stride_dym="i32", stride_wd="i32", stride_dsm="i32", stride_ar="i32",
               stride_dxm="i32", stride_xm="i32", stride_dar="i32", seed="i64", p="fp32", scale="fp32")
    const = dict(stride_wk=1, stride_ak=1, HAS_LORA=True, HAS_DROPOUT=True, ACCUMULATE=False, FUSE_DA=True,
                 FP64=False, PRECISION="tf32", R_BLOCK=r_block)
    return _lora_bwd_dx_kernel, sig, const


def _thin_case(kind: str, r_block: int):
    t = "*bf16"
    if kind == "shrink":
        sig = dict(x_ptr=t, a_ptr="*fp32", s_ptr=t, N="i32", K="i32", R="i32", stride_xm="i32", stride_ar="i32",
                   stride_sm="i32", seed="i64", p="fp32", scale="fp32")
        return _lora_shrink_kernel, sig, dict(stride_ak=1, HAS_DROPOUT=True)
    if kind == "ds_db":
        sig = dict(dy_ptr=t, b_ptr="*fp32", s_ptr=t, ds_ptr=t, db_ptr="*fp32", N="i32", D="i32", R="i32",
                   stride_dym="i32", stride_bd="i32", stride_sm="i32", stride_dsm="i32", stride_dbd="i32",
                   scaling="fp32")
        return _lora_bwd_ds_db_kernel, sig, dict(stride_br=1, NEED_S=True, NEED_B=True)
    sig = dict(ds_ptr=t, x_ptr=t, da_ptr="*fp32", N="i32", K="i32", R="i32", stride_dsm="i32", stride_xm="i32",
               stride_dar="i32", rows_per_split="i32", seed="i64", p="fp32", scale="fp32")
    return _lora_bwd_da_kernel, sig, dict(HAS_DROPOUT=True)


def _aligned(sig):
    """Pointers and every size / row stride: multiples of 16 in the Llama launches (not the seed
    and the float scalars)."""
    return tuple(a for a, ty in sig.items() if ty.startswith("*") or (ty == "i32"))


@functools.lru_cache(maxsize=None)
def gemm_report(kind: str, arch: int, dtype: str, config: tuple, r_block: int):
    kernel, sig, const = _gemm_case(kind, dtype, r_block)
    bm, bn, bk, warps, stages = config
    const = dict(const, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=kl.GROUP_M)
    return compile_for(kernel, sig, const, arch=arch, num_warps=warps, num_stages=stages, aligned=_aligned(sig))


@functools.lru_cache(maxsize=None)
def thin_report(kind: str, arch: int, r_block: int):
    kernel, sig, const = _thin_case(kind, r_block)
    cfg = kl.small_kernel_config(kind, r_block, interpreted=False)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    return compile_for(kernel, sig, dict(const, R_BLOCK=r_block, PRECISION="tf32", FP64=False, **cfg), arch=arch,
                       num_warps=warps, num_stages=stages, aligned=_aligned(sig))


# the GEMMs at their widest rank chunk (the most live registers), both dtypes, every config
GEMM_CASES = [(kind, arch, dtype, config, kl.MAX_GEMM_R_BLOCK) for kind in ("fwd", "dx") for arch in (90, 80)
              for dtype in DTYPES for config in kl.gemm_configs(arch, 2, kind)]
THIN_CASES = [(kind, arch, r_block) for kind in ("shrink", "ds_db", "da") for arch in (90, 80) for r_block in (16, 128)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,arch,dtype,config,r_block", GEMM_CASES, ids=str)
def test_gemm_configs_compile_to_tensor_cores_without_spills(kind, arch, dtype, config, r_block):
    report = gemm_report(kind, arch, dtype, config, r_block)
    report.check(require_wgmma=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind,arch,r_block", THIN_CASES, ids=str)
def test_thin_kernels_compile_without_spills(kind, arch, r_block):
    report = thin_report(kind, arch, r_block)
    report.check()
    assert report.uses_wgmma or report.uses_mma  # their dots run on tensor cores too


def all_reports():
    return [gemm_report(*case) for case in GEMM_CASES] + [thin_report(*case) for case in THIN_CASES]


if __name__ == "__main__":
    print(report_table(all_reports()))
