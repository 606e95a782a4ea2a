"""The Triton DoRA kernels under the interpreter (tiny shapes crossing tile edges): forward and
every gradient against the float64 reference (fusedpeft.reference.dora_linear), with and
without dropout (the docs/contract.md §5 mask), fp32 / fp16, 2-D and 3-D inputs, bias or not."""

from __future__ import annotations

import pytest
import torch

from fusedpeft import reference as ref
from fusedpeft.ops.dora import dora_linear
from helpers import assert_within, runnable

pytestmark = pytest.mark.skipif("triton" not in runnable("dora"), reason="the triton backend cannot run here")

CASES = [  # (rows, K, D, r, dropout, bias, 3-D)
    (70, 40, 72, 4, 0.0, True, False),
    (9, 33, 17, 3, 0.0, False, True),
    (70, 40, 72, 4, 0.3, True, False),
    (9, 33, 17, 3, 0.25, False, True),
]


def _inputs(rows, K, D, r, bias, three_d, dtype, device):
    shape = (3, rows // 3, K) if three_d else (rows, K)
    x = torch.randn(shape, device=device).to(dtype)
    W = (torch.randn(D, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(D, device=device).to(dtype) if bias else None
    A = torch.randn(r, K, device=device) / K**0.5
    B = torch.randn(D, r, device=device) * 0.3
    m = torch.linalg.vector_norm(W.float(), dim=1) * (1.0 + 0.3 * torch.rand(D, device=device))
    m[1] = 0.0  # a zero magnitude: its gradient comes from the recomputed column
    return x, W, b, A, B, m


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,K,D,r,p,bias,three_d", CASES)
def test_matches_reference(device, dtype, atol, rows, K, D, r, p, bias, three_d):
    x, W, b, A, B, m = _inputs(rows, K, D, r, bias, three_d, dtype, device)
    seed = torch.tensor(987654321) if p > 0 else None
    s = 1.5
    leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
    y = dora_linear(leaves[0], W, b, *leaves[1:], s, p, seed, backend="triton")
    x64, A64, B64, m64 = (t.detach().double().requires_grad_() for t in (x, A, B, m))
    b64 = b.double() if b is not None else None
    y64 = ref.dora_linear(x64, W.double(), b64, A64, B64, m64, s, p, int(seed) if seed is not None else None)
    # baseline: the reference formula evaluated in the test dtype's PyTorch
    y_base = ref.dora_linear(x, W, b, A, B, m, s, p, int(seed) if seed is not None else None)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_within(y, y64, y_base, atol, "y")
    g = torch.randn_like(y64)
    y.backward(g.to(dtype))
    y64.backward(g)
    for name, got, want in zip(("x", "A", "B", "m"), leaves, (x64, A64, B64, m64)):
        scale = max(1.0, want.grad.abs().max().item())
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * scale
        err = (got.grad.double() - want.grad).abs().max().item()
        assert err <= tol, f"grad {name}: max error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_op_opcheck_and_gradcheck(dropout_p):
    from torch.library import opcheck

    from fusedpeft.ops.dora import dora_linear_backward_op, dora_linear_op

    x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    W = torch.randn(65, 33, dtype=torch.float64)
    b = torch.randn(65, dtype=torch.float64)
    A = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    B = torch.randn(65, 4, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(65, dtype=torch.float64) + 0.5).requires_grad_()
    seed = torch.tensor(20251203) if dropout_p else None
    args = (x, W, b, A, B, g, 0.75, dropout_p, seed, "triton")
    opcheck(dora_linear_op, args)
    y, S, V = dora_linear_op(x.detach(), W, b, A.detach(), B.detach(), g.detach(), 0.75, dropout_p, seed, "triton")
    opcheck(dora_linear_backward_op, (torch.randn_like(y), x.detach(), W, b, A.detach(), B.detach(), g.detach(),
                                      V if dropout_p else y, S, 0.75, dropout_p, seed, True, True, True, True,
                                      "triton"))
    torch.autograd.gradcheck(lambda x, A, B, g: dora_linear_op(x, W, b, A, B, g, 0.75, dropout_p, seed, "triton")[0],
                             (x, A, B, g), fast_mode=True)
