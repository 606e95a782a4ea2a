"""MoRALinear on every backend that runs here, against fusedpeft.reference (docs/contract.md §3, §5, §6)."""

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.torch_backend import mora as torch_mora
from helpers import DTYPES, assert_within, grads, runnable

# (k, d, r): d > k and d < k, k divisible by r_hat or not, wrap padding and truncation / tiling.
SHAPES = [(13, 29, 1), (30, 7, 1), (24, 24, 1), (40, 100, 2), (100, 40, 2)]


def make_layer(k, d, r, mora_type, dtype, dropout=0.0, backend="torch", bias=True):
    layer = fp.MoRALinear(nn.Linear(k, d, bias=bias).to(dtype), r=r, mora_type=mora_type, dropout=dropout,
                          backend=backend)
    with torch.no_grad():
        layer.M.normal_(0, 0.5)  # M starts at zero; make the adapter path visible
    return layer


def run_with_seed(layer, x):
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    return y, int(ref.new_dropout_seed())


def eager_same_dtype(x, layer, p, seed):
    """y = base(x) + dropout(x) @ ΔW^T in x's dtype: the precision baseline."""
    x2 = x.reshape(-1, x.shape[-1])
    if p:
        x2 = x2 * ref.dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p).to(x.dtype) / (1 - p)
    delta = ref.mora_delta_weight(layer.M, layer.in_features, layer.out_features, layer.mora_type).to(x.dtype)
    return layer.base_layer(x) + (x2 @ delta.t()).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("backend", runnable("mora"))
@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k,d,r", SHAPES)
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("dropout,rows", [(0.0, (3, 5)), (0.0, (70,)), (0.3, (9,))])
def test_matches_reference(backend, mora_type, k, d, r, dtype, atol, dropout, rows):
    layer = make_layer(k, d, r, mora_type, dtype, dropout, backend)
    x = torch.randn(*rows, k, dtype=dtype, requires_grad=True)
    y, seed = run_with_seed(layer, x)
    x64 = x.detach().double().requires_grad_()
    M64 = layer.M.detach().double().requires_grad_()
    base = layer.base_layer
    y64 = ref.mora_linear(x64, base.weight.double(), base.bias.double(), M64, mora_type, dropout, seed)
    base_y = eager_same_dtype(x, layer, dropout, seed)
    assert y.dtype == dtype
    assert_within(y, y64, base_y, atol, "y")
    g = torch.randn_like(y64)
    got = grads(y, (x, layer.M), g.to(dtype))
    want = grads(y64, (x64, M64), g)
    baseline = grads(base_y, (x, layer.M), g.to(dtype))
    assert_within(got[0], want[0], baseline[0], atol, "grad x")
    assert_within(got[1], want[1], baseline[1], atol, "grad M")


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k,d,r", SHAPES)
def test_forward_equals_base_plus_delta_weight(mora_type, k, d, r):
    layer = make_layer(k, d, r, mora_type, torch.float64)
    x = torch.randn(2, 6, k, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight().t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), ref.mora_delta_weight(layer.M, k, d, mora_type))


@pytest.mark.parametrize("mora_type", [1, 6])
def test_both_torch_strategies_agree(mora_type):
    w, M = torch.randn(29, 13, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    x, g = torch.randn(5, 13, dtype=torch.float64), torch.randn(5, 29, dtype=torch.float64)
    outs = {s: torch_mora.mora_forward(x, w, None, M, mora_type, 0.0, None, strategy=s) for s in ("merged", "explicit")}
    torch.testing.assert_close(outs["merged"], outs["explicit"])
    back = {s: torch_mora.mora_backward(g, x, w, M, mora_type, 0.0, None, True, True, strategy=s)
            for s in ("merged", "explicit")}
    for a, b in zip(back["merged"], back["explicit"]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("k,d,r,mora_type,r_hat", [
    (4096, 4096, 8, 6, 256), (4096, 4096, 256, 1, 1448), (4096, 1024, 256, 6, 1144), (4096, 1024, 256, 1, 1145),
    (768, 768, 8, 1, 111), (768, 768, 8, 6, 110), (4096, 11008, 8, 1, 348),
])
def test_r_hat(k, d, r, mora_type, r_hat):
    assert ref.mora_r_hat(k, d, r, mora_type) == r_hat
    layer = fp.MoRALinear(nn.Linear(k, d, bias=False, device="meta"), r=r, mora_type=mora_type)
    assert layer.r_hat == r_hat and layer.M.shape == (r_hat, r_hat)


def test_saves_x_and_M_only():
    n, k, d = 10, 30, 50
    layer = make_layer(k, d, 2, 6, torch.float32, dropout=0.1)
    x = torch.randn(n, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.dim() >= 1 and t.shape[0] == n]
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()


def test_state_dict_and_init():
    layer = fp.MoRALinear(nn.Linear(20, 30).to(torch.bfloat16), r=2, mora_type=6)
    assert set(layer.state_dict()) == {"M", "base_layer.weight", "base_layer.bias"}
    assert layer.M.dtype == torch.float32 and not layer.M.any()
    x = torch.randn(3, 20, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # ΔW = 0 at initialisation
    assert not layer.base_layer.weight.requires_grad


def test_merge_unmerge_round_trip():
    layer = make_layer(30, 7, 1, 6, torch.float64)
    x = torch.randn(4, 30, dtype=torch.float64)
    w0, y = layer.base_layer.weight.detach().clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_bad_input():
    with pytest.raises(ValueError, match=r"mora_type must be one of \(1, 2, 3, 4, 6\), got 5"):
        fp.MoRALinear(nn.Linear(8, 8), mora_type=5)
    # k = 3, d = 40, r = 2: r_hat = round(sqrt(86)) = 9 needs a wrap padding of 6 > 3 features
    with pytest.raises(ValueError, match="wrap padding of 6 features would exceed in_features"):
        fp.MoRALinear(nn.Linear(3, 40), r=2, mora_type=1)
    fp.MoRALinear(nn.Linear(3, 40), r=2, mora_type=2)  # contiguous groups need no padding
    with pytest.raises(ValueError, match="r must be a positive integer, got -1"):
        fp.MoRALinear(nn.Linear(8, 8), r=-1)
    with pytest.raises(ValueError, match="dropout"):
        fp.MoRALinear(nn.Linear(8, 8), dropout=1.5)
    layer = fp.MoRALinear(nn.Linear(8, 8), r=1)
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(2, 9))
