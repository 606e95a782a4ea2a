"""load_adapter on crafted files (issue 19, items 2, 4, 5): the whole file is validated before the
model changes, every error names the field or key and the file, and after every failed load the
model (structure, tensors, requires_grad flags) is exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fusedpeft as fp

PREFIX = "base_model.model."


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.head = nn.Linear(8, 6), nn.Linear(8, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.v_proj(x)) + self.q_proj(x).sum(-1, keepdim=True)


def snapshot(model: nn.Module):
    return ([(n, type(m).__name__, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_unchanged(model: nn.Module, before) -> None:
    structure, tensors, flags = snapshot(model)
    assert structure == before[0]
    assert tensors.keys() == before[1].keys()
    assert all(torch.equal(tensors[k], before[1][k]) for k in tensors)
    assert flags == before[2]
    model(torch.randn(2, 8))  # and it still runs


def target_model() -> nn.Module:
    """q_proj already a LoRALinear (r=2), v_proj a plain Linear: both load paths."""
    torch.manual_seed(1)
    model = fp.apply_lora(Tiny(), ["q_proj"], r=2)
    model.head.weight.requires_grad_(True)  # a flag a failed load must not reset
    return model


@pytest.fixture
def lora_dir(tmp_path):
    source = fp.apply_lora(Tiny(), ["q_proj", "v_proj"], r=2, alpha=4)
    fp.save_adapter(source, tmp_path)
    return tmp_path


def rewrite(path, config=None, tensors=None):
    """Edit the saved files: config(dict) -> dict, tensors(dict) -> dict."""
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if config is not None:
        cfg_file.write_text(json.dumps(config(json.loads(cfg_file.read_text()))))
    if tensors is not None:
        save_file(tensors(load_file(w_file)), w_file)


def load_fails(path, error, match):
    model = target_model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fp.load_adapter(model, path)
    assert_unchanged(model, before)


def test_the_clean_file_loads(lora_dir):
    model = fp.load_adapter(target_model(), lora_dir)
    assert isinstance(model.v_proj, fp.LoRALinear) and model.v_proj.scaling == 2.0


# ------------------------------------------------------------------ item 2: keys inside an adapter


@pytest.mark.parametrize("inner", ["lora_A", "lora_B", "base_layer"])
def test_keys_naming_a_module_inside_an_adapter(lora_dir, inner):
    def add(t):
        t[f"{PREFIX}q_proj.{inner}.lora_A.weight"] = torch.zeros(2, 8 if inner != "lora_B" else 2)
        t[f"{PREFIX}q_proj.{inner}.lora_B.weight"] = torch.zeros(6 if inner != "lora_A" else 2, 2)
        return t

    rewrite(lora_dir, tensors=add)
    load_fails(lora_dir, ValueError, rf"weights for 'q_proj.{inner}', a module inside the LoRALinear 'q_proj'")


def test_key_naming_a_module_and_one_inside_it(tmp_path):
    class Nested(nn.Linear):
        def __init__(self):
            super().__init__(8, 6)
            self.inner = nn.Linear(8, 6)

    model = Tiny()
    model.q_proj = Nested()
    tensors = {f"{PREFIX}{n}.{w}.weight": torch.zeros(*s) for n in ("q_proj", "q_proj.inner")
               for w, s in (("lora_A", (2, 8)), ("lora_B", (6, 2)))}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    before = snapshot(model)
    with pytest.raises(ValueError, match="both 'q_proj' and 'q_proj.inner', a module inside it"):
        fp.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_two_names_of_one_module(tmp_path, lora_dir):
    model = Tiny()
    model.alias = model.v_proj
    rewrite(lora_dir, tensors=lambda t: {**t, **{k.replace("v_proj", "alias"): v.clone() for k, v in t.items()
                                                  if "v_proj" in k}})
    rewrite(lora_dir, tensors=lambda t: {k: v for k, v in t.items() if "q_proj" not in k})
    before = snapshot(model)
    with pytest.raises(ValueError, match="two names of one module"):
        fp.load_adapter(model, lora_dir)
    assert_unchanged(model, before)


def test_a_shared_module_gets_one_adapter_under_every_name(lora_dir):
    model = Tiny()
    model.alias = model.v_proj
    rewrite(lora_dir, tensors=lambda t: {k: v for k, v in t.items() if "q_proj" not in k})
    fp.load_adapter(model, lora_dir)
    assert isinstance(model.v_proj, fp.LoRALinear) and model.alias is model.v_proj


# ------------------------------------------------------------------ item 4: booleans and empty files


@pytest.mark.parametrize("field", ["use_rslora", "use_mora", "use_dora", "fan_in_fan_out"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1])
def test_config_booleans_must_be_booleans(lora_dir, field, value):
    rewrite(lora_dir, config=lambda c: {**c, field: value})
    load_fails(lora_dir, ValueError, rf"adapter_config.json: {field} = {value!r} \({type(value).__name__}\) is "
                                     rf"invalid; it must be true, false or null")


def test_a_file_without_tensors(lora_dir):
    rewrite(lora_dir, tensors=lambda t: {})
    load_fails(lora_dir, ValueError, r"adapter_model.safetensors holds no tensors")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float8_e4m3fn])
def test_non_float_tensors(lora_dir, dtype):
    rewrite(lora_dir, tensors=lambda t: {k: v.to(dtype) if "v_proj.lora_A" in k else v for k, v in t.items()})
    load_fails(lora_dir, ValueError, rf"adapter_model.safetensors: {PREFIX}v_proj.lora_A.weight has shape \(2, 8\) "
                                     rf"and dtype {dtype}")


@pytest.mark.parametrize("which,cut,shape", [("lora_A", lambda v: v[:0], r"\(0, 8\)"),
                                             ("lora_B", lambda v: v[0].clone(), r"\(2,\)")])
def test_empty_and_one_dimensional_tensors(lora_dir, which, cut, shape):
    rewrite(lora_dir, tensors=lambda t: {k: cut(v) if f"v_proj.{which}" in k else v for k, v in t.items()})
    load_fails(lora_dir, ValueError, rf"v_proj.{which}.weight has shape {shape}")


# ------------------------------------------------------------------ item 5: malformed config values

BAD_CONFIGS = [
    ({"r": -4}, r"r = -4 \(int\) is invalid; it must be a positive integer"),
    ({"r": 0}, r"r = 0 \(int\) is invalid"),
    ({"r": "8"}, r"r = '8' \(str\) is invalid"),
    ({"lora_alpha": "16"}, r"lora_alpha = '16' \(str\) is invalid; it must be a finite number"),
    ({"lora_alpha": True}, r"lora_alpha = True \(bool\) is invalid"),
    ({"lora_dropout": 1.5}, r"lora_dropout = 1.5 \(float\) is invalid; it must be a number in \[0, 1\)"),
    ({"alpha_pattern": ["v_proj"]}, r"alpha_pattern = \['v_proj'\] \(list\) is invalid"),
    ({"alpha_pattern": {"(": 4}}, r"alpha_pattern key '\(' is not a valid regular expression"),
    ({"alpha_pattern": {"v_proj": "4"}}, r"alpha_pattern\['v_proj'\] = '4' is invalid; it must be a finite number"),
    ({"rank_pattern": {"v_proj": 2.5}}, r"rank_pattern\['v_proj'\] = 2.5 is invalid; it must be a positive integer"),
]


@pytest.mark.parametrize("change,match", BAD_CONFIGS)
def test_malformed_config_values(lora_dir, change, match):
    rewrite(lora_dir, config=lambda c: {**c, **change})
    load_fails(lora_dir, ValueError, r"adapter_config.json: " + match)


@pytest.fixture
def mora_dir(tmp_path):
    source = fp.apply_mora(Tiny(), ["q_proj", "v_proj"], r=2, mora_type=1)
    fp.save_adapter(source, tmp_path)
    return tmp_path


@pytest.mark.parametrize("change,match", [
    ({"r": -4}, r"adapter_config.json: r = -4 \(int\) is invalid"),
    ({"r": 0}, r"adapter_config.json: r = 0 \(int\) is invalid"),
    ({"mora_type": True}, r"adapter_config.json: mora_type = True \(bool\) is invalid; it must be an integer in"),
    ({"mora_type": 1.0}, r"adapter_config.json: mora_type = 1.0 \(float\) is invalid"),
    ({"mora_type": 5}, r"adapter_config.json: mora_type = 5 \(int\) is invalid"),
    ({"r": 50}, r"module 'q_proj': r=50 gives r_hat=\d+ for in_features=8"),
])
def test_malformed_mora_config_values(mora_dir, change, match):
    rewrite(mora_dir, config=lambda c: {**c, **change})
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fp.load_adapter(model, mora_dir)
    assert_unchanged(model, before)


def test_mora_type_survives_fold_and_reset_through_the_adapter_files(tmp_path):
    """A state_dict records no mora_type (README: save_adapter does)."""
    model = fp.apply_mora(Tiny(), ["q_proj", "v_proj"], r=2, mora_type=1)
    for layer in (model.q_proj, model.v_proj):
        layer.fold_and_reset()
    fp.save_adapter(model, tmp_path)
    loaded = fp.load_adapter(Tiny(), tmp_path)
    assert loaded.q_proj.mora_type == 2 and loaded.v_proj.mora_type == 2


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", "must hold a JSON object"),
    ("{'r': 8", "is not valid JSON"),
])
def test_config_file_that_is_not_a_config(lora_dir, content, match):
    (lora_dir / "adapter_config.json").write_text(content)
    load_fails(lora_dir, ValueError, rf"adapter_config.json {match}")


@pytest.mark.parametrize("content", [b"\x80\x02}q\x00(K\x9eX", b"garbage", b""])
def test_garbage_weight_files(lora_dir, content):
    (lora_dir / "adapter_model.safetensors").unlink()
    (lora_dir / "adapter_model.bin").write_bytes(content)
    load_fails(lora_dir, ValueError, r"adapter_model.bin cannot be read as adapter weights")
    (lora_dir / "adapter_model.bin").unlink()
    (lora_dir / "adapter_model.safetensors").write_bytes(content)
    load_fails(lora_dir, ValueError, r"adapter_model.safetensors cannot be read as adapter weights")


def test_a_bin_file_that_is_not_a_dict_of_tensors(lora_dir):
    (lora_dir / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(2)], lora_dir / "adapter_model.bin")
    load_fails(lora_dir, ValueError, r"adapter_model.bin must hold a dict of name -> tensor, got list")


def test_a_malicious_pickle_is_blocked(lora_dir):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (lora_dir / "adapter_model.safetensors").unlink()
    torch.save({"x": Payload()}, lora_dir / "adapter_model.bin")
    load_fails(lora_dir, ValueError, r"adapter_model.bin cannot be read .*UnpicklingError")
