"""fusedpeft on a bitsandbytes 4-bit base against PEFT's QLoRA layer (peft.tuners.lora.bnb), and
from_peft of a PEFT QLoRA model."""

import copy

import pytest
import torch

import fusedpeft as fp
from qlora_helpers import Tiny, linear4bit, linear8bit

peft = pytest.importorskip("peft")


def peft_qlora(dtype, quant_type="nf4", double_quant=True, eight_bit=False):
    make = (lambda k, d: linear8bit(k, d)) if eight_bit else \
        (lambda k, d: linear4bit(k, d, dtype, quant_type, double_quant))
    model = Tiny(make(128, 96), make(128, 40))
    # what transformers sets on a model loaded with BitsAndBytesConfig: PEFT then picks its bnb layers
    model.is_loaded_in_8bit, model.is_loaded_in_4bit = eight_bit, not eight_bit
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(std=0.5)
    return peft_model


def _lora_grads(model, x, g):
    y = model(x)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    return y, torch.autograd.grad(y, [x] + params, g)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_matches_peft_qlora_layer(backend, dtype, tol, quant_type, double_quant):
    peft_model = peft_qlora(dtype, quant_type, double_quant)
    q = peft_model.base_model.model.q_proj
    assert type(q).__module__.endswith("lora.bnb"), type(q)
    ours = fp.LoRALinear(q.base_layer, r=8, alpha=16, backend=backend)
    with torch.no_grad():
        ours.lora_A.weight.copy_(q.lora_A["default"].weight)
        ours.lora_B.weight.copy_(q.lora_B["default"].weight)
    x = torch.randn(3, 7, 128, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 7, 96, dtype=dtype)
    want = q(x)
    got = ours(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    wx, wA, wB = torch.autograd.grad(want, [x, q.lora_A["default"].weight, q.lora_B["default"].weight], g)
    gx, gA, gB = torch.autograd.grad(got, [x, ours.lora_A.weight, ours.lora_B.weight], g)
    for a, b in ((gx, wx), (gA, wA), (gB, wB)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("eight_bit", [False, True])
def test_from_peft_shares_tensors_and_matches(eight_bit):
    peft_model = peft_qlora(torch.float32, eight_bit=eight_bit)
    reference = copy.deepcopy(peft_model)
    tensors = {n: p.data_ptr() for n, p in peft_model.named_parameters()}
    model = fp.from_peft(peft_model)
    assert isinstance(model.q_proj, fp.LoRALinear) and isinstance(model.v_proj, fp.LoRALinear)
    assert model.q_proj.lora_A.weight.data_ptr() == tensors["base_model.model.q_proj.lora_A.default.weight"]
    assert model.q_proj.base_layer.weight.data_ptr() == tensors["base_model.model.q_proj.base_layer.weight"]
    dtype = torch.float16 if eight_bit else torch.float32
    x = torch.randn(5, 128, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 96, dtype=dtype)
    y, gs = _lora_grads(model, x, g)
    y_ref, gs_ref = _lora_grads(reference, x, g)
    tol = 2e-3 if eight_bit else 1e-5
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert len(gs) == len(gs_ref) == 5
    for a, b in zip(gs, gs_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
