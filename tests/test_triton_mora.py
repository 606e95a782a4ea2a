"""The Triton MoRA backend (fusedpeft/kernels/mora.py) against fusedpeft.reference (docs/contract.md §3, §5).

Under TRITON_INTERPRET=1 (no GPU) the kernels run on CPU tensors at tiny shapes; both designs
("tile": ΔW generated inside the GEMM, "compressed": pre-pass + square matmul + epilogue) are
tested where they apply. gpu-marked tests run the Llama shapes in bf16 (bench/gpu_check.sh).
"""

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.backends import unavailable_reason
from fusedpeft.kernels import mora as tm
from fusedpeft.ops.mora import mora_linear
from helpers import assert_within, grads

pytestmark = pytest.mark.skipif(unavailable_reason("triton", "mora", torch.device("cuda" if torch.cuda.is_available()
                                                                                   else "cpu")) is not None,
                                reason="the triton mora backend cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (k, d, r_hat): k % r_hat != 0 (wrap padding) and d > k with n R < d (type 6 tiles the output);
# k % r_hat == 0 and d < k (truncation, unused chunks); padding with d < k and 70 rows (2 row blocks);
# r_hat = 34 > the interpreter's chunk-dot width (16) and dM tile (32), chunks straddling tiles.
SHAPES = [(13, 29, 6), (30, 7, 6), (20, 12, 8), (40, 90, 34)]
TYPES = [1, 2, 3, 4, 6]


def _designs(mora_type, dropout_p):
    if mora_type == 6:
        return ["tile"]
    return ["compressed"] if dropout_p else ["tile", "compressed"]


def _inputs(k, d, r_hat, dtype, rows=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x, w, b, M, gy = make(rows, k), make(d, k), make(d), make(r_hat, r_hat), make(rows, d)
    return [t.to(dtype).to(DEVICE) for t in (x, w, b)] + [M.to(DEVICE), gy.to(dtype).to(DEVICE)]


def _reference(x, w, b, M, gy, mora_type, p, seed):
    """(y, grad_x, grad_M) of the reference in float64."""
    x64, M64 = x.double().requires_grad_(), M.double().requires_grad_()
    y = ref.mora_linear(x64, w.double(), None if b is None else b.double(), M64, mora_type, p, seed)
    return (y.detach(), *torch.autograd.grad(y, (x64, M64), gy.double()))


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("k,d,r_hat", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_float64_matches_reference_exactly(mora_type, k, d, r_hat, dropout_p):
    """fp64 has no rounding to hide behind: every design equals the reference to ~1e-13, forward,
    grad x and grad M, dropout mask included (regenerated in backward)."""
    rows = 70 if (k, d) == (20, 12) else 9
    x, w, b, M, gy = _inputs(k, d, r_hat, torch.float64, rows)
    seed = torch.tensor(2**40 + 12345)
    want = _reference(x, w, b, M, gy, mora_type, dropout_p, int(seed))
    for design in _designs(mora_type, dropout_p):
        y = tm.mora_forward(x, w, b, M, mora_type, dropout_p, seed if dropout_p else None, design=design)
        gx, gM = tm.mora_backward(gy, x, w, M, mora_type, dropout_p, seed if dropout_p else None, True, True,
                                  design=design)
        for name, got, expected in zip(("y", "grad_x", "grad_M"), (y, gx, gM), want):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{design}: {name}")


def _eager(x, w, b, M, mora_type, p, seed):
    """base + dropout(x) @ ΔW^T computed by PyTorch in x's dtype: the precision baseline."""
    xd = x if p == 0 else x * ref.dropout_keep_mask(seed, *x.shape, p, device=x.device).to(x.dtype) / (1 - p)
    delta = ref.mora_delta_weight(M, x.shape[1], w.shape[0], mora_type).to(x.dtype)
    return x @ w.t() + b + xd @ delta.t()


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_low_precision_within_pytorch_error(mora_type, dtype, atol, dropout_p):
    k, d, r_hat = 33, 65, 8
    x, w, b, M, gy = _inputs(k, d, r_hat, dtype, rows=7)
    M = M.float()  # docs/contract.md §3: M stays fp32 next to a 16-bit base
    seed = 99
    y64, gx64, gM64 = _reference(x, w, b, M, gy, mora_type, dropout_p, seed)
    xe, Me = x.clone().requires_grad_(), M.clone().requires_grad_()
    eager = _eager(xe, w, b, Me, mora_type, dropout_p, seed)
    base_gx, base_gM = grads(eager, (xe, Me), gy)
    for design in _designs(mora_type, dropout_p):
        y = tm.mora_forward(x, w, b, M, mora_type, dropout_p, torch.tensor(seed), design=design)
        gx, gM = tm.mora_backward(gy, x, w, M, mora_type, dropout_p, torch.tensor(seed), True, True, design=design)
        assert y.dtype == dtype and gx.dtype == dtype and gM.dtype == torch.float32
        assert_within(y, y64, eager, atol, f"{design} y")
        assert_within(gx, gx64, base_gx, atol, f"{design} grad x")
        assert_within(gM, gM64, base_gM, atol, f"{design} grad M")


@pytest.mark.parametrize("mora_type", [1, 6])
def test_three_d_input_through_the_op(mora_type):
    """x [2, 5, K] through fusedpeft.ops.mora.mora_linear with backend="triton", dropout on."""
    k, d, r_hat = 13, 29, 6
    x = torch.randn(2, 5, k, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w, b = torch.randn(d, k, dtype=torch.float64, device=DEVICE), torch.randn(d, dtype=torch.float64, device=DEVICE)
    M = torch.randn(r_hat, r_hat, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = mora_linear(x, w, b, M, mora_type, 0.25, torch.tensor(5), backend="triton")
    assert y.shape == (2, 5, d)
    x64, M64 = x.detach().clone().requires_grad_(), M.detach().clone().requires_grad_()
    want = ref.mora_linear(x64, w, b, M64, mora_type, 0.25, 5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for got, expected in zip(grads(y, (x, M), g), grads(want, (x64, M64), g)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_only_grad_x_or_only_grad_M():
    x, w, b, M, gy = _inputs(13, 29, 6, torch.float64)
    full = tm.mora_backward(gy, x, w, M, 1, 0.0, None, True, True)
    gx, none_M = tm.mora_backward(gy, x, w, M, 1, 0.0, None, True, False)
    none_x, gM = tm.mora_backward(gy, x, w, M, 1, 0.0, None, False, True)
    assert none_M is None and none_x is None
    torch.testing.assert_close(gx, full[0], rtol=0, atol=0)
    torch.testing.assert_close(gM, full[1], rtol=0, atol=0)


def test_zero_rows():
    x, w, b, M, _ = _inputs(13, 29, 6, torch.float32, rows=0)
    assert tm.mora_forward(x, w, b, M, 6, 0.0, None).shape == (0, 29)
    gx, gM = tm.mora_backward(torch.empty(0, 29, device=DEVICE), x, w, M, 6, 0.0, None, True, True)
    assert gx.shape == (0, 13) and not gM.any()


def test_design_rule(monkeypatch):
    assert tm.choose_design(6, torch.bfloat16, 0.0) == "tile"
    assert tm.choose_design(1, torch.float32, 0.0) == "tile"
    assert tm.choose_design(1, torch.float32, 0.1) == "compressed"
    assert tm.choose_design(3, torch.bfloat16, 0.0) == "compressed"
    monkeypatch.setenv("FUSEDPEFT_MORA_DESIGN", "tile")
    assert tm.choose_design(3, torch.bfloat16, 0.0) == "tile"
    assert tm.choose_design(3, torch.bfloat16, 0.1) == "compressed"  # "tile" cannot apply dropout
    monkeypatch.setenv("FUSEDPEFT_MORA_DESIGN", "compressed")
    assert tm.choose_design(1, torch.float64, 0.0) == "compressed"
    assert tm.choose_design(6, torch.float64, 0.0) == "tile"


def test_rope_tables_cached_fp32():
    cos, sin = tm.rope_tables(6, 3, torch.device(DEVICE))
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (3, 6)
    assert tm.rope_tables(6, 3, torch.device(DEVICE))[0] is cos
    want_cos, want_sin = ref.mora_rope_tables(6, 3, DEVICE)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=0)


def test_saves_x_and_M_only():
    layer = fp.MoRALinear(nn.Linear(30, 50, device=DEVICE), r=2, mora_type=6, dropout=0.1, backend="triton")
    x = torch.randn(10, 30, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.dim() >= 1 and t.shape[0] == 10]
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()


def test_bad_input_is_rejected_before_launch():
    x, w, b, M, _ = _inputs(13, 29, 6, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \[out_features, 13\]"):
        tm.mora_forward(x, w[:, :12], b, M, 1, 0.0, None)
    with pytest.raises(ValueError, match=r"weight must be .* dtype torch.float64"):
        tm.mora_forward(x, w.double(), b, M, 1, 0.0, None)
    with pytest.raises(ValueError, match=r"bias must be \[29\]"):
        tm.mora_forward(x, w, b[:5], M, 1, 0.0, None)
    with pytest.raises(ValueError, match="M must be a square float matrix"):
        tm.mora_forward(x, w, b, M[:, :5], 1, 0.0, None)
    with pytest.raises(ValueError, match=r"mora_type must be one of \(1, 2, 3, 4, 6\), got 5"):
        tm.mora_forward(x, w, b, M, 5, 0.0, None)
    with pytest.raises(ValueError, match="mora_type 6 needs an even r_hat"):
        tm.mora_forward(x, w, b, M[:5, :5], 6, 0.0, None)
    with pytest.raises(ValueError, match="wrap padding of 17 features exceeds in_features=13"):
        tm.mora_forward(x, w, b, torch.randn(30, 30, device=DEVICE), 1, 0.0, None)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        tm.mora_forward(x, w, b, M, 1, 1.0, torch.tensor(1))
    with pytest.raises(ValueError, match="seed .* is required"):
        tm.mora_forward(x, w, b, M, 1, 0.1, None)
    with pytest.raises(ValueError, match="design='tile' for mora_type 2 cannot apply dropout"):
        tm.mora_forward(x, w, b, M, 2, 0.1, torch.tensor(1), design="tile")
    with pytest.raises(ValueError, match="design must be one of"):
        tm.mora_forward(x, w, b, M, 2, 0.0, None, design="fast")
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        tm.mora_forward(x.int(), w.int(), None, M, 1, 0.0, None)
    with pytest.raises(ValueError, match=r"grad_y must be \[9, 29\]"):
        tm.mora_backward(torch.zeros(9, 28, device=DEVICE), x, w, M, 1, 0.0, None, True, True)


@pytest.mark.slow
@pytest.mark.parametrize("mora_type", [1, 6])
def test_torch_compile_fullgraph(mora_type):
    """The op with backend="triton" traces without a graph break and matches eager, gradients too.
    (A layer with a named backend compiles fullgraph as well: resolve_backend runs once at trace
    time, see fusedpeft/backends.py and tests/test_lora_grouped.py::test_group_compiles_fullgraph.)"""
    from fusedpeft.ops.mora import mora_linear_op

    k, d, r_hat = 30, 50, 8
    w, b = torch.randn(d, k, device=DEVICE), torch.randn(d, device=DEVICE)
    M = torch.randn(r_hat, r_hat, device=DEVICE, requires_grad=True)
    x = torch.randn(21, k, device=DEVICE, requires_grad=True)
    seed = torch.tensor(3)

    def f(x, M):
        return mora_linear_op(x, w, b, M, mora_type, 0.1, seed, "triton")

    out = torch.compile(f, fullgraph=True)(x, M)
    x2, M2 = x.detach().clone().requires_grad_(), M.detach().clone().requires_grad_()
    want = f(x2, M2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    for got, expected in zip(grads(out, (x, M), g), grads(want, (x2, M2), g)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU: Llama shapes in bf16 (bench/gpu_check.sh)
# ---------------------------------------------------------------------------------------------
TOKENS = 4096


@pytest.mark.gpu
@pytest.mark.parametrize("k,d,r,mora_type,dropout", [
    (4096, 4096, 8, 6, 0.0), (4096, 4096, 256, 1, 0.0), (4096, 14336, 8, 6, 0.0), (14336, 4096, 8, 6, 0.0),
    (4096, 4096, 8, 6, 0.05), (14336, 4096, 256, 1, 0.05),
])
def test_llama_shapes_bf16(k, d, r, mora_type, dropout):
    r_hat = ref.mora_r_hat(k, d, r, mora_type)
    x, w, _, M, gy = _inputs(k, d, r_hat, torch.bfloat16, rows=TOKENS)
    w, M = w / k**0.5, M.float() * 0.02  # docs/contract.md §3: M is fp32 next to a bf16 base
    seed = 1234
    x32, M32 = x.float().requires_grad_(), M.float().requires_grad_()
    y32 = ref.mora_linear(x32, w.float(), None, M32, mora_type, dropout, seed)
    gx32, gM32 = torch.autograd.grad(y32, (x32, M32), gy.float())
    xe, Me = x.clone().requires_grad_(), M.clone().requires_grad_()
    eager = _eager(xe, w, 0.0, Me, mora_type, dropout, seed)
    base_gx, base_gM = grads(eager, (xe, Me), gy)
    s = torch.tensor(seed)
    y = tm.mora_forward(x, w, None, M, mora_type, dropout, s)
    gx, gM = tm.mora_backward(gy, x, w, M, mora_type, dropout, s, True, True)
    assert_within(y, y32, eager, 1e-2, "y")
    assert_within(gx, gx32, base_gx, 1e-2, "grad x")
    assert_within(gM, gM32, base_gM, 1e-2, "grad M")


@pytest.mark.gpu
@pytest.mark.parametrize("mora_type", [1, 2, 3, 4])
def test_fp32_tile_design_at_a_real_shape(mora_type):
    """fp32 without dropout takes design "tile" (W + ΔW tiles): compare with the reference."""
    x, w, b, M, gy = _inputs(2048, 1024, ref.mora_r_hat(2048, 1024, 64, mora_type), torch.float32, rows=512)
    y64, gx64, gM64 = _reference(x, w, b, M, gy, mora_type, 0.0, None)
    y = tm.mora_forward(x, w, b, M, mora_type, 0.0, None)
    gx, gM = tm.mora_backward(gy, x, w, M, mora_type, 0.0, None, True, True)
    for got, want in ((y, y64), (gx, gx64), (gM, gM64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
