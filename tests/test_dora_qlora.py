"""DoRA over bitsandbytes 4-bit and 8-bit bases (QLoRA + DoRA) against PEFT's DoRA on the same
bitsandbytes layers (peft.tuners.lora.bnb), on CPU: forward and every gradient incl. the
magnitude, dropout against PEFT's formula with our mask, the row-blocked dequantization the norm
reads, merge, from_peft, and save_adapter / load_adapter / PeftModel.from_pretrained round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.quantized import dequantized_module_weight, quantized_weight, row_blocks
from dora_helpers import check_output_and_grads
from helpers import runnable
from qlora_helpers import Tiny, bnb, linear4bit, linear8bit

peft = pytest.importorskip("peft")

BACKENDS = runnable("dora")  # torch, cpu, triton (under the interpreter; 4-bit only)
BITS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", None)]


def _base(kind, double_quant, k, d, bias=True):
    torch.manual_seed(k + d)
    return linear8bit(k, d, bias=bias) if kind == "int8" else linear4bit(k, d, torch.float32, kind, double_quant,
                                                                        bias=bias)


def _peft_dora(kind, double_quant, dropout=0.0, bias=True):
    """A PEFT DoRA model over two bitsandbytes layers, A / B / magnitude moved off their init."""
    model = Tiny(_base(kind, double_quant, 64, 40, bias), _base(kind, double_quant, 64, 24, bias))
    model.is_loaded_in_8bit, model.is_loaded_in_4bit = kind == "int8", kind != "int8"
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                             use_dora=True)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    return pm


def _fused_from(layer, backend, dropout=0.0):
    """LoRALinear(use_dora=True) over PEFT's (shared) bitsandbytes base with copies of its adapter."""
    fused = fp.LoRALinear(layer.base_layer, r=4, alpha=12, dropout=dropout, use_dora=True, backend=backend)
    with torch.no_grad():
        fused.lora_A.weight.copy_(layer.lora_A["default"].weight)
        fused.lora_B.weight.copy_(layer.lora_B["default"].weight)
        fused.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)
    return fused


def _tol(kind):
    return 3e-3 if kind == "int8" else 1e-5  # 8-bit: fp16 in and out


def _close(actual, expected, tol):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol,
                               atol=tol * max(1.0, expected.abs().max().item()))


def _skip_triton_8bit(backend, kind):
    if backend == "triton" and kind == "int8":
        pytest.skip("the Triton DoRA kernels take no 8-bit base (test_triton_refuses_8bit)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,double_quant", BITS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_dora_on_bitsandbytes(backend, kind, double_quant, bias):
    _skip_triton_8bit(backend, kind)
    pm = _peft_dora(kind, double_quant, bias=bias)
    layer = pm.base_model.model.q_proj
    assert type(layer).__module__.endswith("lora.bnb")
    fused = _fused_from(layer, backend)
    dtype = torch.float16 if kind == "int8" else torch.float32
    x = torch.randn(2, 5, 64, dtype=dtype)
    x_p, x_f = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_f = fused(x_f)
    # PEFT's DoRA on an 8-bit CPU base leaves it unusable for a later forward (dequantize_module_weight
    # re-creates the weight without its scales): PEFT runs last
    y_p = layer(x_p)
    assert y_f.dtype == y_p.dtype and y_f.shape == y_p.shape
    check_output_and_grads(y_f, y_p, x_f, x_p, fused, layer, lambda a, e: _close(a, e, _tol(kind)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,double_quant", [("nf4", True), ("fp4", False), ("int8", None)])
def test_dropout_matches_peft_formula_with_our_mask(backend, kind, double_quant):
    _skip_triton_8bit(backend, kind)
    p = 0.3
    pm = _peft_dora(kind, double_quant, dropout=p)
    layer = pm.base_model.model.q_proj
    fused = _fused_from(layer, backend, dropout=p).train()
    dtype = torch.float16 if kind == "int8" else torch.float32
    x = torch.randn(9, 64, dtype=dtype)
    torch.manual_seed(7)
    seed = int(ref.new_dropout_seed())
    torch.manual_seed(7)
    x_f = x.clone().requires_grad_(True)
    y_f = fused(x_f)
    # PEFT's DoRA branch with base_result=None (F.linear(x', dequantized W)), x' = our mask on x in the adapter dtype
    x_p = x.clone().requires_grad_(True)
    base = layer.base_layer(x_p)
    y_p = (base + layer.lora_magnitude_vector["default"](
        ref.dropout(x_p.float(), p, seed), lora_A=layer.lora_A["default"], lora_B=layer.lora_B["default"],
        scaling=layer.scaling["default"], base_layer=layer.base_layer, base_result=None)).to(base.dtype)
    check_output_and_grads(y_f, y_p, x_f, x_p, fused, layer, lambda a, e: _close(a, e, _tol(kind)))


@pytest.mark.parametrize("blocksize,k,d", [(64, 128, 33), (64, 33, 40), (128, 256, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_reads_the_dequantized_weight_a_row_block_at_a_time(blocksize, k, d, dtype):
    layer = linear4bit(k, d, dtype, "nf4", True, blocksize)
    full = dequantized_module_weight(layer)
    q = quantized_weight(layer)
    for max_elements in (1, 300, 1 << 20):
        blocks = list(row_blocks(q, full.dtype, max_elements))
        assert torch.equal(torch.cat([b for _, b in blocks]), full)
        if k % blocksize == 0 and max_elements < k:
            assert len(blocks) == d  # one row per block: no full-size copy
    fused = fp.LoRALinear(layer, r=3, use_dora=True)
    with torch.no_grad():
        fused.lora_B.weight.normal_()
    W = full.double()
    direct = (W + fused.scaling * fused.lora_B.weight.double() @ fused.lora_A.weight.double()).norm(dim=1)
    from fusedpeft.fused.dora import dora_scale

    n = fused.lora_magnitude_vector.detach().double() / dora_scale(fused).double()
    torch.testing.assert_close(n, direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.lora_magnitude_vector.detach().double(), W.norm(dim=1), rtol=1e-6, atol=1e-6)


def test_8bit_norm_reads_int8_rows_times_scales():
    layer = linear8bit(64, 40)
    layer(torch.randn(3, 64, dtype=torch.float16))  # bitsandbytes moves the scales to layer.state here
    from bitsandbytes.functional import int8_vectorwise_dequant

    W = int8_vectorwise_dequant(layer.weight.data, layer.state.SCB)
    fused = fp.LoRALinear(layer, r=2, use_dora=True)
    torch.testing.assert_close(fused.lora_magnitude_vector.detach(), W.norm(dim=1), rtol=1e-6, atol=1e-6)


def test_norm_cache_follows_requantization():
    layer = fp.LoRALinear(linear4bit(64, 16), r=2, use_dora=True)
    x = torch.randn(3, 64)
    layer(x)
    cached = layer._dora_cache.value
    layer(x)
    assert layer._dora_cache.value is cached
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    layer.unmerge()  # re-quantized twice: a new packed weight
    layer(x)
    assert layer._dora_cache.value is not cached
    torch.testing.assert_close(layer._dora_cache.value, dequantized_module_weight(layer.base_layer).norm(dim=1) ** 2)


@pytest.mark.parametrize("eight_bit", [False, True])
def test_merge_adapters_dequantize_equals_the_layer(eight_bit):
    base = linear8bit(64, 40) if eight_bit else linear4bit(64, 40)
    model = Tiny(base, linear4bit(64, 24))
    fp.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0, use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    dtype = torch.float16 if eight_bit else torch.float32
    x = torch.randn(6, 64, dtype=dtype)
    q = model.q_proj
    with torch.no_grad():
        W = dequantized_module_weight(q.base_layer).float()
        g = q.lora_magnitude_vector / (W + q.scaling * q.lora_B.weight @ q.lora_A.weight).norm(dim=1)
        expected = (x.float() @ (g[:, None] * (W + q.scaling * q.lora_B.weight @ q.lora_A.weight)).t()
                    + q.base_layer.bias.float())
        merged = fp.merge_adapters(model, dequantize=True)
        assert type(merged.q_proj) is nn.Linear
        _close(merged.q_proj(x.to(merged.q_proj.weight.dtype)), expected, 2e-3 if eight_bit else 1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_from_peft_save_and_load_round_trips(kind, tmp_path):
    pm = _peft_dora(kind, True)
    fresh = copy.deepcopy(pm.base_model.model)  # a copy of the bases with PEFT's layers on them
    reference = copy.deepcopy(pm)
    magnitude = pm.base_model.model.q_proj.lora_magnitude_vector["default"].weight
    model = fp.from_peft(pm)
    assert model.q_proj.use_dora and model.q_proj.lora_magnitude_vector is magnitude
    dtype = torch.float16 if kind == "int8" else torch.float32
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 40, dtype=dtype)
    y, y_ref = model(x), reference(x)
    _close(y, y_ref, _tol(kind))
    ours = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    theirs = {_ours(n): p for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs) and len(ours) == 6
    got = torch.autograd.grad(y, [x] + [ours[n] for n in sorted(ours)], g)
    want = torch.autograd.grad(y_ref, [x] + [theirs[n] for n in sorted(ours)], g)
    for a, b in zip(got, want):
        _close(a, b, _tol(kind))
    fp.save_adapter(model, tmp_path)
    bases = Tiny(fresh.q_proj.base_layer, fresh.v_proj.base_layer)
    bases.is_loaded_in_8bit, bases.is_loaded_in_4bit = kind == "int8", kind != "int8"
    loaded = fp.load_adapter(copy.deepcopy(bases), tmp_path)
    assert loaded.q_proj.use_dora and isinstance(loaded.q_proj.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    with torch.no_grad():
        _close(loaded(x), y, _tol(kind))
        back = peft.PeftModel.from_pretrained(bases, tmp_path).train()
        _close(back(x), y, _tol(kind))


def _ours(name: str) -> str:
    """Our parameter name for PEFT's (base_model.model.<m>.lora_A.default.weight -> <m>.lora_A.weight)."""
    name = name.removeprefix("base_model.model.")
    return (name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"))


def test_triton_refuses_8bit():
    if "triton" not in BACKENDS:
        pytest.skip("triton cannot run here")
    layer = fp.LoRALinear(linear8bit(64, 8), r=2, use_dora=True, backend="triton")
    with pytest.raises(TypeError, match="triton dora: an 8-bit .* use backend='torch' or 'cpu'"):
        layer(torch.randn(2, 64, dtype=torch.float16))
