"""Every shipped config of the log-probs row kernel (fusedpeft/kernels/log_probs_jit.py) compiles
ahead of time for the GPU it is tuned for without register spills and within the shared-memory
limit (docs/architecture.md §3.3): bf16 logits, every output asked for (the most registers), with
and without softcap, marked as the launcher sees V = 128256, and with an odd V (unaligned rows).
Prints the table with -s."""

import functools

import pytest

from fusedpeft.kernels.log_probs import CONFIGS
from fusedpeft.kernels.log_probs_jit import _log_probs_fwd_kernel
from triton_aot import compile_for, report_table

SIGNATURE = dict(logits_ptr="*bf16", targets_ptr="*i64", rows_ptr="*i64", log_probs_ptr="*fp32", stats_ptr="*fp32",
                 V="i32", stride_row="i32", stride_stat="i32", softcap="fp32", inv_temperature="fp32")
CASES = [(arch, block, warps, softcap) for arch, configs in CONFIGS.items() for block, warps in configs
         for softcap in (True, False)]


@functools.lru_cache(maxsize=None)
def _report(arch, block, warps, softcap, odd_vocab=False):
    constexprs = dict(ENTROPY=True, LOG_SUM_SQ=True, MEAN=True, TOP1=True, HAS_SOFTCAP=softcap, BLOCK_V=block)
    pointers = tuple(name for name, kind in SIGNATURE.items() if kind.startswith("*"))
    aligned = pointers if odd_vocab else pointers + ("V", "stride_row")
    return compile_for(_log_probs_fwd_kernel, SIGNATURE, constexprs, arch=arch, num_warps=warps, aligned=aligned)


@pytest.mark.parametrize("arch,block,warps,softcap", CASES)
def test_shipped_config_compiles_without_spills(arch, block, warps, softcap):
    report = _report(arch, block, warps, softcap)
    report.check()
    assert report.registers > 0 and report.num_warps == warps
    assert not report.uses_wgmma and not report.uses_mma  # a row kernel: no tensor-core work


@pytest.mark.parametrize("arch,block,warps,softcap", [case for case in CASES if case[3]])
def test_shipped_config_with_odd_vocab(arch, block, warps, softcap):
    _report(arch, block, warps, softcap, odd_vocab=True).check()


def test_print_table(capsys):
    table = report_table([_report(*case) for case in CASES])
    with capsys.disabled():
        print("\n" + table)
    assert table.count("| ok |") == len(CASES)
