"""The Triton LoRA kernels (fusedpeft/kernels/lora.py) against fusedpeft.reference.

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py), several ms per program instance,
so shapes stay tiny; the interpreter tiles are 64 wide, so 65 / 70 / 130 cross tile edges (130
takes three K steps) and r = 130 takes two 128-wide rank chunks. The @pytest.mark.gpu tests run
Llama-sized layers in bf16 on a GPU (bench/gpu_check.sh). LoRALinear's own parity tests
(tests/test_lora_layer.py) and the op checks (tests/test_ops.py: opcheck, float64 gradcheck)
run this backend too.
"""

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.kernels import lora as kl
from helpers import assert_within, grads

pytestmark = pytest.mark.skipif(kl.unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                                is not None, reason="Triton kernels cannot run here")

SEED = 0x5DEECE66D2F1A3B7  # above 2**32: both Philox key words matter


def _inputs(n, k, d, r, dtype, bias, device="cpu", adapter_dtype=torch.float32):
    x = torch.randn(n, k, dtype=dtype, device=device)
    weight = (torch.randn(d, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(d, device=device).to(dtype) if bias else None
    A = torch.randn(r, k, dtype=adapter_dtype, device=device) / k**0.5
    B = torch.randn(d, r, dtype=adapter_dtype, device=device)
    return x, weight, b, A, B


def _same_dtype_baseline(x, weight, b, A, B, scaling, p, seed):
    """Plain PyTorch autograd in x's dtype with the docs/contract.md §5 mask: the precision yardstick."""
    xd = x
    if p:
        xd = x * ref.dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device).to(x.dtype) / (1 - p)
    y = x @ weight.t() + scaling * (xd @ A.to(x.dtype).t()) @ B.to(x.dtype).t()
    return y if b is None else y + b


def _check_layer_math(n, k, d, r, dtype, atol, bias, p, device="cpu", scaling=0.75):
    """Forward and all three gradients of the backend functions against the float64 reference."""
    x, weight, b, A, B = _inputs(n, k, d, r, dtype, bias, device)
    seed = torch.tensor(SEED) if p else None
    y, S = kl.lora_forward(x, weight, b, A, B, scaling, p, seed)
    assert y.dtype == dtype and S.dtype == dtype and S.shape == (n, r)
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A, B))
    y64 = ref.lora_linear(x64, weight.double(), None if b is None else b.double(), A64, B64, scaling, p, SEED)
    xb, Ab, Bb = (t.clone().requires_grad_() for t in (x, A, B))
    base = _same_dtype_baseline(xb, weight, b, Ab, Bb, scaling, p, SEED)
    assert_within(y, y64, base, atol, "y")
    S64 = ref.dropout(x.double(), p, SEED) @ A.double().t()
    assert_within(S, S64, ref.dropout(x, p, SEED) @ A.to(dtype).t(), atol, "S")
    g = torch.randn(n, d, dtype=torch.float64, device=device)
    got = kl.lora_backward(g.to(dtype), x, weight, A, B, S, scaling, p, seed, True, True, True)
    assert [t.dtype for t in got] == [dtype, A.dtype, B.dtype]
    for name, gt, want, yard in zip("xAB", got, grads(y64, (x64, A64, B64), g), grads(base, (xb, Ab, Bb), g.to(dtype))):
        assert_within(gt, want, yard, atol, f"grad {name}")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,k,d,r", [(7, 33, 65, 1), (7, 33, 130, 3), (70, 130, 20, 16)])
def test_forward_and_gradients_match_reference(n, k, d, r, dtype, atol, p, bias):
    _check_layer_math(n, k, d, r, dtype, atol, bias, p)


@pytest.mark.parametrize("r", [100, 130])
def test_large_ranks(r):
    """Rank chunks: the thin kernels pad r = 100 to one 128-wide chunk and add a program axis for
    r = 130 (two chunks); the GEMMs loop over 32-wide chunks (4 and 5)."""
    _check_layer_math(5, 20, 18, r, torch.float32, 1e-5, True, 0.2)


def test_dropout_mask_is_the_reference_mask():
    """With A picking 16 columns of x (in two different column tiles), S = dropout(x)[:, cols]:
    its zeros are the dropped elements, which must be exactly docs/contract.md §5's mask (counter m K + j)."""
    n, k, p = 70, 130, 0.4
    cols = list(range(8)) + list(range(120, 128))
    x = torch.randn(n, k).abs() + 0.1
    A = torch.eye(k)[cols]
    _, S = kl.lora_forward(x, torch.zeros(3, k), None, A, torch.zeros(3, 16), 1.0, p, torch.tensor(SEED))
    keep = ref.dropout_keep_mask(SEED, n, k, p)[:, cols]
    assert torch.equal(S != 0, keep)
    torch.testing.assert_close(S[keep], (x[:, cols] / (1 - p))[keep], rtol=1e-6, atol=0)
    assert 0.3 < 1 - keep.float().mean().item() < 0.5


def test_unneeded_gradients_are_not_computed():
    x, weight, b, A, B = _inputs(6, 20, 12, 2, torch.float32, True)
    _, S = kl.lora_forward(x, weight, b, A, B, 0.5, 0.0, None)
    g = torch.randn(6, 12)
    full = kl.lora_backward(g, x, weight, A, B, S, 0.5, 0.0, None, True, True, True)
    for need in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        got = kl.lora_backward(g, x, weight, A, B, S, 0.5, 0.0, None, *need)
        for wanted, value, expected in zip(need, got, full):
            assert (value is None) != wanted
            if wanted:
                torch.testing.assert_close(value, expected, rtol=0, atol=0)


def _triton_layer(k, d, r, dtype=torch.float32, dropout=0.0, bias=True):
    layer = fp.LoRALinear(nn.Linear(k, d, bias=bias).to(dtype), r=r, alpha=3.0, dropout=dropout, backend="triton")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _reference_grads(layer, x, p, seed, grad_y):
    x64 = x.detach().double().requires_grad_()
    A64, B64 = (w.detach().double().requires_grad_() for w in (layer.lora_A.weight, layer.lora_B.weight))
    bias = layer.base_layer.bias
    y64 = ref.lora_linear(x64, layer.base_layer.weight.double(), None if bias is None else bias.double(), A64, B64,
                          layer.scaling, p, seed)
    return y64, grads(y64, (x64, A64, B64), grad_y)


def test_3d_noncontiguous_input_and_stride0_gradient():
    """x [2, 5, 33] as a transposed view; y.sum() gives an expanded (stride 0) gradient."""
    layer = _triton_layer(33, 20, 3, dropout=0.25)
    x = torch.randn(2, 33, 5).transpose(1, 2).requires_grad_()
    assert not x.is_contiguous()
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    y.sum().backward()
    y64, want = _reference_grads(layer, x, 0.25, seed, torch.ones(2, 5, 20, dtype=torch.float64))
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, expected in zip((x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad), want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_saves_x_and_S_only():
    n, k, d, r = 6, 24, 40, 4
    layer = _triton_layer(k, d, r, dropout=0.1)
    x = torch.randn(n, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = sorted(tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] == n)
    assert activations == [(n, r), (n, k)]


@pytest.mark.parametrize("r,block", [(1, 16), (16, 16), (17, 32), (64, 64), (128, 128), (300, 128)])
def test_rank_block(r, block):
    assert kl.rank_block(r) == block


def test_bad_inputs_raise_before_launching():
    x, weight, b, A, B = _inputs(4, 8, 6, 2, torch.float32, True)
    with pytest.raises(TypeError, match=r"x has dtype torch.int32; the kernels support"):
        kl.lora_forward(x.int(), weight.int(), b, A, B, 1.0, 0.0, None)
    with pytest.raises(TypeError, match=r"weight\[0\] has dtype torch.float16 but x has torch.float32"):
        kl.lora_forward(x, weight.half(), b, A, B, 1.0, 0.0, None)
    with pytest.raises(ValueError, match=r"lora_A\[0\] is on meta but x is on cpu"):
        kl.lora_forward(x, weight, b, A.to("meta"), B, 1.0, 0.0, None)
    assert "need CUDA tensors (got meta)" in kl.unavailable_reason(torch.device("meta"))


@pytest.mark.slow
def test_op_compiles_fullgraph_with_triton_backend():
    """fusedpeft::lora_linear with backend="triton" under torch.compile(fullgraph=True): forward
    and backward through the registered fake and autograd, same numbers as eager."""
    from fusedpeft.ops.lora import lora_linear_op

    x, weight, b, A, B = _inputs(10, 24, 40, 4, torch.float32, True)
    seed = torch.tensor(SEED)

    def f(x, A, B):
        return lora_linear_op(x, weight, b, A, B, 0.5, 0.2, seed, "triton")[0]

    inputs = [t.clone().requires_grad_() for t in (x, A, B)]
    eager_inputs = [t.clone().requires_grad_() for t in (x, A, B)]
    y = torch.compile(f, fullgraph=True)(*inputs)
    want = f(*eager_inputs)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    for got, expected in zip(grads(y, inputs, g), grads(want, eager_inputs, g)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# GPU: Llama-sized layers in bf16 (bench/gpu_check.sh)
# --------------------------------------------------------------------------------------------

LLAMA_SHAPES = [(4096, 4096, 4096, 16), (2048, 4096, 11008, 64), (2048, 11008, 4096, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("n,k,d,r", LLAMA_SHAPES)
def test_llama_shapes_bf16_on_gpu(n, k, d, r, p):
    """bf16 forward and gradients within 2x plain bf16 PyTorch's error (fp32 reference) + 1e-2."""
    x, weight, b, A, B = _inputs(n, k, d, r, torch.bfloat16, False, device="cuda")
    seed = torch.tensor(SEED) if p else None
    y, S = kl.lora_forward(x, weight, b, A, B, 2.0, p, seed)
    xf, Af, Bf = (t.float().requires_grad_() for t in (x, A, B))
    yf = ref.lora_linear(xf, weight.float(), None, Af, Bf, 2.0, p, SEED)  # fp32 on the GPU: the reference
    xb, Ab, Bb = (t.clone().requires_grad_() for t in (x, A, B))
    base = _same_dtype_baseline(xb, weight, None, Ab, Bb, 2.0, p, SEED)
    assert_within(y, yf.detach(), base.detach(), 1e-2, "y")
    g = torch.randn(n, d, device="cuda")
    got = kl.lora_backward(g.bfloat16(), x, weight, A, B, S, 2.0, p, seed, True, True, True)
    for name, gt, want, yard in zip("xAB", got, grads(yf, (xf, Af, Bf), g), grads(base, (xb, Ab, Bb), g.bfloat16())):
        assert_within(gt, want, yard, 1e-2, f"grad {name}")
