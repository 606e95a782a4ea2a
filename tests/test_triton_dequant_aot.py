"""The Triton 4-bit dequantization kernel (fusedpeft/kernels/dequant.py) compiled ahead of time for
sm_90 and sm_80 (tests/triton_aot.py): it compiles with fp fusion off (as it is launched), nothing
spills, for every output dtype, with and without double quantization. ``python
tests/test_triton_dequant_aot.py`` prints the table."""

import functools

import pytest

from fusedpeft.kernels import dequant as kd
from triton_aot import compile_for, report_table

OUT = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


@functools.lru_cache(maxsize=None)
def report(arch: int, out: str, nested: bool):
    sig = dict(packed_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8" if nested else "*fp32", code2_ptr="*fp32",
               absmax2_ptr="*fp32", out_ptr=OUT[out], offset="fp32", n_bytes="i64", numel="i64", blocksize="i32",
               blocksize2="i32")
    return compile_for(kd._dequant_4bit_kernel, sig, dict(NESTED=nested, BLOCK=kd.BLOCK_BYTES), arch=arch,
                       num_warps=kd.NUM_WARPS, num_stages=1, enable_fp_fusion=False,
                       aligned=("packed_ptr", "code_ptr", "absmax_ptr", "code2_ptr", "absmax2_ptr", "out_ptr",
                                "blocksize"))


CASES = [(arch, out, nested) for arch in (90, 80) for out in OUT for nested in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("arch,out,nested", CASES, ids=str)
def test_dequant_kernel_compiles_without_spills(arch, out, nested):
    report(arch, out, nested).check()


if __name__ == "__main__":
    print(report_table([report(*case) for case in CASES]))
