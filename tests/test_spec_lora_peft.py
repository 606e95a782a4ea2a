"""Independent spec tests for LoRALinear (docs/contract.md §2, §5 dropout, §6 bad input) against HF PEFT.

PEFT's LoRA layer (``peft.get_peft_model`` on a tiny module) is the oracle for the forward,
the gradients and the initialisation family; ``fusedpeft.reference`` only supplies the docs/contract.md §5
dropout generator (``new_dropout_seed``, ``dropout_keep_mask``), and the dropout tests build
the expected output with an explicit eager formula.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import fusedpeft as fp
from fusedpeft import reference as ref

# (dtype, rtol, atol): both sides compute in the same dtype, only the operation order differs
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-11, 1e-11)]
TOL_IDS = ["fp32", "fp64"]


class OneLinear(nn.Module):
    def __init__(self, in_f, out_f, bias):
        super().__init__()
        self.proj = nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.proj(x)


class TwoLinears(nn.Module):
    def __init__(self, in_f, hid, out_f, bias):
        super().__init__()
        self.up = nn.Linear(in_f, hid, bias=bias)
        self.down = nn.Linear(hid, out_f, bias=bias)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _peft(model, targets, r, alpha, use_rslora=False, init=True):
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora,
                     init_lora_weights=init)
    return get_peft_model(model, cfg)


def _randomise_(peft_layer):
    """Random non-zero A and B (PEFT's B starts at zero, which would hide any bug in B's path)."""
    with torch.no_grad():
        A, B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        A.copy_(torch.randn_like(A) / math.sqrt(A.shape[1]))
        B.copy_(torch.randn_like(B) * 0.5)


def _fused_from(peft_layer, r, alpha, use_rslora=False):
    fused = fp.LoRALinear(copy.deepcopy(peft_layer.base_layer), r=r, alpha=alpha, dropout=0.0, use_rslora=use_rslora)
    with torch.no_grad():
        fused.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        fused.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    return fused


def _close(actual, expected, rtol, atol):
    """Elementwise rtol; atol scaled by the largest expected magnitude (gradients reach ~1e2 here and
    have entries near zero from cancellation, where only an absolute bound is meaningful)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


# --------------------------------------------------------------------------------------------
# Forward and gradients vs PEFT
# --------------------------------------------------------------------------------------------

SHAPES = [(33, 65, 7, 4), (16, 8, 5, 2), (64, 64, 9, 8)]  # (in, out, tokens, r)


@pytest.mark.parametrize("dtype,rtol,atol", TOLS, ids=TOL_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("in_f,out_f,tokens,r", SHAPES)
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_matches_peft(in_f, out_f, tokens, r, use_rslora, bias, dtype, rtol, atol, three_d):
    alpha = 3.0 * r + 1.0  # scaling != 1 so a missing / wrong scaling fails
    model = OneLinear(in_f, out_f, bias).to(dtype)
    pm = _peft(model, ["proj"], r, alpha, use_rslora)
    peft_layer = pm.base_model.model.proj
    _randomise_(peft_layer)
    fused = _fused_from(peft_layer, r, alpha, use_rslora)

    expected_scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert peft_layer.scaling["default"] == pytest.approx(expected_scaling)
    assert fused.scaling == pytest.approx(expected_scaling)
    assert fused.r == r

    shape = (2, tokens, in_f) if three_d else (tokens, in_f)
    x = torch.randn(shape, dtype=dtype)
    x_p = x.clone().requires_grad_(True)
    x_f = x.clone().requires_grad_(True)
    y_p = pm(x_p)
    y_f = fused(x_f)
    assert y_f.shape == y_p.shape and y_f.dtype == dtype
    _close(y_f, y_p, rtol, atol)

    g = torch.randn_like(y_p)
    y_p.backward(g)
    y_f.backward(g)
    _close(x_f.grad, x_p.grad, rtol, atol)
    _close(fused.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, rtol, atol)
    _close(fused.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, rtol, atol)
    assert fused.base_layer.weight.grad is None
    if bias:
        assert fused.base_layer.bias.grad is None


@pytest.mark.parametrize("dtype,rtol,atol", TOLS, ids=TOL_IDS)
def test_two_layer_model_matches_peft(dtype, rtol, atol):
    r, alpha = 4, 16.0
    model = TwoLinears(33, 65, 17, bias=True).to(dtype)
    pm = _peft(model, ["up", "down"], r, alpha)
    inner = pm.base_model.model
    for layer in (inner.up, inner.down):
        _randomise_(layer)
    fused_up, fused_down = _fused_from(inner.up, r, alpha), _fused_from(inner.down, r, alpha)

    x = torch.randn(3, 7, 33, dtype=dtype)
    x_p, x_f = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_p = pm(x_p)
    y_f = fused_down(torch.tanh(fused_up(x_f)))
    _close(y_f, y_p, rtol, atol)
    g = torch.randn_like(y_p)
    y_p.backward(g)
    y_f.backward(g)
    _close(x_f.grad, x_p.grad, rtol, atol)
    for fl, pl in ((fused_up, inner.up), (fused_down, inner.down)):
        _close(fl.lora_A.weight.grad, pl.lora_A["default"].weight.grad, rtol, atol)
        _close(fl.lora_B.weight.grad, pl.lora_B["default"].weight.grad, rtol, atol)


def test_structure_and_shared_frozen_base():
    base = nn.Linear(33, 65)
    layer = fp.LoRALinear(base, r=4, alpha=8.0)
    assert layer.base_layer is base, "the base layer is wrapped, not copied"
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert isinstance(layer.lora_A, nn.Linear) and isinstance(layer.lora_B, nn.Linear)
    assert tuple(layer.lora_A.weight.shape) == (4, 33) and layer.lora_A.bias is None
    assert tuple(layer.lora_B.weight.shape) == (65, 4) and layer.lora_B.bias is None
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert layer.scaling == pytest.approx(2.0) and layer.r == 4
    assert layer.dropout == 0.0
    assert fp.LoRALinear(nn.Linear(8, 8), r=2, dropout=0.25).dropout == pytest.approx(0.25)


def test_adapter_dtype_follows_spec():
    """docs/contract.md §2: adapters float32 next to a 16-bit base weight, else the base dtype."""
    assert fp.LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2).lora_A.weight.dtype == torch.float32
    assert fp.LoRALinear(nn.Linear(8, 8).to(torch.float16), r=2).lora_B.weight.dtype == torch.float32
    assert fp.LoRALinear(nn.Linear(8, 8).to(torch.float64), r=2).lora_A.weight.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Initialisation (PEFT's distribution families)
# --------------------------------------------------------------------------------------------


def test_init_kaiming_matches_peft_family():
    in_f, out_f, r = 256, 96, 16
    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    pm = _peft(OneLinear(in_f, out_f, True), ["proj"], r, 16.0, init=True)
    pA = pm.base_model.model.proj.lora_A["default"].weight.detach()
    fused = fp.LoRALinear(nn.Linear(in_f, out_f), r=r, alpha=16.0)  # default init="kaiming"
    fA = fused.lora_A.weight.detach()
    for A in (pA, fA):  # PEFT's A confirms the expectation; fused's A is under test
        assert A.abs().max() <= bound
        assert A.abs().max() > 0.97 * bound  # 4096 uniform draws
        assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert abs(A.mean().item()) < 4 * bound / math.sqrt(3) / math.sqrt(A.numel())
    assert torch.count_nonzero(fused.lora_B.weight) == 0
    assert torch.count_nonzero(pm.base_model.model.proj.lora_B["default"].weight) == 0
    fused2 = fp.LoRALinear(nn.Linear(in_f, out_f), r=r, alpha=16.0, init="kaiming")
    assert fused2.lora_A.weight.abs().max() <= bound and torch.count_nonzero(fused2.lora_B.weight) == 0


def test_init_gaussian_matches_peft_family():
    in_f, out_f, r = 256, 96, 16
    pm = _peft(OneLinear(in_f, out_f, True), ["proj"], r, 16.0, init="gaussian")
    pA = pm.base_model.model.proj.lora_A["default"].weight.detach()
    fused = fp.LoRALinear(nn.Linear(in_f, out_f), r=r, alpha=16.0, init="gaussian")
    fA = fused.lora_A.weight.detach()
    for A in (pA, fA):
        assert A.std().item() == pytest.approx(1.0 / r, rel=0.05)
        assert abs(A.mean().item()) < 4 * (1.0 / r) / math.sqrt(A.numel())
        assert A.abs().max() > 3.0 / r  # a normal, not a uniform of that std (max would be ~1.73/r)
    assert torch.count_nonzero(fused.lora_B.weight) == 0


def test_init_zeros_and_bad_arguments_rejected():
    with pytest.raises(ValueError, match="init"):
        fp.LoRALinear(nn.Linear(8, 8), r=2, init="zeros")
    with pytest.raises(ValueError, match=r"\br\b"):
        fp.LoRALinear(nn.Linear(8, 8), r=0)
    with pytest.raises(ValueError, match="dropout"):
        fp.LoRALinear(nn.Linear(8, 8), r=2, dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        fp.LoRALinear(nn.Linear(8, 8), r=2, dropout=-0.1)
    layer = fp.LoRALinear(nn.Linear(8, 8), r=2)
    with pytest.raises(ValueError, match=r"in_features|x"):
        layer(torch.randn(3, 9))


# --------------------------------------------------------------------------------------------
# Dropout (docs/contract.md §5): one seed from the default CPU generator, mask from the Philox stream
# --------------------------------------------------------------------------------------------


def _eager_lora(x, W, b, A, B, scaling, keep, p):
    y = x @ W.t() + scaling * ((x * keep / (1.0 - p)) @ A.t()) @ B.t()
    return y if b is None else y + b


@pytest.mark.parametrize("dtype,rtol,atol", TOLS, ids=TOL_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("tokens", [7, 1100], ids=["small", "over-64Ki-elements"])
def test_dropout_mask_from_spec_seed(dtype, rtol, atol, bias, tokens):
    """tokens = 1100: x[2 * 1100, 33] has more than 2**16 elements, so an implementation that
    generates the mask in blocks must carry the global row index into the Philox counter."""
    in_f, out_f, r, alpha, p = 33, 65, 4, 8.0, 0.3
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    layer = fp.LoRALinear(base, r=r, alpha=alpha, dropout=p)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn_like(layer.lora_B.weight))
    layer.train()
    W, b = base.weight.detach(), None if base.bias is None else base.bias.detach()
    A0, B0 = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()

    x = torch.randn(2, tokens, in_f, dtype=dtype, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    assert torch.equal(torch.get_rng_state(), after), (
        "the forward must draw exactly one seed, as docs/contract.md §5 says")
    keep = ref.dropout_keep_mask(seed, 2 * tokens, in_f, p).reshape(2, tokens, in_f)
    assert 0.5 < keep.float().mean().item() < 0.9

    x_r = x.detach().clone().requires_grad_(True)
    A_r, B_r = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    y_r = _eager_lora(x_r, W, b, A_r, B_r, alpha / r, keep.to(dtype), p)
    _close(y, y_r, rtol, atol)
    # and fusedpeft.reference (docs/contract.md §5), fed the same seed (it computes in fp32)
    y_ref = ref.lora_linear(x.detach(), W, b, A0, B0, alpha / r, p, seed)
    _close(y.detach().float(), y_ref.float(), 2e-5, 2e-5)

    g = torch.randn_like(y)
    y.backward(g)
    y_r.backward(g)
    _close(x.grad, x_r.grad, rtol, atol)
    _close(layer.lora_A.weight.grad, A_r.grad, rtol, atol)
    _close(layer.lora_B.weight.grad, B_r.grad, rtol, atol)

    # the next forward draws a new seed (a different mask)
    with torch.no_grad():
        assert not torch.allclose(layer(x), y)

    # eval: dropout off
    layer.eval()
    with torch.no_grad():
        _close(layer(x), _eager_lora(x, W, b, A0, B0, alpha / r, torch.ones_like(x), 0.0), rtol, atol)


def test_dropout_rate_and_scaling():
    """Independent of the generator's details: about p of the features are dropped, kept ones scaled by 1/(1-p)."""
    in_f, p = 64, 0.3
    layer = fp.LoRALinear(nn.Linear(in_f, 1, bias=False).double(), r=in_f, alpha=float(in_f), dropout=p)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(in_f, dtype=torch.float64))  # S = dropout(x)
        layer.lora_B.weight.fill_(1.0)  # y = sum_j dropout(x)_j
        layer.base_layer.weight.zero_()
    layer.train()
    x = torch.ones(4096, in_f, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x).squeeze(-1)
    kept = y * (1 - p)  # number of kept features per row, if kept ones are scaled by 1/(1-p)
    _close(kept, kept.round(), rtol=0, atol=1e-9)
    assert (kept.mean() / in_f).item() == pytest.approx(1 - p, abs=0.005)


# --------------------------------------------------------------------------------------------
# merge / unmerge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol,atol", TOLS, ids=TOL_IDS)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_merge_unmerge(dtype, rtol, atol, use_rslora):
    in_f, out_f, r, alpha = 33, 65, 4, 12.0
    base = nn.Linear(in_f, out_f).to(dtype)
    layer = fp.LoRALinear(base, r=r, alpha=alpha, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn_like(layer.lora_B.weight))
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    W0 = base.weight.detach().clone()
    A, B = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    x = torch.randn(7, in_f, dtype=dtype)
    with torch.no_grad():
        y0 = layer(x)
        _close(layer.delta_weight().to(dtype), s * B @ A, rtol, atol)
        assert layer.merged is False
        layer.merge()
        assert layer.merged is True
        assert layer.base_layer.weight.dtype == dtype
        _close(layer.base_layer.weight, W0 + s * B @ A, rtol, atol)
        y1 = layer(x)
        _close(y1, y0, rtol, atol)
        _close(y1, layer.base_layer(x), rtol=0, atol=0)  # merged forward is plain base(x)
        layer.unmerge()
        assert layer.merged is False
        _close(layer.base_layer.weight, W0, rtol=0, atol=8 * torch.finfo(dtype).eps)
        _close(layer(x), y0, rtol, atol)
