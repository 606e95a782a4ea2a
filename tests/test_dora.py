"""LoRALinear(use_dora=True) (docs/contract.md §8) against PEFT's DoRA layer on CPU, every CPU backend.

PEFT (``get_peft_model`` with ``use_dora=True``) is the oracle for the forward and every gradient
(x, A, B, the magnitude) with dropout 0; with dropout > 0, PEFT's own DoRA formula
(``DoraLinearLayer.forward`` on the dropped-out x) is evaluated with our docs/contract.md §5 mask.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from torch.library import opcheck

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.fused.lora_grouped import check_group
from fusedpeft.ops.dora import dora_linear_backward_op, dora_linear_op, weight_norm
from dora_helpers import check_output_and_grads, fused_params
from helpers import runnable

BACKENDS = [b for b in runnable("dora") if b != "triton"]
TOLS = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-11, 1e-11)}


class OneLinear(nn.Module):
    def __init__(self, in_f, out_f, bias):
        super().__init__()
        self.proj = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _peft_dora(in_f, out_f, r, alpha, bias, dtype, dropout=0.0):
    model = OneLinear(in_f, out_f, bias).to(dtype)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=dropout,
                                          use_dora=True))
    layer = pm.base_model.model.proj
    with torch.no_grad():  # random A, B and magnitude: PEFT's B = 0 / m = ||W|| would hide bugs
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A.copy_(torch.randn_like(A) / math.sqrt(in_f))
        B.copy_(torch.randn_like(B) * 0.5)
        m = layer.lora_magnitude_vector["default"].weight
        m.mul_(1.0 + 0.3 * torch.rand_like(m))
    return pm, layer


def _fused_from(layer, r, alpha, backend, dropout=0.0):
    fused = fp.LoRALinear(copy.deepcopy(layer.base_layer), r=r, alpha=alpha, dropout=dropout, use_dora=True,
                          backend=backend)
    with torch.no_grad():
        fused.lora_A.weight.copy_(layer.lora_A["default"].weight)
        fused.lora_B.weight.copy_(layer.lora_B["default"].weight)
        fused.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)
    return fused


def _close(actual, expected, dtype):
    rtol, atol = TOLS[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)




SHAPES = [(33, 65, 7, 4), (64, 17, 9, 8), (5, 3, 1, 2)]  # (in, out, tokens, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("in_f,out_f,tokens,r", SHAPES)
@pytest.mark.parametrize("bias,three_d", [(True, False), (False, True), (True, True)], ids=["bias", "3d", "bias3d"])
def test_matches_peft(backend, dtype, in_f, out_f, tokens, r, bias, three_d):
    alpha = 3.0 * r + 1.0
    pm, layer = _peft_dora(in_f, out_f, r, alpha, bias, dtype)
    fused = _fused_from(layer, r, alpha, backend)
    x = torch.randn((2, tokens, in_f) if three_d else (tokens, in_f), dtype=dtype)
    x_p, x_f = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_p, y_f = pm(x_p), fused(x_f)
    assert y_f.shape == y_p.shape and y_f.dtype == dtype
    check_output_and_grads(y_f, y_p, x_f, x_p, fused, layer, lambda a, e: _close(a, e, dtype))
    assert fused.base_layer.weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [True, False])
def test_dropout_matches_peft_formula_with_our_mask(backend, dtype, bias):
    in_f, out_f, tokens, r, p, alpha = 37, 21, 11, 4, 0.3, 8.0
    pm, layer = _peft_dora(in_f, out_f, r, alpha, bias, dtype, dropout=p)
    fused = _fused_from(layer, r, alpha, backend, dropout=p)
    x = torch.randn(2, tokens, in_f, dtype=dtype)
    torch.manual_seed(123)
    seed = int(ref.new_dropout_seed())
    torch.manual_seed(123)
    x_f = x.clone().requires_grad_(True)
    y_f = fused.train()(x_f)
    # PEFT's DoRA branch (DoraLinearLayer.forward with base_result=None: F.linear(x', W)) on x' = our dropout
    x_p = x.clone().requires_grad_(True)
    x_dropped = ref.dropout(x_p, p, seed)
    y_p = layer.base_layer(x_p) + layer.lora_magnitude_vector["default"](
        x_dropped, lora_A=layer.lora_A["default"], lora_B=layer.lora_B["default"], scaling=layer.scaling["default"],
        base_layer=layer.base_layer, base_result=None)
    check_output_and_grads(y_f, y_p, x_f, x_p, fused, layer, lambda a, e: _close(a, e, dtype))
    fused.eval()
    _close(fused(x), pm.eval()(x), dtype)  # eval: dropout off, the base output reused


@pytest.mark.parametrize("shape", [(65, 33, 4), (7, 300, 16), (1, 1, 1), (128, 96, 64)])
def test_factored_norm_equals_direct_norm_fp64(shape):
    out_f, in_f, r = shape
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    A = torch.randn(r, in_f, dtype=torch.float64)
    B = torch.randn(out_f, r, dtype=torch.float64)
    for s in (0.5, 3.0):
        direct = ref.dora_weight_norm(W, A, B, s)
        factored = weight_norm(W, A, B, s)
        assert factored.dtype == torch.float64
        torch.testing.assert_close(factored, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_factored_norm_low_precision_accumulates_in_fp32(dtype):
    W = torch.randn(40, 70).to(dtype)
    A, B = torch.randn(4, 70), torch.randn(40, 4) * 0.1
    n = weight_norm(W, A, B, 2.0)
    assert n.dtype == torch.float32
    torch.testing.assert_close(n, ref.dora_weight_norm(W.double(), A.double(), B.double(), 2.0).float(),
                               rtol=1e-6, atol=1e-6)


def test_initial_magnitude_is_row_norm_and_output_equals_base():
    base = nn.Linear(19, 23)
    layer = fp.LoRALinear(base, r=4, use_dora=True)
    m = layer.lora_magnitude_vector
    assert isinstance(m, nn.Parameter) and m.requires_grad and tuple(m.shape) == (23,)
    torch.testing.assert_close(m.detach(), torch.linalg.vector_norm(base.weight, dim=1))
    x = torch.randn(5, 19)
    torch.testing.assert_close(layer(x), base(x))
    assert "lora_magnitude_vector" in layer.state_dict()
    half = fp.LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2, use_dora=True)
    assert half.lora_magnitude_vector.dtype == torch.float32  # the adapter dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_dtype_tolerance(backend, dtype):
    layer = fp.LoRALinear(nn.Linear(48, 40).to(dtype), r=4, use_dora=True, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.2)
        layer.lora_magnitude_vector.mul_(1.2)
    x = torch.randn(3, 9, 48, dtype=dtype, requires_grad=True)
    y = layer(x)
    args = [layer.base_layer.weight, layer.base_layer.bias, *(t.detach().double().requires_grad_() for t in
                                                                fused_params(layer))]
    x64 = x.detach().double().requires_grad_()
    y64 = ref.dora_linear(x64, args[0].double(), args[1].double(), args[2], args[3], args[4], layer.scaling)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y64)
    y.backward(g.to(dtype))
    y64.backward(g)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=3e-2, atol=3e-2)
    for mine, want in zip(fused_params(layer), args[2:]):
        scale = want.grad.abs().max().item()
        assert (mine.grad.double() - want.grad).abs().max().item() <= 3e-2 * scale


def test_zero_magnitude_rows_get_the_right_gradient():
    """g = m / n = 0 on a row: the output there is 0 (plus bias) and holds no trace of u; the
    magnitude gradient must come from u recomputed for that row."""
    layer = fp.LoRALinear(nn.Linear(12, 9).double(), r=3, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector[[2, 5]] = 0.0
    m64 = layer.lora_magnitude_vector.detach().clone().requires_grad_()
    x = torch.randn(6, 12, dtype=torch.float64)
    g = torch.randn(6, 9, dtype=torch.float64)
    layer(x).backward(g)
    w = layer.base_layer
    ref.dora_linear(x, w.weight, w.bias, layer.lora_A.weight, layer.lora_B.weight, m64, layer.scaling).backward(g)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, m64.grad, rtol=1e-12, atol=1e-12)
    assert layer.lora_magnitude_vector.grad[2].abs() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [True, False])
def test_merged_form_matches_peft(backend, dtype, bias):
    """fp32 / fp64 with enough rows: y = x W''^T + bias and dX = dY W'', W'' = g (W + s B A)
    (torch_backend/dora.py); a zero magnitude row included."""
    in_f, out_f, r, alpha = 40, 23, 4, 9.0
    pm, layer = _peft_dora(in_f, out_f, r, alpha, bias, dtype)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[3] = 0.0
    fused = _fused_from(layer, r, alpha, backend)
    x = torch.randn(2, 40, in_f, dtype=dtype)
    from fusedpeft.host.dora import merged_strategy

    assert merged_strategy(x.reshape(-1, in_f), fused.base_layer.weight, 0.0)
    x_p, x_f = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_p, y_f = pm(x_p), fused(x_f)
    check_output_and_grads(y_f, y_p, x_f, x_p, fused, layer, lambda a, e: _close(a, e, dtype))
    assert fused.lora_magnitude_vector.grad[3].abs() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge_and_merge_adapters_match_peft(dtype):
    r, alpha = 4, 9.0
    pm, layer = _peft_dora(33, 17, r, alpha, True, dtype)
    fused = _fused_from(layer, r, alpha, None)
    w0 = fused.base_layer.weight.detach().clone()
    x = torch.randn(5, 33, dtype=dtype)
    y = fused(x)
    expected_w = ref.dora_merged_weight(w0, *fused_params(fused), fused.scaling).to(dtype)
    _close(w0 + fused.delta_weight(), expected_w, dtype)
    fused.merge()
    assert fused.merged
    _close(fused.base_layer.weight, expected_w, dtype)
    _close(fused(x), y, dtype)
    layer.merge()
    _close(fused.base_layer.weight, layer.base_layer.weight, dtype)
    fused.unmerge()
    assert not fused.merged
    _close(fused.base_layer.weight, w0, dtype)
    _close(fused(x), y, dtype)
    with pytest.warns(UserWarning, match="not merged"):
        fused.unmerge()
    plain = fp.merge_adapters(fused)
    assert type(plain) is nn.Linear
    _close(plain(x), y, dtype)


def test_weight_norm_cache_follows_the_base_weight():
    layer = fp.LoRALinear(nn.Linear(16, 12), r=2, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16)
    layer(x)
    cached = layer._dora_cache.value
    layer(x)
    assert layer._dora_cache.value is cached  # same weight: reused
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # an in-place change (load_state_dict, folding) bumps the version
    y = layer(x)
    assert layer._dora_cache.value is not cached
    w = layer.base_layer
    torch.testing.assert_close(y, ref.dora_linear(x, w.weight, w.bias, *fused_params(layer), layer.scaling))
    layer.base_layer.load_state_dict({"weight": torch.randn(12, 16), "bias": torch.zeros(12)})
    y = layer(x)
    torch.testing.assert_close(y, ref.dora_linear(x, w.weight, w.bias, *fused_params(layer), layer.scaling))


def test_bad_input():
    with pytest.raises(TypeError, match="use_dora=True needs base to be a torch.nn.Linear, got an embedding"):
        fp.LoRALinear(nn.Embedding(10, 4), r=2, use_dora=True)
    with pytest.raises(TypeError, match="use_dora=True needs base to be a torch.nn.Linear, got a convolution"):
        fp.LoRALinear(nn.Conv2d(3, 4, 3), r=2, use_dora=True)
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(TypeError, match="Conv1D.*fan_in_fan_out=True is not supported"):
        fp.LoRALinear(Conv1D(8, 4), r=2, use_dora=True)
    with pytest.raises(TypeError, match="use_dora must be True or False, got 'yes'"):
        fp.LoRALinear(nn.Linear(4, 4), r=2, use_dora="yes")
    gpt2_like = nn.Module()
    gpt2_like.c_attn = Conv1D(8, 4)
    with pytest.raises(TypeError, match="not a torch.nn.Linear"):
        fp.apply_lora(gpt2_like, target_modules=["c_attn"], use_dora=True)
    layer = fp.LoRALinear(nn.Linear(4, 4), r=2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        check_group([layer, fp.LoRALinear(nn.Linear(4, 4), r=2)])
    bnb = pytest.importorskip("bitsandbytes")  # quantized bases take DoRA (tests/test_dora_qlora.py)
    eight_bit = fp.LoRALinear(bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False).to("cpu"), r=2, use_dora=True)
    assert eight_bit.lora_magnitude_vector.shape == (4,)
    with pytest.raises(ValueError, match="never quantized"):  # a 4-bit layer never moved to a device
        fp.LoRALinear(bnb.nn.Linear4bit(8, 4), r=2, use_dora=True)


def test_apply_lora_use_dora():
    model = nn.Sequential(OneLinear(6, 8, True), nn.Tanh(), OneLinear(8, 3, False))
    x = torch.randn(4, 6)
    before = model(x)
    fp.apply_lora(model, target_modules=["proj"], r=2, use_dora=True)
    assert all(isinstance(m, fp.LoRALinear) and m.use_dora for m in (model[0].proj, model[2].proj))
    torch.testing.assert_close(model(x), before)  # B = 0 and m = ||W||: the base model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{i}.proj.{k}" for i in (0, 2) for k in
                               ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))


def _op_inputs(dropout_p, bias=True):
    x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(65, 33, dtype=torch.float64)
    b = torch.randn(65, dtype=torch.float64) if bias else None
    A = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    B = torch.randn(65, 4, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(65, dtype=torch.float64) + 0.5).requires_grad_()
    seed = torch.tensor(20251203) if dropout_p else None
    return x, weight, b, A, B, g, 0.75, dropout_p, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_op_opcheck_and_gradcheck(backend, dropout_p, bias):
    args = _op_inputs(dropout_p, bias)
    opcheck(dora_linear_op, (*args, backend))
    x, weight, b, A, B, g, scaling, p, seed = args
    y, S, V = dora_linear_op(x.detach(), weight, b, A.detach(), B.detach(), g.detach(), scaling, p, seed, backend)
    saved = V if p > 0 else y
    grad_y = torch.randn_like(y)
    opcheck(dora_linear_backward_op, (grad_y, x.detach(), weight, b, A.detach(), B.detach(), g.detach(), saved, S,
                                      scaling, p, seed, True, False, True, True, backend))
    torch.autograd.gradcheck(lambda x, A, B, g: dora_linear_op(x, weight, b, A, B, g, scaling, p, seed, backend)[0],
                             (x, A, B, g))


@pytest.mark.slow
def test_compiles_fullgraph():
    layer = fp.LoRALinear(nn.Linear(24, 40), r=4, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = torch.compile(layer, fullgraph=True)(x)
    m_grad = None
    y.sum().backward()
    m_grad, layer.lora_magnitude_vector.grad = layer.lora_magnitude_vector.grad, None
    want = layer(x2)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    want.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m_grad, layer.lora_magnitude_vector.grad, rtol=1e-5, atol=1e-5)
    layer.dropout = 0.1
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()


@pytest.mark.parametrize("kernel", ["dora_backward_p0", "dora_merged_weight"])
def test_cpu_backend_needs_an_extension_with_the_dora_kernels(monkeypatch, request, kernel):
    """An extension built from older sources (without one of the DoRA kernels) makes only the dora
    family's cpu backend unavailable, with the reason; automatic choice then falls to torch."""
    pytest.importorskip("fusedpeft._C")
    from fusedpeft import backends, cpp_backend
    from fusedpeft.cpp_backend import dora as cpp_dora

    real = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda name, key: False if name.endswith(kernel) else real(name, key))
    cpp_backend.has_kernel.cache_clear()  # as in a fresh process that loads the older extension
    request.addfinalizer(cpp_backend.has_kernel.cache_clear)
    assert f"no CPU {kernel} kernel" in cpp_dora.unavailable_reason(torch.device("cpu"))
    assert backends.unavailable_reason("cpu", "lora", torch.device("cpu")) is None
    assert backends.resolve_backend("dora", None, torch.device("cpu")) == "torch"
