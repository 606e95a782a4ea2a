"""The ahead-of-time compile helper (tests/triton_aot.py) on small kernels defined here.

Each compile takes about a second on these CPUs, so every configuration is compiled once per
module (``_report``) and shared by the tests that read it.
"""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from triton_aot import AotReport, compile_for, parse_ptxas_log, report_table

TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
GEMM_SIGNATURE = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", K="i32", stride_am="i32", stride_bk="i32",
                      stride_cm="i32")
ELEMENTWISE_SIGNATURE = dict(x_ptr="*fp16", y_ptr="*fp16", n="i32", scale="fp32")


@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk, stride_cm,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[BLOCK_M, BLOCK_N] tile = A @ B for row-major A [M, K], B [K, N]; K a multiple of BLOCK_K."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b = b_ptr + rk[:, None] * stride_bk + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc += tl.dot(tl.load(a), tl.load(b))
        a += BLOCK_K
        b += BLOCK_K * stride_bk
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _scaled_sigmoid(x, scale):
    """A helper @triton.jit function: the compile must follow calls into it."""
    return tl.sigmoid(x * scale)


@triton.jit
def elementwise_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    """y = sigmoid(scale * x) in fp32, stored as y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _scaled_sigmoid(x, scale).to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _report(kernel_name: str, arch: int, num_warps: int, aligned: tuple | None = None) -> AotReport:
    """One compile per configuration for this test process."""
    if kernel_name == "gemm":
        return compile_for(gemm_kernel, GEMM_SIGNATURE, TILE, arch=arch, num_warps=num_warps, aligned=aligned)
    return compile_for(elementwise_kernel, ELEMENTWISE_SIGNATURE, dict(BLOCK=1024), arch=arch, num_warps=num_warps)


def test_gemm_sm90_8_warps_uses_wgmma_without_spills():
    r = _report("gemm", 90, 8)
    assert r.uses_wgmma and not r.uses_mma
    assert r.registers > 0 and not r.spills
    assert r.shared_memory_bytes >= (128 * 64 + 64 * 128) * 2  # one stage of bf16 A and B tiles
    r.check(require_wgmma=True)


def test_gemm_sm90_4_warps_spills_and_check_says_so():
    """docs/verifying.md §4 (ahead-of-time compiles): a 128x128x64 bf16 tile with 4 warps spills (when
    the strides are not known to be multiples of 16); the 128x128 fp32 accumulator alone needs 128
    registers per thread."""
    r = _report("gemm", 90, 4)
    assert r.spill_store_bytes > 0 and r.spill_load_bytes > 0 and r.spills
    assert r.registers == 255
    with pytest.raises(AssertionError, match=r"register spills: \d+ bytes stored"):
        r.check()


def test_divisible_strides_let_the_loop_pipeline():
    """The JIT marks integer arguments that are multiples of 16; AOT must be told (aligned=...).
    With the strides marked, the K loop is software-pipelined: more shared memory (one buffer per
    stage), fewer registers, and the 4-warp tile no longer spills."""
    plain = _report("gemm", 90, 4)
    marked = _report("gemm", 90, 4, aligned=tuple(GEMM_SIGNATURE))
    stage_bytes = (128 * 64 + 64 * 128) * 2
    assert marked.shared_memory_bytes >= 2 * stage_bytes > plain.shared_memory_bytes
    assert marked.uses_wgmma and not marked.spills and marked.registers < plain.registers
    marked.check(require_wgmma=True)


def test_gemm_sm80_uses_mma_not_wgmma():
    r = _report("gemm", 80, 8)
    assert r.uses_mma and not r.uses_wgmma
    assert r.shared_memory_bytes > 0 and not r.spills
    assert ".target sm_80" in r.ptx
    r.check(require_wgmma=True)  # on sm_80 this requires mma.sync


@pytest.mark.parametrize("arch", [80, 90])
def test_elementwise_kernel_has_no_tensor_core_ops(arch):
    r = _report("elementwise", arch, 4)
    assert not r.uses_wgmma and not r.uses_mma
    assert 0 < r.registers < 64 and not r.spills
    r.check()
    with pytest.raises(AssertionError, match="wgmma" if arch == 90 else "mma.sync"):
        r.check(require_wgmma=True)


def test_check_rejects_shared_memory_over_the_limit():
    r = _report("gemm", 90, 8)
    at_limit = dataclasses.replace(r, shared_memory_bytes=227 * 1024)
    at_limit.check()
    with pytest.raises(AssertionError, match="exceeds the sm_90 limit of 227 KiB"):
        dataclasses.replace(r, shared_memory_bytes=227 * 1024 + 1).check()
    sm80 = _report("gemm", 80, 8)
    with pytest.raises(AssertionError, match="exceeds the sm_80 limit of 163 KiB"):
        dataclasses.replace(sm80, shared_memory_bytes=163 * 1024 + 1).check()


def test_parse_ptxas_log():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function 'k' for 'sm_80'
        ptxas info    : Function properties for k
            160 bytes stack frame, 308 bytes spill stores, 280 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 160 bytes cumulative stack size, 408 bytes cmem[0]
        """)
    assert parse_ptxas_log(log) == dict(registers=255, stack_frame=160, spill_stores=308, spill_loads=280,
                                        static_smem=0)
    with pytest.raises(ValueError, match="unrecognised ptxas"):
        parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def test_report_table_lists_every_report():
    reports = [_report("gemm", 90, 8), _report("gemm", 90, 4), _report("elementwise", 80, 4)]
    table = report_table(reports).splitlines()
    assert len(table) == 2 + len(reports)
    assert table[2].startswith("| gemm_kernel[BLOCK_M=128, BLOCK_N=128, BLOCK_K=64] | sm_90 | 8 |")
    assert table[2].endswith("| yes | no | ok |")
    assert "register spills" in table[3]
    assert "elementwise_kernel[BLOCK=1024] | sm_80 | 4 |" in table[4]


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="arch must be one of"):
        compile_for(elementwise_kernel, ELEMENTWISE_SIGNATURE, dict(BLOCK=1024), arch=75)
    with pytest.raises(ValueError, match=r"no argument\(s\) \['nope'\]"):
        compile_for(elementwise_kernel, dict(ELEMENTWISE_SIGNATURE, nope="i32"), dict(BLOCK=1024))
    with pytest.raises(ValueError, match=r"for \['BLOCK'\]"):
        compile_for(elementwise_kernel, ELEMENTWISE_SIGNATURE, {})
    with pytest.raises(ValueError, match=r"aligned names \['BLOCK'\]"):
        compile_for(elementwise_kernel, ELEMENTWISE_SIGNATURE, dict(BLOCK=1024), aligned=("x_ptr", "BLOCK"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="launches a kernel under the interpreter")
def test_compile_after_a_launch_leaves_the_interpreter_as_it_was(device):
    """An interpreted launch of a kernel with a nested @triton.jit call leaves interpreter
    versions of triton.language.core's builtins behind; compile_for must still work after one,
    switch the interpreter off only while it compiles, and leave the kernel launchable."""
    x = torch.randn(300, device=device, dtype=torch.float16)
    expected = torch.sigmoid(1.5 * x.float()).half()
    y = torch.empty_like(x)
    elementwise_kernel[(2,)](x, y, 300, 1.5, BLOCK=256)
    torch.testing.assert_close(y, expected)
    before = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    knob = triton.knobs.runtime.interpret
    r = compile_for(elementwise_kernel, ELEMENTWISE_SIGNATURE, dict(BLOCK=256), arch=90)
    assert r.registers > 0
    assert {k: os.environ.get(k) for k in before} == before
    assert triton.knobs.runtime.interpret == knob
    y.zero_()
    elementwise_kernel[(2,)](x, y, 300, 1.5, BLOCK=256)
    torch.testing.assert_close(y, expected)


def test_kernel_calling_closure_helpers_compiles():
    """Helpers reached through a closure (a kernel defined inside a function) are rebuilt too."""
    @triton.jit
    def twice(x):
        return x + x

    @triton.jit
    def local_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(x_ptr + offs, twice(tl.max(x, 0) + x), mask=offs < n)

    r = compile_for(local_kernel, dict(x_ptr="*fp32", n="i32"), dict(BLOCK=128), arch=90)
    assert r.name == "local_kernel[BLOCK=128]" and r.registers > 0
    assert "fadd" in r.ptx or "add.f32" in r.ptx


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter-mode rebuild")
def test_interpreted_kernel_compiles_to_the_same_ptx_as_a_plain_jit_kernel():
    """The JITFunction rebuilt from an InterpretedFunction compiles to byte-identical PTX as the
    kernel imported by a fresh process without the interpreter."""
    here = Path(__file__).parent
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(here)!r})
        import test_triton_aot as t
        from triton_aot import compile_for
        assert type(t.elementwise_kernel).__name__ == "JITFunction"
        r = compile_for(t.elementwise_kernel, t.ELEMENTWISE_SIGNATURE, dict(BLOCK=1024), arch=90)
        sys.stdout.write(r.ptx)
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plain = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == _report("elementwise", 90, 4).ptx
