"""What a PEFT user writes: lora_alpha / lora_dropout / target_modules / r, a peft.LoraConfig in
place of the keywords; and the common mistakes that must not pass silently (instruction_weight
without a mask or outside [0, 1], alpha=0, a partial adapter load), the repr naming the backend
that runs."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fusedpeft as fp


def _llama(layers: int = 2) -> nn.Module:
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _lora_layers(model) -> dict[str, fp.LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, fp.LoRALinear)}


def test_peft_keyword_aliases_mean_the_same_as_ours():
    ours = _lora_layers(fp.apply_lora(_llama(), target_modules=["q_proj", "v_proj"], r=4, alpha=16.0, dropout=0.1))
    theirs = _lora_layers(fp.apply_lora(_llama(), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16.0,
                                        lora_dropout=0.1))
    assert sorted(ours) == sorted(theirs) and len(ours) == 4
    for name, layer in theirs.items():
        assert (layer.r, layer.scaling, layer.dropout) == (ours[name].r, ours[name].scaling, ours[name].dropout) == (
            4, 4.0, 0.1)
    mora = fp.apply_mora(_llama(), target_modules=["q_proj"], r=4, lora_dropout=0.2)
    assert {m.dropout for m in mora.modules() if isinstance(m, fp.MoRALinear)} == {0.2}


def test_a_peft_lora_config_configures_apply_lora_like_peft():
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                             use_rslora=True, init_lora_weights="gaussian")
    model = fp.apply_lora(_llama(), config)
    reference = peft.get_peft_model(_llama(), copy.deepcopy(config))
    ours = sorted(n.replace(".base_layer", "") for n in _lora_layers(model))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                    if isinstance(m, peft.tuners.lora.Linear))
    assert ours == theirs
    layer = next(iter(_lora_layers(model).values()))
    peft_layer = next(m for m in reference.modules() if isinstance(m, peft.tuners.lora.Linear))
    assert layer.scaling == pytest.approx(peft_layer.scaling["default"]) and layer.dropout == 0.05
    assert layer.r == 4 and layer.use_rslora


@pytest.mark.parametrize("config, match", [
    (dict(bias="all"), "bias='all'"),
    (dict(target_modules="q_proj|v_proj"), "is a string"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
])
def test_lora_config_options_we_lack_are_errors(config, match):
    config = peft.LoraConfig(**{"target_modules": ["q_proj"], **config})
    model = _llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        fp.apply_lora(model, config)
    assert not _lora_layers(model) and before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_lora_config_with_use_dora_gives_dora_layers():
    model = fp.apply_lora(_llama(), peft.LoraConfig(target_modules=["q_proj"], r=4, use_dora=True))
    layers = _lora_layers(model)
    assert layers and all(layer.use_dora for layer in layers.values())


def test_keywords_next_to_a_config_and_unknown_keywords_are_clear_type_errors():
    config = peft.LoraConfig(target_modules=["q_proj"])
    with pytest.raises(TypeError, match=r"either a peft.LoraConfig or LoRA keywords, not both; got \['r'\]"):
        fp.apply_lora(_llama(), config, r=16)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['lora_rank'\]; accepted: target_modules, r, "
                                        r"alpha \(or lora_alpha\), dropout \(or lora_dropout\), use_rslora"):
        fp.apply_lora(_llama(), lora_rank=4)
    with pytest.raises(TypeError, match="got alpha=4.0 and lora_alpha=8.0; give one of them"):
        fp.apply_lora(_llama(), alpha=4.0, lora_alpha=8.0)
    with pytest.raises(TypeError, match="lora_alpha is a LoRA keyword"):
        fp.apply_mora(_llama(), lora_alpha=8.0)
    with pytest.raises(TypeError, match="only be given to apply_lora"):
        fp.apply_mora(_llama(), config)
    with pytest.raises(TypeError, match="peft_type 'IA3'"):
        fp.apply_lora(_llama(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def test_alpha_zero_is_an_error():
    with pytest.raises(ValueError, match="alpha=0 makes scaling = alpha / r zero"):
        fp.LoRALinear(nn.Linear(8, 8), r=2, alpha=0)
    with pytest.raises(ValueError, match="alpha=0 makes scaling"):
        fp.apply_lora(_llama(), lora_alpha=0)


@pytest.mark.parametrize("weight", [2.0, -0.5, float("nan"), True])
def test_instruction_weight_outside_zero_one_is_an_error(weight):
    logits, labels = torch.randn(6, 11), torch.randint(0, 11, (6,))
    mask = torch.arange(6) < 3
    with pytest.raises(ValueError, match=r"instruction_weight must be a number in \[0, 1\]"):
        fp.masked_cross_entropy(logits, labels, instruction_mask=mask, instruction_weight=weight)
    with pytest.raises(ValueError, match=r"instruction_weight must be a number in \[0, 1\]"):
        fp.patch_causal_lm(_llama(), instruction_weight=weight)


def test_instruction_weight_without_a_mask_warns_and_with_one_does_not():
    logits, labels = torch.randn(6, 11), torch.randint(0, 11, (6,))
    hidden, head = torch.randn(6, 5), torch.randn(11, 5)
    with pytest.warns(UserWarning, match=r"instruction_weight=0.5 has no effect without an instruction_mask"):
        fp.masked_cross_entropy(logits, labels, instruction_weight=0.5)
    with pytest.warns(UserWarning, match="has no effect without an instruction_mask"):
        fp.linear_cross_entropy(hidden, head, labels, instruction_weight=0.5)
    model = fp.patch_causal_lm(_llama(), instruction_weight=0.5)
    ids = torch.randint(0, 61, (2, 7))
    with pytest.warns(UserWarning, match="has no effect without an instruction_mask"):
        model(input_ids=ids, labels=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.masked_cross_entropy(logits, labels, instruction_mask=torch.arange(6) < 3, instruction_weight=0.5)
        fp.masked_cross_entropy(logits, labels)  # the default weight 0 needs no mask
        model(input_ids=ids, labels=ids, instruction_mask=torch.zeros_like(ids, dtype=torch.bool))


def test_a_two_layer_adapter_loaded_into_a_three_layer_model_warns_naming_the_layers(tmp_path):
    small = fp.apply_lora(_llama(2), target_modules=["q_proj", "v_proj"], r=4)
    fp.save_adapter(small, tmp_path / "fused")
    peft_small = peft.get_peft_model(_llama(2), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_small.save_pretrained(tmp_path / "peft")
    for folder in ("fused", "peft"):
        with pytest.warns(UserWarning, match=r"partial load: 2 layer\(s\) .* \['model.layers.2.self_attn.q_proj', "
                                             r"'model.layers.2.self_attn.v_proj'\] \(the file adapts 4\)"):
            fp.load_adapter(_llama(3), tmp_path / folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.load_adapter(_llama(2), tmp_path / "fused")  # the same architecture loads silently


def test_repr_names_the_backend_that_runs():
    layer = fp.LoRALinear(nn.Linear(8, 8), r=2)
    assert "backend=auto->" in repr(layer)
    assert f"backend=auto->{fp.backends.resolve_backend('lora', None, torch.device('cpu'))}" in repr(layer)
    assert "backend=torch->torch" in repr(fp.LoRALinear(nn.Linear(8, 8), r=2, backend="torch"))
    assert "backend=auto->" in repr(fp.MoRALinear(nn.Linear(8, 8), r=2))
    cuda = fp.LoRALinear(nn.Linear(8, 8), r=2, backend="cuda")
    assert "backend=cuda (cannot run here:" in repr(cuda)
