"""DoRA through PEFT interop: from_peft on a PEFT DoRA model (shared magnitude, equal logits and
gradients), save_adapter -> peft.PeftModel.from_pretrained and PEFT's save_pretrained ->
load_adapter round trips with equal logits, merged PEFT DoRA layers, and the errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import fusedpeft as fp

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def tiny(arch: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**SIZES))
    return model.double().eval()


def ids() -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


def randomise_(model: nn.Module) -> None:
    """B non-zero and the magnitudes moved off their initial row norms (ours or PEFT's names)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))


def peft_dora(arch="llama", **kw):
    pm = get_peft_model(tiny(arch), LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, use_dora=True, **kw))
    randomise_(pm)
    return pm.eval()


def logits_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _ours(name: str) -> str:
    """Our parameter name for PEFT's: <module>.lora_A.default.weight -> <module>.lora_A.weight,
    <module>.lora_magnitude_vector.default.weight -> <module>.lora_magnitude_vector."""
    name = name.removeprefix("base_model.model.")
    return (name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_from_peft_dora_shares_magnitude_and_matches(arch):
    pm = peft_dora(arch)
    x = ids()
    ref_logits, ref_grads = logits_and_grads(copy.deepcopy(pm), x)
    magnitude = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight
    model = fp.from_peft(pm)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, fp.LoRALinear) and layer.use_dora
    assert layer.lora_magnitude_vector is magnitude  # the same Parameter
    logits, grads = logits_and_grads(model, x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    assert {_ours(n) for n in ref_grads} == set(grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[_ours(name)], g, rtol=1e-9, atol=1e-10)


def test_from_peft_merged_dora_layer_unmerges():
    pm = peft_dora()
    x = ids()
    with torch.no_grad():
        expected = pm(x).logits
        unmerged_w = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
        pm.base_model.merge_adapter()
        model = fp.from_peft(pm)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.merged and layer.use_dora
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-10, atol=1e-10)
        fp.unmerge(model)
        torch.testing.assert_close(layer.base_layer.weight, unmerged_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-10, atol=1e-10)


def test_from_peft_rejects_merged_dora_without_norm():
    pm = peft_dora()
    pm.base_model.merge_adapter()
    for module in pm.modules():
        if hasattr(module, "_caches"):
            module._caches.clear()
    with pytest.raises(ValueError, match="DoRA layer .* is merged, and PEFT kept no norm"):
        fp.from_peft(pm)


def test_save_adapter_loads_in_peft_and_back(tmp_path):
    model = tiny()
    fp.apply_lora(model, TARGETS, r=4, alpha=12.0, use_dora=True)
    randomise_(model)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    fp.save_adapter(model, tmp_path)
    config = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert config["use_dora"] is True
    pm = PeftModel.from_pretrained(tiny(), tmp_path).eval()
    layer = pm.base_model.model.model.layers[1].mlp.down_proj
    assert "default" in layer.lora_magnitude_vector
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, expected, rtol=1e-10, atol=1e-10)
        loaded = fp.load_adapter(tiny(), tmp_path)
        assert all(m.use_dora for m in loaded.modules() if isinstance(m, fp.LoRALinear))
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-10, atol=1e-10)


def test_peft_save_pretrained_loads_into_ours(tmp_path):
    pm = peft_dora()
    x = ids()
    with torch.no_grad():
        expected = pm(x).logits
    pm.save_pretrained(tmp_path)
    model = fp.load_adapter(tiny(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-10, atol=1e-10)
    # into existing DoRA layers: weights copied in
    existing = fp.apply_lora(tiny(), TARGETS, r=4, alpha=12.0, use_dora=True)
    fp.load_adapter(existing, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(existing(x).logits, expected, rtol=1e-10, atol=1e-10)


def test_dora_io_errors(tmp_path):
    mixed = fp.apply_lora(tiny(), ["q_proj"], r=2, use_dora=True)
    fp.apply_lora(mixed, ["v_proj"], r=2)
    with pytest.raises(ValueError, match="some layers use DoRA and some do not"):
        fp.save_adapter(mixed, tmp_path / "mixed")
    pm = peft_dora()
    pm.save_pretrained(tmp_path / "dora")
    plain = fp.apply_lora(tiny(), TARGETS, r=4)
    with pytest.raises(ValueError, match="use_dora=False, the file has use_dora=True"):
        fp.load_adapter(plain, tmp_path / "dora")
    config_file = tmp_path / "dora" / "adapter_config.json"
    config = json.load(open(config_file))
    json.dump({**config, "fan_in_fan_out": True}, open(config_file, "w"))
    with pytest.raises(ValueError, match="fan_in_fan_out=True"):
        fp.load_adapter(tiny(), tmp_path / "dora")
    lora = fp.apply_lora(tiny(), ["q_proj"], r=2)
    fp.save_adapter(lora, tmp_path / "lora")
    config_file = tmp_path / "lora" / "adapter_config.json"
    json.dump({**json.load(open(config_file)), "use_dora": True}, open(config_file, "w"))
    with pytest.raises(ValueError, match=r"missing key .*lora_magnitude_vector' \(use_dora=true\)"):
        fp.load_adapter(tiny(), tmp_path / "lora")
