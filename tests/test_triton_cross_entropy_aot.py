"""Every shipped config of the cross-entropy row kernels compiles ahead of time for the GPU it is
tuned for (CONFIGS[90] for sm_90, CONFIGS[80] for sm_80) without register spills and within the
shared-memory limit (docs/architecture.md §3.3). bf16 logits, with and without softcap (the most registers),
marked as the launcher sees V = 128256 (V and the row stride multiples of 16); the largest config
also with an odd V. Prints the table with -s.
"""

import functools

import pytest
import triton.language as tl

from fusedpeft.kernels.cross_entropy import CONFIGS
from fusedpeft.kernels.cross_entropy_kernels import _ce_bwd_kernel, _ce_fwd_kernel
from triton_aot import compile_for, report_table

SIGNATURES = {
    "fwd": (_ce_fwd_kernel, dict(logits_ptr="*bf16", labels_ptr="*i64", scale_ptr="*fp32", loss_ptr="*fp32",
                                 lse_ptr="*fp32", V="i32", stride_row="i32", eps="fp32", z_loss="fp32",
                                 softcap="fp32")),
    "bwd": (_ce_bwd_kernel, dict(logits_ptr="*bf16", labels_ptr="*i64", scale_ptr="*fp32", lse_ptr="*fp32",
                                 grad_loss_ptr="*fp32", grad_ptr="*bf16", V="i32", stride_row="i32",
                                 stride_grad_row="i32", stride_grad_loss="i32", eps="fp32", z_loss="fp32",
                                 softcap="fp32")),
}
CASES = [(arch, block, warps, kernel, softcap) for arch, configs in CONFIGS.items() for block, warps in configs
         for kernel in SIGNATURES for softcap in (True, False)]


@functools.lru_cache(maxsize=None)
def _report(arch, block, warps, kernel, softcap, odd_vocab=False):
    fn, signature = SIGNATURES[kernel]
    constexprs = dict(HAS_SOFTCAP=softcap, ACC=tl.float32, BLOCK_V=block)
    if kernel == "fwd":
        constexprs["SMOOTHING"] = True
    pointers = tuple(name for name, kind in signature.items() if kind.startswith("*"))
    aligned = pointers if odd_vocab else pointers + ("V", "stride_row") + (("stride_grad_row",) if kernel == "bwd"
                                                                           else ())
    return compile_for(fn, signature, constexprs, arch=arch, num_warps=warps, aligned=aligned)


@pytest.mark.parametrize("arch,block,warps,kernel,softcap", CASES)
def test_shipped_config_compiles_without_spills(arch, block, warps, kernel, softcap):
    report = _report(arch, block, warps, kernel, softcap)
    report.check()
    assert report.registers > 0 and report.num_warps == warps
    assert not report.uses_wgmma and not report.uses_mma  # a row kernel: no tensor-core work


@pytest.mark.parametrize("kernel", list(SIGNATURES))
def test_largest_config_with_odd_vocab(kernel):
    block, warps = max(CONFIGS[90])
    _report(90, block, warps, kernel, True, odd_vocab=True).check()


def test_print_table(capsys):
    table = report_table([_report(*case) for case in CASES])
    with capsys.disabled():
        print("\n" + table)
    assert table.count("| ok |") == len(CASES)
