"""apply_lora / apply_mora / merge_adapters on real transformers decoders (tiny configs, random
weights) and on plain modules: which layers are swapped, freezing, devices, dtypes, outputs,
merging back, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.pytorch_utils import Conv1D

import fusedpeft as fp
from fusedpeft.integrations.models import DEFAULT_TARGET_MODULES

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny(arch: str) -> nn.Module:
    """A random-weight decoder in float64 (so merged-vs-adapted comparisons can be tight)."""
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES))
    elif arch == "qwen2":  # q/k/v carry a bias
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES))
    else:  # logit / attention soft-capping, head_dim != hidden / heads
        model = Gemma2ForCausalLM(Gemma2Config(**SIZES, head_dim=12, final_logit_softcapping=30.0))
    return model.double().eval()


def randomise_adapters_(model: nn.Module, std: float = 0.2) -> None:
    """Non-zero B / M (both start at zero, which would hide every bug on the adapter path)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fp.LoRALinear):
                m.lora_B.weight.normal_(0.0, std)
            elif isinstance(m, fp.MoRALinear):
                m.M.normal_(0.0, std)


def ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (batch, seq))


def adapter_names(model, cls):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


ARCHS = ["llama", "qwen2", "gemma2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_lora_swaps_projections_and_freezes_the_rest(arch):
    base = tiny(arch)
    x = ids()
    with torch.no_grad():
        y0 = base(x).logits
    linears = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    model = fp.apply_lora(base, r=4, alpha=12.0, dropout=0.1, use_rslora=True)
    assert model is base
    expected = sorted(n for n in linears if n.rpartition(".")[2] in PROJECTIONS)
    assert len(expected) == 7 * SIZES["num_hidden_layers"]
    assert adapter_names(model, fp.LoRALinear) == expected
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, fp.LoRALinear)
    for name in expected:
        layer = model.get_submodule(name)
        assert layer.base_layer is linears[name], "the original nn.Linear is wrapped, not copied"
        assert (layer.r, layer.dropout, layer.use_rslora) == (4, 0.1, True)
        assert layer.scaling == pytest.approx(12.0 / 2.0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{ab}.weight" for n in expected for ab in ("lora_A", "lora_B"))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, y0, rtol=0, atol=0)  # B = 0: the base model's output
    randomise_adapters_(model)
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mora_type", [1, 6])
def test_apply_mora_per_layer_r_hat(arch, mora_type):
    model = fp.apply_mora(tiny(arch), r=4, mora_type=mora_type)
    layers = {n: model.get_submodule(n) for n in adapter_names(model, fp.MoRALinear)}
    assert len(layers) == 7 * SIZES["num_hidden_layers"]
    for name, layer in layers.items():
        k, d = layer.in_features, layer.out_features
        r_hat = int(((k + d) * 4) ** 0.5 + 0.5)
        assert layer.r_hat == (r_hat // 2 * 2 if mora_type == 6 else r_hat), name
        assert layer.mora_type == mora_type and layer.M.requires_grad
        assert torch.count_nonzero(layer.M) == 0
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(f"{n}.M" for n in layers)


def test_targets_by_suffix_string_and_list():
    model = fp.apply_lora(tiny("llama"), target_modules="self_attn.q_proj", r=2)
    assert adapter_names(model, fp.LoRALinear) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    model = fp.apply_mora(tiny("llama"), target_modules=["layers.1.mlp.down_proj", "v_proj"], r=2, mora_type=1)
    assert adapter_names(model, fp.MoRALinear) == ["model.layers.0.self_attn.v_proj",
                                                   "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    # a suffix matches whole name components only ("proj" is not "q_proj"), and LoRA + MoRA can coexist
    with pytest.raises(ValueError, match="no torch.nn.Linear"):
        fp.apply_lora(tiny("llama"), target_modules="proj")
    fp.apply_lora(model, target_modules=["q_proj"], r=2)
    assert len(adapter_names(model, fp.LoRALinear)) == 2 and len(adapter_names(model, fp.MoRALinear)) == 3


def test_default_targets_cover_common_architectures():
    for name in PROJECTIONS + ("qkv_proj", "gate_up_proj", "query_key_value", "c_attn", "c_fc"):
        assert name in DEFAULT_TARGET_MODULES


def test_adapters_on_the_base_weight_device_and_dtype():
    meta = nn.Sequential()
    meta.add_module("q_proj", nn.Linear(16, 24, device="meta"))
    fp.apply_lora(meta, r=2)
    assert meta.q_proj.lora_A.weight.device.type == "meta" and meta.q_proj.lora_B.weight.device.type == "meta"
    bf16 = tiny("llama").to(torch.bfloat16)
    fp.apply_mora(bf16, r=2)
    layer = bf16.model.layers[0].self_attn.q_proj
    assert layer.M.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16


def test_bad_targets_and_adapted_layers_rejected():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"no torch.nn.Linear .*q_proj"):  # lists the names that exist
        fp.apply_lora(model, target_modules=["query"])
    with pytest.raises(TypeError, match="target_modules"):
        fp.apply_lora(model, target_modules=3)
    with pytest.raises(TypeError, match="target_modules"):
        fp.apply_lora(model, target_modules=["q_proj", None])
    with pytest.raises(TypeError, match="target_modules"):
        fp.apply_lora(model, target_modules=[])
    with pytest.raises(TypeError, match="model must be"):
        fp.apply_lora("not a model")
    fp.apply_lora(model, target_modules=["q_proj"], r=2)
    with pytest.raises(ValueError, match="already a LoRALinear"):
        fp.apply_mora(model, target_modules=["q_proj", "v_proj"])
    assert adapter_names(model, fp.MoRALinear) == []  # nothing swapped on error


def test_conv1d_rejected_or_skipped():
    gpt2_like = nn.Module()
    gpt2_like.c_attn = Conv1D(24, 8)
    with pytest.raises(TypeError, match="Conv1D"):
        fp.apply_lora(gpt2_like, target_modules=["c_attn"])
    with pytest.raises(ValueError, match=r"not nn.Linear: \['c_attn \(Conv1D\)'\]"):
        fp.apply_lora(gpt2_like)


def test_peft_layers_rejected():
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="from_peft"):
        fp.apply_lora(pm, target_modules=["q_proj"])


def test_bad_arguments_leave_the_model_unchanged():
    model = tiny("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="init"):
        fp.apply_lora(model, init="zeros")
    with pytest.raises(TypeError, match="unexpected keyword"):
        fp.apply_lora(model, rank=4)
    # r = 400 is valid for the 32->32 layers but its wrap padding exceeds in_features of q_proj etc.
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' .*padding"):
        fp.apply_mora(model, r=400, mora_type=1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not adapter_names(model, fp.LoRALinear) and not adapter_names(model, fp.MoRALinear)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["lora", "mora6", "mora1"])
def test_merge_adapters_equals_adapted_model(arch, kind):
    model = tiny(arch)
    if kind == "lora":
        fp.apply_lora(model, r=4, alpha=7.0, dropout=0.2)
    else:
        fp.apply_mora(model, r=4, mora_type=int(kind[-1]), dropout=0.2)
    randomise_adapters_(model)
    model.eval()  # dropout off
    x = ids()
    with torch.no_grad():
        adapted = model(x).logits
        base_only = copy.deepcopy(model)
        for m in base_only.modules():
            if isinstance(m, fp.LoRALinear):
                m.lora_B.weight.zero_()
            elif isinstance(m, fp.MoRALinear):
                m.M.zero_()
        assert (base_only(x).logits - adapted).abs().max() > 1e-3, "the adapters must change the output"
        merged = fp.merge_adapters(model)
        assert merged is model
        assert not adapter_names(merged, fp.LoRALinear) and not adapter_names(merged, fp.MoRALinear)
        layer = merged.model.layers[1].mlp.down_proj
        assert type(layer) is nn.Linear and not layer.weight.requires_grad
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-9, atol=1e-9)


def test_merge_adapters_single_layer_already_merged_and_errors():
    base = nn.Linear(9, 7).double()
    layer = fp.LoRALinear(base, r=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 9, dtype=torch.float64)
    y = layer(x)
    assert fp.merge_adapters(layer) is base
    torch.testing.assert_close(base(x), y)
    model = nn.Sequential(nn.Linear(9, 7).double())
    model[0] = fp.MoRALinear(model[0], r=2, mora_type=1)
    with torch.no_grad():
        model[0].M.normal_()
        y = model(x)
        model[0].merge()  # an already merged layer is put back as it is
    fp.merge_adapters(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), y)
    with pytest.raises(ValueError, match="no LoRALinear / MoRALinear"):
        fp.merge_adapters(model)
    with pytest.raises(TypeError, match="model must be"):
        fp.merge_adapters(42)
