"""Every shipped config of the Triton DoRA kernels, compiled ahead of time for sm_90 and sm_80
(tests/triton_aot.py): it compiles, the GEMMs use wgmma on sm_90 (mma.sync on sm_80), nothing
spills, shared memory fits.

Mirrors the launches of a Llama layer in fp16 / bf16 with fp32 adapters and an fp32 g = m / n,
sizes and row strides multiples of 16, unit strides specialised to 1; the GEMMs at their widest
rank chunk, with and without dropout (the dropout variants hold two accumulators), dX with the
fused dA. ``python tests/test_triton_dora_aot.py`` prints the table.
"""

import functools

import pytest

from fusedpeft.kernels import dora as kd
from fusedpeft.kernels import lora as kl
from fusedpeft.kernels.dora_jit import _colsum_product_kernel, _dora_bwd_dx_kernel, _dora_fwd_kernel
from triton_aot import compile_for, report_table

DTYPES = {"fp16": "*fp16", "bf16": "*bf16"}


def _gemm_case(kind: str, dtype: str, dropout: bool):
    t = DTYPES[dtype]
    if kind == "fwd":
        sig = dict(x_ptr=t, w_ptr=t, bias_ptr=t, s_ptr=t, b_ptr="*fp32", g_ptr="*fp32", y_ptr=t, v_ptr=t, N="i32",
                   D="i32", K="i32", R="i32", stride_xm="i32", stride_wd="i32", stride_sm="i32", stride_bd="i32",
                   stride_ym="i32", stride_vm="i32", scaling="fp32", seed="i64", p="fp32", scale="fp32")
        const = dict(stride_wk=1, stride_br=1, HAS_BIAS=True, HAS_DROPOUT=dropout, FP64=False, PRECISION="tf32",
                     R_BLOCK=kl.MAX_GEMM_R_BLOCK)
        return _dora_fwd_kernel, sig, const
    sig = dict(dy_ptr=t, w_ptr=t, g_ptr="*fp32", ds_ptr=t, a_ptr="*fp32", dx_ptr=t, x_ptr=t, da_ptr="*fp32",
               N="i32", K="i32", D="i32", R="i32", stride_dym="i32", stride_wd="i32", stride_dsm="i32",
               stride_ar="i32", stride_dxm="i32", stride_xm="i32", stride_dar="i32", seed="i64", p="fp32",
               scale="fp32")
    const = dict(stride_wk=1, stride_ak=1, HAS_DROPOUT=dropout, FUSE_DA=True, FP64=False, PRECISION="tf32",
                 R_BLOCK=kl.MAX_GEMM_R_BLOCK)
    return _dora_bwd_dx_kernel, sig, const


def _aligned(sig):
    return tuple(a for a, ty in sig.items() if ty.startswith("*") or ty == "i32")


@functools.lru_cache(maxsize=None)
def gemm_report(kind: str, arch: int, dtype: str, dropout: bool, config: tuple):
    kernel, sig, const = _gemm_case(kind, dtype, dropout)
    bm, bn, bk, warps, stages = config
    const = dict(const, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=kl.GROUP_M)
    return compile_for(kernel, sig, const, arch=arch, num_warps=warps, num_stages=stages, aligned=_aligned(sig))


@functools.lru_cache(maxsize=None)
def colsum_report(arch: int):
    sig = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32", N="i32", D="i32", stride_am="i32", stride_bm="i32",
               rows_per_split="i32")
    cfg = dict(kd.COLSUM_CONFIG)
    warps = cfg.pop("num_warps")
    return compile_for(_colsum_product_kernel, sig, dict(cfg, FP64=False), arch=arch, num_warps=warps, num_stages=1,
                       aligned=_aligned(sig))


GEMM_CASES = [(kind, arch, dtype, dropout, config) for kind in ("fwd", "dx") for arch in (90, 80) for dtype in DTYPES
              for dropout in (False, True) for config in kd.dora_configs(arch, 2, kind, dropout)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,arch,dtype,dropout,config", GEMM_CASES, ids=str)
def test_gemm_configs_compile_to_tensor_cores_without_spills(kind, arch, dtype, dropout, config):
    gemm_report(kind, arch, dtype, dropout, config).check(require_wgmma=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_colsum_compiles_without_spills(arch):
    colsum_report(arch).check()


def all_reports():
    return [gemm_report(*case) for case in GEMM_CASES] + [colsum_report(a) for a in (90, 80)]


if __name__ == "__main__":
    print(report_table(all_reports()))
