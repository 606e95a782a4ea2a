"""PEFT interop on tiny transformers decoders: from_peft parity (same tensors, outputs, gradients),
save_adapter -> peft.PeftModel.from_pretrained, PEFT's save_pretrained -> load_adapter, the MoRA
fork's format, and the errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import fusedpeft as fp

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny(arch: str = "llama", **overrides) -> nn.Module:
    sizes = {**SIZES, **overrides}
    model = LlamaForCausalLM(LlamaConfig(**sizes)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**sizes))
    return model.double().eval()


def ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (batch, seq))


def randomise_(model: nn.Module) -> None:
    """Every LoRA B / MoRA M (ours or PEFT's) set non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".M"):
                p.normal_(0.0, 0.2)


def outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def peft_name(name: str) -> str:
    """PEFT's parameter name (base_model.model.<module>.lora_A.default.weight) for ours (<module>.lora_A.weight)."""
    return "base_model.model." + name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")


PEFT_CONFIGS = {
    "plain": dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"],
                     rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 6}, alpha_pattern={"o_proj": 3}),
    "rslora": dict(r=4, lora_alpha=6, target_modules=["q_proj", "up_proj"], use_rslora=True),
}


# --------------------------------------------------------------------------------------------
# from_peft
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("cfg", list(PEFT_CONFIGS))
def test_from_peft_same_tensors_outputs_and_grads(arch, cfg):
    pm = get_peft_model(tiny(arch), LoraConfig(**PEFT_CONFIGS[cfg]))
    randomise_(pm)
    pm.eval()
    x = ids()
    ref_logits, ref_grads = outputs_and_grads(copy.deepcopy(pm), x)
    peft_layers = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    params = {n: (m.get_base_layer().weight, m.lora_A["default"].weight, m.lora_B["default"].weight,
                  m.scaling["default"]) for n, m in peft_layers.items()}

    model = fp.from_peft(pm)
    assert model is pm.base_model.model and isinstance(model, nn.Module) and not isinstance(model, PeftModel)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, fp.LoRALinear)) == sorted(params)
    for name, (W, A, B, scaling) in params.items():
        layer = model.get_submodule(name)
        assert layer.base_layer.weight is W and layer.lora_A.weight is A and layer.lora_B.weight is B
        assert layer.scaling == scaling and layer.r == A.shape[0]
    if cfg == "patterns":
        assert model.model.layers[0].self_attn.k_proj.r == 2 and model.model.layers[1].mlp.up_proj.r == 6
        assert model.model.layers[0].self_attn.o_proj.scaling == pytest.approx(3 / 4)
    logits, grads = outputs_and_grads(model, x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    assert sorted(map(peft_name, grads)) == sorted(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[peft_name(name)], rtol=1e-9, atol=1e-10, msg=name)


def test_from_peft_carries_dropout_and_requires_grad():
    pm = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.25))
    model = fp.from_peft(pm.base_model)  # a LoraModel works too
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.dropout == 0.25
    assert layer.lora_A.weight.requires_grad and not layer.base_layer.weight.requires_grad
    assert not model.lm_head.weight.requires_grad


def test_from_peft_keeps_a_merged_adapter_merged():
    pm = get_peft_model(tiny(), LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "up_proj"]))
    randomise_(pm)
    pm.eval()
    x = ids()
    with torch.no_grad():
        expected = pm(x).logits
        pm.base_model.merge_adapter()
        model = fp.from_peft(pm)
        layers = [m for m in model.modules() if isinstance(m, fp.LoRALinear)]
        assert len(layers) == 4 and all(layer.merged for layer in layers)
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-10, atol=1e-10)
        fp.unmerge(model)  # PEFT's merge is W += scaling * B @ A, which ours reverses
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-10, atol=1e-10)
        layers[0].lora_B.weight.zero_()
        assert (model(x).logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize("case,error,match", [
    ("two_adapters", ValueError, "exactly one"),
    ("embedding", TypeError, "Embedding"),
    ("modules_to_save", ValueError, "modules_to_save"),
    ("not_peft", TypeError, "peft.PeftModel"),
])
def test_from_peft_rejects(case, error, match):
    if case == "not_peft":
        target = tiny()
    elif case == "two_adapters":
        target = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
        target.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    else:
        kw = {"embedding": dict(target_modules=["q_proj", "embed_tokens"]),
              "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"])}[case]
        target = get_peft_model(tiny(), LoraConfig(r=2, **kw))
    with pytest.raises(error, match=match):
        fp.from_peft(target)


# --------------------------------------------------------------------------------------------
# save_adapter -> PEFT, PEFT -> load_adapter
# --------------------------------------------------------------------------------------------


def build_fused_lora(base, rslora=False):
    """Different r and alpha per layer group, so rank_pattern / alpha_pattern are exercised."""
    model = copy.deepcopy(base)
    fp.apply_lora(model, ["q_proj", "v_proj", "up_proj"], r=4, alpha=12.0, use_rslora=rslora, dropout=0.1)
    fp.apply_lora(model, ["layers.1.self_attn.o_proj"], r=2, alpha=5.0, use_rslora=rslora, dropout=0.1)
    fp.apply_lora(model, ["down_proj"], r=4, alpha=3.0, use_rslora=rslora, dropout=0.1)
    randomise_(model)
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_save_adapter_loads_in_peft(tmp_path, rslora):
    base = tiny()
    model = build_fused_lora(base, rslora)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    fp.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12.0
    assert config["use_rslora"] is rslora and config["lora_dropout"] == 0.1
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].shape == (32, 2)

    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    o_proj = pm.base_model.model.model.layers[1].self_attn.o_proj
    assert o_proj.r["default"] == 2
    assert o_proj.scaling["default"] == pytest.approx(model.model.layers[1].self_attn.o_proj.scaling)
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, expected, rtol=1e-10, atol=1e-10)
    # and back here
    again = fp.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, rtol=1e-10, atol=1e-10)
    assert again.model.layers[0].mlp.up_proj.dropout == 0.1


@pytest.mark.parametrize("cfg", list(PEFT_CONFIGS))
def test_peft_saved_adapter_loads_here(tmp_path, cfg):
    base = tiny("qwen2")
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**PEFT_CONFIGS[cfg]))
    randomise_(pm)
    pm.eval()
    x = ids()
    with torch.no_grad():
        expected = pm(x).logits
    pm.save_pretrained(tmp_path)
    model = fp.load_adapter(copy.deepcopy(base), tmp_path).eval()
    n_layers = sum(isinstance(m, fp.LoRALinear) for m in model.modules())
    assert n_layers == 2 * len(PEFT_CONFIGS[cfg]["target_modules"])
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        n for n, _ in model.named_parameters() if ".lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-10, atol=1e-10)


def test_load_adapter_into_existing_adapters(tmp_path):
    base = tiny()
    source = build_fused_lora(base)
    fp.save_adapter(source, tmp_path)
    target = build_fused_lora(base)  # same layout, other weights (the kaiming A differs)
    layer = target.model.layers[0].self_attn.q_proj
    A_param = layer.lora_A.weight
    assert not torch.equal(A_param, source.model.layers[0].self_attn.q_proj.lora_A.weight)
    fp.load_adapter(target, tmp_path)
    assert target.model.layers[0].self_attn.q_proj.lora_A.weight is A_param, "weights are copied in place"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(target(x).logits, source(x).logits, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# MoRA: the reference fork's format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_round_trip_in_the_fork_format(tmp_path, mora_type):
    base = tiny()
    model = fp.apply_mora(copy.deepcopy(base), r=3, mora_type=mora_type)
    fp.apply_mora(model, ["lm_head"], r=2, mora_type=mora_type)  # another r: rank_pattern
    randomise_(model)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    fp.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_mora"] is True and config["mora_type"] == mora_type and config["peft_type"] == "LORA"
    assert config["r"] == 3 and config["rank_pattern"] == {"lm_head": 2}
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("lora_B" in k for k in keys)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], q.M.detach())

    loaded = fp.load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded.model.layers[1].mlp.gate_proj.mora_type == mora_type and loaded.lm_head.r == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-12, atol=1e-12)

    # a fork-written file also holds lora_B.weight, the same M (its lora_B aliases lora_A)
    with_b = dict(keys)
    with_b.update({k.replace("lora_A", "lora_B"): v.clone() for k, v in keys.items()})
    save_file(with_b, tmp_path / "adapter_model.safetensors")
    loaded = fp.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-12, atol=1e-12)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    with_b[key] = with_b[key] + 1.0
    save_file(with_b, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="different from lora_A"):
        fp.load_adapter(copy.deepcopy(base), tmp_path)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def lora_dir(tmp_path):
    fp.save_adapter(build_fused_lora(tiny()), tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_load_rejects_mismatched_shapes(lora_dir):
    with pytest.raises(ValueError, match=r"' is \d+->48, but the file has lora_A \(\d, \d+\)"):
        fp.load_adapter(tiny(hidden_size=48), lora_dir)


def test_load_rejects_missing_keys_and_unknown_modules(lora_dir):
    model = tiny()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = load_file(lora_dir / "adapter_model.safetensors")
    del keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(keys, lora_dir / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing key .*layers\.1\.mlp\.down_proj\.lora_B\.weight"):
        fp.load_adapter(model, lora_dir)
    with pytest.raises(ValueError, match="does not have"):
        fp.load_adapter(tiny(num_hidden_layers=1), _full(lora_dir))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(isinstance(m, fp.LoRALinear) for m in model.modules())
    # a model whose adapter layers the file does not cover
    partial = fp.apply_lora(tiny(), ["q_proj", "k_proj"], r=4)
    with pytest.raises(ValueError, match=r"no weights for .*k_proj"):
        fp.load_adapter(partial, _full(lora_dir))


def _full(path):
    """A fresh complete adapter directory next to ``path``."""
    out = path.parent / (path.name + "_full")
    fp.save_adapter(build_fused_lora(tiny()), out)
    return out


def test_load_rejects_wrong_adapter_kind(tmp_path, lora_dir):
    mora_dir = tmp_path / "mora"
    fp.save_adapter(fp.apply_mora(tiny(), ["q_proj"], r=2), mora_dir)
    with pytest.raises(ValueError, match="MoRALinear adapter"):
        fp.load_adapter(fp.apply_lora(tiny(), ["q_proj"], r=2), mora_dir)
    with pytest.raises(ValueError, match="LoRALinear adapter"):
        fp.load_adapter(fp.apply_mora(tiny(), ["layers.0.self_attn.q_proj"], r=2), lora_dir)
    _edit_config(mora_dir, r=3)  # r_hat no longer matches M
    with pytest.raises(ValueError, match=r"needs M \[\d+, \d+\], but the file has"):
        fp.load_adapter(tiny(), mora_dir)
    _edit_config(lora_dir, peft_type="IA3")
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        fp.load_adapter(tiny(), lora_dir)
    _edit_config(lora_dir, peft_type="LORA", use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        fp.load_adapter(tiny(), lora_dir)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fp.load_adapter(tiny(), tmp_path / "nowhere")


def test_load_rejects_peft_dora_file(tmp_path):
    pm = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path)
    _edit_config(tmp_path, use_dora=False)  # even when the config hides it, the keys do not
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.*\(DoRA\)"):
        fp.load_adapter(tiny(), tmp_path)


def test_save_rejects(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear / MoRALinear"):
        fp.save_adapter(tiny(), tmp_path)
    mixed = fp.apply_lora(tiny(), ["q_proj"], r=2)
    fp.apply_mora(mixed, ["v_proj"], r=2)
    with pytest.raises(ValueError, match="mixes adapter kinds"):
        fp.save_adapter(mixed, tmp_path)
    rslora = fp.apply_lora(tiny(), ["q_proj"], r=2, use_rslora=True)
    fp.apply_lora(rslora, ["v_proj"], r=2)
    with pytest.raises(ValueError, match="rsLoRA"):
        fp.save_adapter(rslora, tmp_path)
    dropouts = fp.apply_lora(tiny(), ["q_proj", "k_proj"], r=2, dropout=0.1)
    fp.apply_lora(dropouts, ["v_proj"], r=2, dropout=0.2)
    with pytest.warns(UserWarning, match="different dropout p; PEFT stores one, 0.1 is saved"):
        fp.save_adapter(dropouts, tmp_path)
    types = fp.apply_mora(tiny(), ["q_proj"], r=2, mora_type=1)
    fp.apply_mora(types, ["v_proj"], r=2, mora_type=6)
    with pytest.raises(ValueError, match="different mora_type"):
        fp.save_adapter(types, tmp_path)
