"""Every shipped Triton MoRA kernel config compiled ahead of time for sm_90 and sm_80 (docs/architecture.md §3.3):
it compiles, the GEMMs use tensor cores (wgmma on sm_90, mma.sync on sm_80) for 16-bit inputs,
nothing spills and shared memory fits. The variants compiled per GEMM config are the heaviest
of its uses (see ``_gemm_cases``); each compile takes ~5-15 s on the 2-core CI machine.

``python tests/test_triton_mora_aot.py`` prints the table of every report.
"""

import functools
import os
import sys

import pytest
import triton.language as tl

from fusedpeft.kernels import mora as tm
from fusedpeft.kernels.mora_kernels import _mora_dm_kernel, _mora_gemm_kernel, _mora_slot_sum_kernel
from triton_aot import compile_for, report_table

TYPES = {2: "bf16", 4: "fp32", 8: "fp64"}
ACC = {2: tl.float32, 4: tl.float32, 8: tl.float64}
PRECISION = {2: "tf32", 4: "ieee", 8: "ieee"}


def _gemm_signature(dt: str) -> dict:
    ints = ("N", "P", "Q", "stride_am", "stride_bp", "stride_bq", "stride_cm", "stride_um", "K", "D", "R", "PAD",
            "N_CHUNKS", "USED", "SPAN", "N_TILES")
    return dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", c_ptr=f"*{dt}", bias_ptr=f"*{dt}", m_ptr="*fp32", u_ptr=f"*{dt}",
                cos_ptr="*fp32", sin_ptr="*fp32", seed="i64", p="fp32", scale_ptr="*fp32" if dt != "fp64" else "*fp64",
                **{name: "i32" for name in ints})


# Llama shapes: every stride and size below is a multiple of 16 in the real launches.
GEMM_ALIGNED = ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "m_ptr", "u_ptr", "cos_ptr", "sin_ptr", "scale_ptr", "N", "P",
                "Q", "stride_am", "stride_cm", "K", "D")

ROPE_FWD, ROPE_DX = (tm.MODE_ROPE, False), (tm.MODE_ROPE, True)


def _gemm_cases():
    """(arch, element bytes, config, (MODE, TRANS, DROPOUT)) for every shipped GEMM config.

    Each config is compiled with the type-6 forward and dX variants (the chunk dots on top of the
    base tile: the most registers); the sm_90 16-bit dropout config also with the types 1-4 dX
    epilogue gather (Philox on the output tile); every types 1-4 gather config (MODE_MERGE) on
    both archs. fp32 / fp64 configs (IEEE dots, no tensor cores) are compiled once each. ~25
    compiles, 5-15 s each on the 2-core CI machine.
    """
    for arch in (90, 80):
        for dropout in (False, True):
            for config in tm.gemm_configs(arch, 2, dropout):
                for mode, trans in (ROPE_FWD, ROPE_DX):
                    yield arch, 2, config, (mode, trans, dropout)
    yield 90, 2, tm.gemm_configs(90, 2, True)[0], (tm.MODE_SLOTS, True, True)
    for arch in (90, 80):  # the types 1-4 gather (design "tile"): its own configs
        for config in tm.gemm_configs(arch, 2, False, tm.MODE_MERGE):
            yield arch, 2, config, (tm.MODE_MERGE, True, False)
    yield 90, 4, tm.gemm_configs(90, 4, True)[0], (*ROPE_DX, True)
    for arch in (90, 80):  # fp32 types 1-4 default
        yield arch, 4, tm.gemm_configs(arch, 4, False, tm.MODE_MERGE)[0], (tm.MODE_MERGE, True, False)
    yield 90, 8, tm.gemm_configs(90, 8, True)[0], (*ROPE_DX, True)
    yield 80, 4, tm.gemm_configs(80, 4, True)[0], (*ROPE_DX, True)


@functools.lru_cache(maxsize=None)
def gemm_report(arch, nbytes, config, variant):
    bm, bn, bk, warps, stages = config
    mode, trans, dropout = variant
    constexprs = dict(MODE=mode, TRANS=trans, OUT_CONTIG=False, IN_CONTIG=False, HAS_BIAS=not trans, DROPOUT=dropout,
                      ACC=ACC[nbytes], PRECISION=PRECISION[nbytes], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      GROUP_M=tm.GROUP_M, BLOCK_R=tm.ROPE_BLOCK)
    return compile_for(_mora_gemm_kernel, _gemm_signature(TYPES[nbytes]), constexprs, arch=arch, num_warps=warps,
                       num_stages=stages, aligned=GEMM_ALIGNED)


@functools.lru_cache(maxsize=None)
def dm_report(arch, nbytes):
    ba, bb, bm, warps, stages = tm.DM_CONFIGS[nbytes]
    dt = TYPES[nbytes]
    ints = ("N", "R", "K", "D", "N_CHUNKS", "USED", "SPAN", "N_TILES", "SPLIT", "stride_gm", "stride_zm")
    sig = dict(g_ptr=f"*{dt}", z_ptr=f"*{dt}", cos_ptr="*fp32", sin_ptr="*fp32", part_ptr="*fp32" if nbytes < 8 else
               "*fp64", seed="i64", p="fp32", scale_ptr="*fp32" if nbytes < 8 else "*fp64", **{n: "i32" for n in ints})
    constexprs = dict(ROPE=True, DROPOUT=True, ACC=ACC[nbytes], PRECISION=PRECISION[nbytes], BLOCK_A=ba, BLOCK_B=bb,
                      BLOCK_M=bm)
    aligned = ("g_ptr", "z_ptr", "cos_ptr", "sin_ptr", "part_ptr", "scale_ptr", "N", "R", "K", "D", "stride_gm",
               "stride_zm")
    return compile_for(_mora_dm_kernel, sig, constexprs, arch=arch, num_warps=warps, num_stages=stages, aligned=aligned)


@functools.lru_cache(maxsize=None)
def slot_sum_report(arch):
    bm, br, warps = tm.SLOT_SUM_CONFIG
    ints = ("N", "L", "L_EXT", "R", "N_ITER", "stride_sm", "stride_om")
    sig = dict(src_ptr="*bf16", out_ptr="*bf16", seed="i64", p="fp32", scale_ptr="*fp32", **{n: "i32" for n in ints})
    return compile_for(_mora_slot_sum_kernel, sig, dict(CONTIG=False, DROPOUT=True, ACC=tl.float32, BLOCK_M=bm,
                                                        BLOCK_R=br), arch=arch, num_warps=warps, num_stages=1)


@pytest.mark.slow
@pytest.mark.parametrize("arch,nbytes,config,variant", list(_gemm_cases()))
def test_gemm_configs_compile_without_spills(arch, nbytes, config, variant):
    report = gemm_report(arch, nbytes, config, variant)
    # 16-bit dots must use tensor cores; fp32 / fp64 run IEEE dots (FMA), which never use them
    report.check(require_wgmma=nbytes == 2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_dm_reduction_compiles_without_spills(arch):
    dm_report(arch, 2).check(require_wgmma=True)


@pytest.mark.parametrize("arch", [90, 80])
def test_slot_sum_prepass_compiles_without_spills(arch):
    report = slot_sum_report(arch)
    report.check()
    assert not report.uses_wgmma and not report.uses_mma


def test_every_gemm_config_has_128_rows_or_fits_registers():
    """The 16-bit no-dropout configs (the bench's fast path) use 128-row tiles with 8 warps when
    the tile is 128x128 (docs/verifying.md §4: 4 warps spill there)."""
    for arch in (90, 80):
        for bm, bn, _, warps, _ in tm.gemm_configs(arch, 2, False):
            assert bm == 128 and (warps == 8 or bm * bn <= 128 * 64)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    reports = [gemm_report(*case) for case in _gemm_cases()]
    reports += [dm_report(a, 2) for a in (90, 80)] + [slot_sum_report(a) for a in (90, 80)]
    sys.stdout.write(report_table(reports) + "\n")
