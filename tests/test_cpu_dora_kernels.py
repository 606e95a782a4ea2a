"""The CPU DoRA kernels of fusedpeft._C (csrc/cpu/dora.cpp, csrc/cpu/dora_rows.cpp) against their
formulas in fp64, on every instruction-set path (FUSEDPEFT_CPU_ISA caps it, read once per process,
so each path runs in a subprocess): fusedpeft_C::dora_backward_p0 without dX (the merged form's
backward: AVX-512 groups of eight rows plus a row-at-a-time tail, or ATen's GEMMs) and
fusedpeft_C::dora_merged_weight (W'' = g W + (s g B) A)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ext = pytest.importorskip("fusedpeft._C")
ops = torch.ops.fusedpeft_C

# rows not a multiple of eight, D and K not multiples of 16, r below, at and above one vector of 16
SHAPES = [(37, 33, 65, 17), (16, 16, 16, 16), (9, 1, 3, 1), (130, 100, 40, 33), (8, 48, 20, 5)]
FLAGS = [(a, b, g) for a in (False, True) for b in (False, True) for g in (False, True) if a or b or g]


def _inputs(rows, d, k, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    dy, y, x, S = t(rows, d), t(rows, d), t(rows, k), t(rows, r)
    A, B, W = t(r, k), t(d, r), t(d, k)
    g = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    return [v.to(dtype) for v in (dy, y, x, W, S, A, B, g)]


def backward_errors(rows, d, k, r, dtype, need, scaling=0.75):
    """Max relative error of (grad_A, grad_B, colsum) from dora_backward_p0(need_x=False)."""
    dy, y, x, W, S, A, B, g = _inputs(rows, d, k, r, dtype)
    want_A = (dy.double() @ (scaling * g.double()[:, None] * B.double())).t() @ x.double()
    want_B = scaling * g.double()[:, None] * (dy.double().t() @ S.double())
    want_c = (dy.double() * y.double()).sum(0)
    got = ops.dora_backward_p0(dy, y, x, W, S, A, B, g, scaling, False, *need)
    assert got[0].numel() == 0
    errors = []
    for flag, value, want in zip(need, got[1:], (want_A, want_B, want_c)):
        if not flag:
            assert value.numel() == 0
            continue
        assert value.shape == want.shape
        errors.append(float((value.double() - want).abs().max() / want.abs().max().clamp_min(1e-300)))
    return max(errors)


def merged_error(d, k, r, dtype, scaling=1.5):
    _, _, _, W, _, A, B, g = _inputs(4, d, k, r, dtype, seed=1)
    want = g.double()[:, None] * (W.double() + scaling * B.double() @ A.double())
    got = ops.dora_merged_weight(W, A, B, g, scaling)
    assert got.dtype == dtype and got.shape == (d, k) and got.is_contiguous()
    return float((got.double() - want).abs().max() / want.abs().max())


TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("need", FLAGS, ids=lambda f: "".join(n for n, on in zip("ABg", f) if on))
def test_backward_without_dx_matches_formula(dtype, shape, need):
    assert backward_errors(*shape, dtype, need) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(1024, 1024, 16), (7, 33, 3), (1, 1, 1), (130, 17, 5), (9, 100, 16), (16, 8, 2),
                                   (40, 49, 33)])
def test_merged_weight_matches_formula(dtype, shape):
    assert merged_error(*shape, dtype) < TOL[dtype]


def test_two_threads_sum_their_partials():
    """Rows split over two threads (64 rows per task at least): each thread's partial sums are added."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert backward_errors(300, 40, 24, 16, torch.float32, (True, True, True)) < TOL[torch.float32]
        assert merged_error(300, 24, 16, torch.float32) < TOL[torch.float32]
    finally:
        torch.set_num_threads(threads)


_ISA_CHECK = """
import sys
sys.path.insert(0, {tests!r})
import torch, fusedpeft._C as ext
from test_cpu_dora_kernels import FLAGS, SHAPES, backward_errors, merged_error
worst = max(backward_errors(*shape, torch.float32, need) for shape in SHAPES for need in FLAGS)
worst = max(worst, merged_error(130, 17, 5, torch.float32), merged_error(1024, 1024, 16, torch.float32))
print(ext.philox_isa(), worst)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_instruction_set_path(isa):
    env = dict(os.environ, FUSEDPEFT_CPU_ISA=isa)
    code = _ISA_CHECK.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    used, worst = out.split()
    if used != isa:
        pytest.skip(f"this CPU cannot run {isa} (fell back to {used})")
    assert float(worst) < TOL[torch.float32]


def test_merged_weight_rejects_bad_input():
    W, A, B, g = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2), torch.rand(6)
    with pytest.raises(RuntimeError, match="weight must be float32 or float64, got BFloat16"):
        ops.dora_merged_weight(W.bfloat16(), A, B, g, 1.0)
    with pytest.raises(RuntimeError, match=r"lora_A must be \[2, 5\] and lora_B \[6, 2\], got \[2, 4\] and \[6, 2\]"):
        ops.dora_merged_weight(W, A[:, :4], B, g, 1.0)
    with pytest.raises(RuntimeError, match=r"g must have shape \[6\], got \[5\]"):
        ops.dora_merged_weight(W, A, B, g[:5], 1.0)
    with pytest.raises(RuntimeError, match="weight must be a 2-D tensor"):
        ops.dora_merged_weight(W[0], A, B, g, 1.0)
