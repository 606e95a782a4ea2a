"""LoRALinear on every backend that runs here, against fusedpeft.reference (docs/contract.md §2, §5, §6)."""

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from helpers import DTYPES, assert_within, grads, runnable

SHAPES = [((7,), 33, 65, 4), ((2, 5), 17, 9, 3), ((3,), 16, 16, 1)]


def make_layer(k, d, r, dtype, bias=True, dropout=0.0, backend="torch", alpha=6.0):
    base = nn.Linear(k, d, bias=bias).to(dtype)
    layer = fp.LoRALinear(base, r=r, alpha=alpha, dropout=dropout, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # B starts at zero; make the adapter path visible
    return layer


def run_with_seed(layer, x):
    """Forward, and the dropout seed the layer drew (docs/contract.md §5: one draw from the default CPU generator)."""
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    return y, seed


def eager_same_dtype(x, layer, p, seed):
    """Plain PyTorch LoRA in x's dtype with the docs/contract.md §5 mask: the precision baseline."""
    A, B = layer.lora_A.weight.to(x.dtype), layer.lora_B.weight.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if p:
        x2 = x2 * ref.dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p).to(x.dtype) / (1 - p)
    y = layer.base_layer(x) + layer.scaling * (x2 @ A.t() @ B.t()).reshape(*x.shape[:-1], -1)
    return y


@pytest.mark.parametrize("backend", runnable("lora"))
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("lead,k,d,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_reference(backend, dtype, atol, lead, k, d, r, bias, dropout):
    layer = make_layer(k, d, r, dtype, bias, dropout, backend)
    x = torch.randn(*lead, k, dtype=dtype, requires_grad=True)
    y, seed = run_with_seed(layer, x)
    params = (x, layer.lora_A.weight, layer.lora_B.weight)
    x64 = x.detach().double().requires_grad_()
    A64 = layer.lora_A.weight.detach().double().requires_grad_()
    B64 = layer.lora_B.weight.detach().double().requires_grad_()
    bias64 = None if not bias else layer.base_layer.bias.double()
    y64 = ref.lora_linear(x64, layer.base_layer.weight.double(), bias64, A64, B64, layer.scaling, dropout, seed)
    base_y = eager_same_dtype(x, layer, dropout, seed)
    assert y.dtype == dtype
    assert_within(y, y64, base_y, atol, "y")
    g = torch.randn_like(y64)
    for name, got, want, base in zip(("x", "A", "B"), grads(y, params, g.to(dtype)), grads(y64, (x64, A64, B64), g),
                                     grads(base_y, params, g.to(dtype))):
        assert_within(got, want, base, atol, f"grad {name}")
    assert layer.base_layer.weight.grad is None


def test_noncontiguous_input_and_stride0_grad():
    layer = make_layer(12, 10, 3, torch.float32, dropout=0.2)
    x = torch.randn(12, 6).t().requires_grad_()  # [6, 12], not contiguous
    y, seed = run_with_seed(layer, x)
    y.sum().backward()  # grad_y is an expanded (stride 0) tensor
    x64 = x.detach().double().requires_grad_()
    y64 = ref.lora_linear(x64, layer.base_layer.weight.double(), layer.base_layer.bias.double(),
                          layer.lora_A.weight.double(), layer.lora_B.weight.double(), layer.scaling, 0.2, seed)
    y64.sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_dropout_mask_differs_per_forward_and_is_off_in_eval():
    layer = make_layer(16, 8, 4, torch.float32, dropout=0.5)
    x = torch.randn(4, 16)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), eager_same_dtype(x, layer, 0.0, None))


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in runnable("lora")])
def test_saves_x_S_and_at_most_the_mask(backend):
    """Saved for backward: x itself (no dropped copy), S [N, r], and on the torch backend on CPU the
    dropout mask as bool [N, K] (host.lora.stores_keep_mask); nothing of size N x out_features. The
    saved mask is the one the forward used: the gradients equal those of a backward that
    regenerates it from the seed."""
    n, k, d, r = 8, 24, 40, 4
    layer = make_layer(k, d, r, torch.float32, dropout=0.1, backend=backend)
    x = torch.randn(n, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, seed = run_with_seed(layer, x)
    activations = [t for t in saved if t.dim() == 2 and t.shape[0] == n]
    masks = [(n, k)] if backend == "torch" else []
    assert sorted(tuple(t.shape) for t in activations) == sorted([(n, r), (n, k)] + masks)
    x_saved = next(t for t in activations if t.shape == (n, k) and t.dtype == x.dtype)
    assert x_saved.data_ptr() == x.data_ptr()
    assert all(t.dtype == torch.bool for t in activations if t.shape == (n, k) and t is not x_saved)
    if backend != "torch":
        return
    grad_y = torch.randn(n, d)
    got = torch.autograd.grad(y, (x, layer.lora_A.weight, layer.lora_B.weight), grad_y)
    from fusedpeft.torch_backend import lora as torch_lora

    S = next(t for t in activations if t.shape == (n, r))
    regenerated = torch_lora.lora_backward(grad_y, x.detach(), layer.base_layer.weight, layer.lora_A.weight,
                                           layer.lora_B.weight, S, layer.scaling, 0.1, seed, True, True, True)
    for a, b in zip(got, regenerated):
        torch.testing.assert_close(a, b)


def test_adapter_dtype_follows_peft():
    layer = fp.LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert fp.LoRALinear(nn.Linear(8, 8).double(), r=2).lora_A.weight.dtype == torch.float64


def test_autocast_matches_reference_in_bf16():
    layer = make_layer(32, 24, 4, torch.float32, backend=None)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    want = ref.lora_linear(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double(),
                           layer.lora_A.weight.double(), layer.lora_B.weight.double(), layer.scaling)
    torch.testing.assert_close(y.double(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("use_rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(use_rslora, expected):
    assert fp.LoRALinear(nn.Linear(4, 4), r=4, alpha=16, use_rslora=use_rslora).scaling == expected


def test_merge_unmerge_round_trip():
    layer = make_layer(20, 14, 3, torch.float64)
    x = torch.randn(6, 20, dtype=torch.float64)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    fp.merge(layer)
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)
    torch.testing.assert_close(layer(x), y)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    fp.unmerge(layer)
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0)
    torch.testing.assert_close(fp.delta_weight(layer), layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"r": 0}, ValueError, "r must be a positive integer, got 0"),
    ({"r": 2.5}, ValueError, "r must be a positive integer"),
    ({"dropout": 1.0}, ValueError, r"dropout must be a float in \[0, 1\)"),
    ({"dropout": -0.1}, ValueError, "dropout"),
    ({"init": "zeros"}, ValueError, "init='zeros' is not allowed"),
    ({"init": "pissa"}, ValueError, "init must be one of"),
    ({"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
    ({"backend": "tpu"}, ValueError, "backend='tpu' is not a fusedpeft backend"),
])
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        fp.LoRALinear(nn.Linear(4, 4), **kwargs)


def test_bad_base_and_inputs():
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear, got Conv1d"):
        fp.LoRALinear(nn.Conv1d(4, 4, 1))
    layer = fp.LoRALinear(nn.Linear(4, 6), r=2)
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"x has shape \(3, 5\).*in_features=4"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the base layer's weight is torch.float32"):
        layer(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(3, 4, dtype=torch.long))
    assert torch.equal(layer.base_layer.weight, w0)


def test_forced_unavailable_backend_raises():
    layer = fp.LoRALinear(nn.Linear(4, 4), r=2, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run fusedpeft lora ops on cpu tensors"):
        layer(torch.randn(2, 4))
