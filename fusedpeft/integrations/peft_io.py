"""PEFT interop: from_peft (a PEFT LoRA model's layers as LoRALinear, same tensors) and save_adapter /
load_adapter in PEFT's on-disk format (docs/contract.md §1).

On disk (a directory):
  adapter_config.json          PEFT's LoraConfig fields: peft_type "LORA", r, lora_alpha, lora_dropout,
                               use_rslora, target_modules (here: the full module names), rank_pattern,
                               alpha_pattern; MoRA adds "use_mora": true and "mora_type" (the format of
                               the MoRA reference's PEFT fork, where r is the LoRA rank and each layer's
                               r_hat follows from its shape).
  adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r];
                               DoRA ("use_dora": true) adds base_model.model.<module>.lora_magnitude_vector [out];
                               for MoRA only .lora_A.weight = M [r_hat, r_hat] (the fork aliases lora_B to
                               M, so a fork file's lora_B copy is accepted when it equals lora_A).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from collections import Counter

import torch
from torch import nn

from fusedpeft.core.lora import lora_scaling
from fusedpeft.core.mora import MORA_TYPES
from fusedpeft.fused import FLOAT_DTYPES, AdapterLinear
from fusedpeft.fused.lora import LoRALinear
from fusedpeft.fused.mora import MoRALinear, _checked_r_hat
from fusedpeft.integrations.checkpoints import install_checkpointing
from fusedpeft.integrations.models import _replace_everywhere, _set_submodule, unfreeze_adapters
from fusedpeft.quantized import is_quantized

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?:(?P<which>lora_A|lora_B)\.weight|"
                  r"(?P<magnitude>lora_magnitude_vector))$")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper (its names carry a "module." prefix)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name it ends (regex, dot-bounded)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_dora_scale(module, adapter: str):
    """None for a plain LoRA layer; for a DoRA layer m / n of PEFT's merge when merged (PEFT caches n
    at merge time), False when merged without that cache, else True."""
    if not (module.use_dora.get(adapter) or adapter in module.lora_magnitude_vector):
        return None
    if not module.merged:
        return True
    norm = getattr(module, "_caches", {}).get(f"{adapter}-weight_norm")
    if norm is None:
        return False
    return module.lora_magnitude_vector[adapter].weight.detach() / norm


# --------------------------------------------------------------------------------------------
# from_peft
# --------------------------------------------------------------------------------------------


def from_peft(peft_model) -> nn.Module:
    """Swap every LoRA layer of a PEFT model for a LoRALinear sharing its tensors; returns the base model.

    Args:
        peft_model: a peft.PeftModel or peft.tuners.lora.LoraModel with exactly one LoRA adapter,
            whose LoRA layers wrap plain nn.Linear layers or bitsandbytes Linear4bit / Linear8bitLt
            (PEFT's QLoRA layers) (DoRA included, on plain nn.Linear bases; no lora_bias, no
            modules_to_save, no Embedding / Conv / quantized / Conv1D (fan_in_fan_out) layers).
    Returns the underlying transformers (or other) model, modified in place: each PEFT LoRA layer
    is replaced by a LoRALinear whose base_layer, lora_A and lora_B are PEFT's own modules (the
    same Parameters: base weight [out, in], lora_A.weight [r, in], lora_B.weight [out, r]), with
    PEFT's scaling (alpha/r or rsLoRA, rank/alpha patterns included), dropout p and merged state;
    a DoRA layer becomes LoRALinear(use_dora=True) sharing PEFT's magnitude Parameter [out].
    requires_grad flags are kept. The PEFT wrapper must not be used afterwards. With dropout 0
    outputs and gradients equal PEFT's; with p > 0 the mask comes from docs/contract.md §5's Philox stream
    instead of torch's dropout RNG.
    """
    where = "fusedpeft.from_peft"
    try:
        from peft import PeftModel
        from peft.tuners.lora import Linear as PeftLoraLinear
        from peft.tuners.lora import LoraLayer, LoraModel
    except ImportError as e:  # pragma: no cover - peft is a test dependency here
        raise ImportError(f"{where}: needs the peft package ({e})") from e
    lora_model = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    if not isinstance(lora_model, LoraModel):
        raise TypeError(f"{where}: peft_model must be a peft.PeftModel / LoraModel holding a LoRA adapter, got "
                        f"{type(peft_model).__name__} (tuner {type(lora_model).__name__})")
    if len(lora_model.peft_config) != 1:
        raise ValueError(f"{where}: the PEFT model holds adapters {sorted(lora_model.peft_config)}, but exactly one is "
                         f"supported; delete the others with peft_model.delete_adapter(name)")
    (adapter, config), = lora_model.peft_config.items()
    for option, bad in (("lora_bias", True), ("fan_in_fan_out", True)):
        if getattr(config, option, False) == bad:
            raise ValueError(f"{where}: adapter {adapter!r} has {option}=True, which LoRALinear does not implement")
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"{where}: adapter {adapter!r} has modules_to_save={config.modules_to_save}, which has no "
                         f"fusedpeft equivalent; train those modules directly instead")
    inner = lora_model.model

    converted = []
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        kind = type(module).__name__
        peft_qlora = type(module).__module__.endswith("lora.bnb") and is_quantized(module.get_base_layer())
        if not (isinstance(module, PeftLoraLinear) or peft_qlora) or not isinstance(module.get_base_layer(), nn.Linear):
            raise TypeError(f"{where}: LoRA layer {name!r} is a {kind} over a "
                            f"{type(module.get_base_layer()).__name__}; only LoRA on plain torch.nn.Linear "
                            f"layers and on bitsandbytes 4-bit / 8-bit layers can be converted")
        if module.active_adapters != [adapter] or module.disable_adapters:
            raise ValueError(f"{where}: LoRA layer {name!r} has active adapters {module.active_adapters} "
                             f"(disabled={module.disable_adapters}); exactly {adapter!r} must be active")
        if _peft_dora_scale(module, adapter) is False:
            raise ValueError(f"{where}: DoRA layer {name!r} is merged, and PEFT kept no norm of its unmerged weight; "
                             f"unmerge it in PEFT first")
        if module.lora_B[adapter].bias is not None:
            raise ValueError(f"{where}: LoRA layer {name!r} has a lora_B bias, which LoRALinear does not implement")
        if module.base_layer is not module.get_base_layer():
            raise TypeError(f"{where}: LoRA layer {name!r} wraps a nested adapter layer; only one level is supported")
        converted.append((name, module))
    if not converted:
        raise ValueError(f"{where}: the PEFT model has no LoRA layers")

    for name, module in converted:
        drop = module.lora_dropout[adapter]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        dora_scale = _peft_dora_scale(module, adapter)
        fused = LoRALinear(module.get_base_layer(), r=module.r[adapter], alpha=module.lora_alpha[adapter],
                           dropout=p, use_rslora=bool(getattr(config, "use_rslora", False)),
                           use_dora=dora_scale is not None)
        fused.lora_A, fused.lora_B = module.lora_A[adapter], module.lora_B[adapter]
        if dora_scale is not None:
            fused.lora_magnitude_vector = module.lora_magnitude_vector[adapter].weight
            fused._dora_merge_scale = dora_scale if module.merged else None
        fused.scaling = float(module.scaling[adapter])
        fused.merged = bool(module.merged)
        _set_submodule(inner, name, fused)
    leftovers = sorted({type(m).__name__ for m in inner.modules() if type(m).__module__.startswith("peft.")})
    if leftovers:
        raise TypeError(f"{where}: after conversion the model still holds PEFT modules {leftovers} (LoRA layers were "
                        f"converted, these were not)")
    install_checkpointing(inner)
    return inner


# --------------------------------------------------------------------------------------------
# save_adapter
# --------------------------------------------------------------------------------------------


def _common(values: dict[str, object]):
    """(the most common value, {name: value} for the layers that differ) — PEFT's r + rank_pattern layout."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(n): v for n, v in values.items() if v != common}


def _lora_alpha(layer: LoRALinear) -> float:
    """The alpha that PEFT's formula turns into this layer's scaling (which from_peft may have carried over)."""
    if math.isclose(lora_scaling(layer.r, layer.alpha, layer.use_rslora), layer.scaling, rel_tol=1e-12):
        return layer.alpha
    return layer.scaling * (math.sqrt(layer.r) if layer.use_rslora else layer.r)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters of ``model`` (all LoRALinear, or all MoRALinear) to the directory ``path``.

    The files (adapter_config.json, adapter_model.safetensors; see the module docstring) load
    with peft.PeftModel.from_pretrained(base_model, path) for LoRA and with load_adapter for both
    kinds. Module names are those of ``model`` (a DistributedDataParallel wrapper is looked
    through), so save and load with the same architecture. Tensors are saved in their dtype on
    CPU. Raises ValueError when the model holds no adapters, mixes LoRA and MoRA, mixes rsLoRA
    and plain scaling, or mixes MoRA types.
    """
    where = "fusedpeft.save_adapter"
    model = _unwrap(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    if not layers:
        raise ValueError(f"{where}: {type(model).__name__} holds no LoRALinear / MoRALinear layer")
    kinds = {type(m).__name__ for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"{where}: the model mixes adapter kinds {sorted(kinds)}; one file holds one kind")
    dropouts = {n: m.dropout for n, m in layers.items()}
    dropout, differing = _common(dropouts)
    if differing:
        warnings.warn(f"{where}: layers use different dropout p; PEFT stores one, {dropout} is saved", stacklevel=2)
    r, rank_pattern = _common({n: m.r for n, m in layers.items()})
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r, "rank_pattern": rank_pattern, "lora_dropout": dropout, "target_modules": sorted(layers),
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    if kinds == {"LoRALinear"}:
        rslora = {m.use_rslora for m in layers.values()}
        if len(rslora) != 1:
            raise ValueError(f"{where}: some layers use rsLoRA scaling and some do not; PEFT stores one use_rslora")
        dora = {m.use_dora for m in layers.values()}
        if len(dora) != 1:
            raise ValueError(f"{where}: some layers use DoRA and some do not; PEFT stores one use_dora")
        alpha, alpha_pattern = _common({n: _lora_alpha(m) for n, m in layers.items()})
        config.update(lora_alpha=alpha, alpha_pattern=alpha_pattern, use_rslora=rslora.pop(), use_dora=dora.pop())
        for n, m in layers.items():
            tensors[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.weight
            tensors[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.weight
            if m.use_dora:
                tensors[f"{PREFIX}{n}.lora_magnitude_vector"] = m.lora_magnitude_vector
    else:
        types = {m.mora_type for m in layers.values()}
        if len(types) != 1:
            raise ValueError(f"{where}: layers use different mora_type {sorted(types)}; the format stores one")
        config.update(use_mora=True, mora_type=types.pop(), lora_alpha=r, alpha_pattern={}, use_rslora=False)
        for n, m in layers.items():
            tensors[f"{PREFIX}{n}.lora_A.weight"] = m.M
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, os.path.join(path, WEIGHTS_NAME),
              metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------
# load_adapter
# --------------------------------------------------------------------------------------------


def _read(where: str, path) -> tuple[dict, dict[str, torch.Tensor], str, str]:
    """(config, tensors, config file, weights file), each file parsed or a ValueError naming it."""
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{where}: {config_file} does not exist; path must be a directory written by "
                                f"save_adapter or PEFT's save_pretrained")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: {config_file} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {config_file} must hold a JSON object (PEFT's LoraConfig fields), got a "
                         f"{type(config).__name__}")
    weights_file = os.path.join(path, WEIGHTS_NAME)
    try:
        if os.path.isfile(weights_file):
            from safetensors.torch import load_file

            tensors = load_file(weights_file)
        elif os.path.isfile(os.path.join(path, WEIGHTS_NAME_BIN)):
            weights_file = os.path.join(path, WEIGHTS_NAME_BIN)
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{where}: neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN} exists in {path}")
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors / unpickling errors of a damaged or hostile file
        raise ValueError(f"{where}: {weights_file} cannot be read as adapter weights ({type(e).__name__}: {e})") from e
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{where}: {weights_file} must hold a dict of name -> tensor, got {type(tensors).__name__}")
    return config, tensors, config_file, weights_file


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _config_value(where: str, config_file: str, config: dict, field: str, default, ok, need: str):
    """config[field] (default when absent) after ``ok(value)``; else ValueError naming the field and file."""
    value = config.get(field, default)
    if not ok(value):
        raise ValueError(f"{where}: {config_file}: {field} = {value!r} ({type(value).__name__}) is invalid; it must "
                         f"be {need}")
    return value


def _pattern(where: str, config_file: str, config: dict, field: str, ok, need: str) -> dict:
    patterns = _config_value(where, config_file, config, field, None, lambda v: v is None or isinstance(v, dict),
                             "an object mapping module-name patterns to values")
    for key, value in (patterns or {}).items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(f"{where}: {config_file}: {field} key {key!r} is not a valid regular expression ({e})") \
                from None
        if not ok(value):
            raise ValueError(f"{where}: {config_file}: {field}[{key!r}] = {value!r} is invalid; it must be {need}")
    return patterns or {}


def _check_config(where: str, config_file: str, config: dict) -> dict:
    """The fields load_adapter reads, type-checked (booleans are JSON true / false, never strings)."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: adapter_config.json has peft_type={config.get('peft_type')!r}; only LoRA "
                         f"adapters (peft_type 'LORA', MoRA with use_mora) can be loaded")
    flags = {}
    for field in ("use_rslora", "use_mora", "use_dora", "lora_bias", "fan_in_fan_out"):
        flags[field] = bool(_config_value(where, config_file, config, field, False,
                                          lambda v: v is None or isinstance(v, bool), "true, false or null"))
    if flags["use_dora"] and flags["use_mora"]:
        raise ValueError(f"{where}: {config_file} has both use_dora and use_mora; fusedpeft's DoRA is LoRA's")
    for option in ("lora_bias", "fan_in_fan_out"):
        if flags[option]:
            raise ValueError(f"{where}: the adapter has {option}=True, which fusedpeft does not implement")
    if config.get("modules_to_save"):
        raise ValueError(f"{where}: the adapter has modules_to_save={config['modules_to_save']}, which fusedpeft "
                         f"does not load")
    positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    checked = dict(
        use_mora=flags["use_mora"], use_rslora=flags["use_rslora"], use_dora=flags["use_dora"],
        r=_config_value(where, config_file, config, "r", 8, positive_int, "a positive integer"),
        lora_alpha=float(_config_value(where, config_file, config, "lora_alpha", 8, _is_real, "a finite number")),
        lora_dropout=float(_config_value(where, config_file, config, "lora_dropout", 0.0,
                                         lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)")),
        rank_pattern=_pattern(where, config_file, config, "rank_pattern", positive_int, "a positive integer"),
        alpha_pattern=_pattern(where, config_file, config, "alpha_pattern", _is_real, "a finite number"),
    )
    if checked["use_mora"]:
        checked["mora_type"] = _config_value(where, config_file, config, "mora_type", 1,
                                             lambda v: isinstance(v, int) and not isinstance(v, bool)
                                             and v in MORA_TYPES, f"an integer in {MORA_TYPES}")
    return checked


def _group(where: str, weights_file: str, tensors: dict[str, torch.Tensor], use_mora: bool,
           use_dora: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    if not tensors:
        raise ValueError(f"{where}: {weights_file} holds no tensors; an adapter file needs "
                         f"'{PREFIX}<module>.lora_A.weight' entries")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None or (match["magnitude"] and not use_dora):
            hint = (" (DoRA), while adapter_config.json has no use_dora=true" if "lora_magnitude_vector" in key
                    else " (LoRA on an Embedding)" if "lora_embedding" in key
                    else " (lora_bias)" if key.endswith("lora_B.bias") else "")
            raise ValueError(f"{where}: unexpected key {key!r} in the adapter file{hint}; expected only "
                             f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
                             + (" / '.lora_magnitude_vector'" if use_dora else ""))
        dims = 1 if match["magnitude"] else 2
        if value.dtype not in FLOAT_DTYPES or value.dim() != dims or 0 in value.shape:
            raise ValueError(f"{where}: {weights_file}: {key} has shape {tuple(value.shape)} and dtype {value.dtype}; "
                             f"it must be a non-empty {dims}-D float16 / bfloat16 / float32 / float64 tensor")
        groups.setdefault(match["module"], {})[match["which"] or "magnitude"] = value
    for name, pair in groups.items():
        if use_mora:
            if "lora_A" not in pair:
                raise ValueError(f"{where}: missing key '{PREFIX}{name}.lora_A.weight' (MoRA's M)")
            if "lora_B" in pair and not torch.equal(pair["lora_B"], pair["lora_A"]):
                raise ValueError(f"{where}: MoRA module {name!r} has a lora_B.weight different from lora_A.weight; "
                                 f"the MoRA format stores M once (lora_B aliases lora_A)")
        else:
            for which in ("lora_A", "lora_B"):
                if which not in pair:
                    raise ValueError(f"{where}: missing key '{PREFIX}{name}.{which}.weight'")
            if use_dora and "magnitude" not in pair:
                raise ValueError(f"{where}: missing key '{PREFIX}{name}.lora_magnitude_vector' (use_dora=true)")
    return groups


def _target(where: str, model: nn.Module, name: str, names: set[str]) -> nn.Module:
    """The module a file key names: it exists, is an nn.Linear / adapter layer, and lies inside no
    adapter layer or other named module (keys such as '<module>.lora_A.lora_A.weight' are refused)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        try:
            outer = model.get_submodule(prefix)
        except AttributeError:
            break
        if isinstance(outer, AdapterLinear):
            raise ValueError(f"{where}: the file has weights for {name!r}, a module inside the "
                             f"{type(outer).__name__} {prefix!r}; keys must name target layers "
                             f"('{PREFIX}{prefix}.lora_A.weight'), not parts of an adapter")
        if prefix in names:
            raise ValueError(f"{where}: the file has weights for both {prefix!r} and {name!r}, a module inside it")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: the file has weights for module {name!r}, which the model "
                         f"({type(model).__name__}) does not have; load into the architecture it was saved "
                         f"from") from None


def _plan_lora(where, name, module, pair, config):
    """(layer to install or None when adapting in place, alpha, use_rslora) after shape checks."""
    A, B = pair["lora_A"], pair["lora_B"]
    base = module.base_layer if isinstance(module, AdapterLinear) else module
    r = A.shape[0]
    if A.shape[1] != base.in_features or tuple(B.shape) != (base.out_features, r):
        raise ValueError(f"{where}: module {name!r} is {base.in_features}->{base.out_features}, but the file has "
                         f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; they need [r, {base.in_features}] and "
                         f"[{base.out_features}, r] (same architecture as when saved?)")
    use_dora = config["use_dora"]
    if use_dora and pair["magnitude"].shape[0] != base.out_features:
        raise ValueError(f"{where}: module {name!r} is {base.in_features}->{base.out_features}, but the file has "
                         f"lora_magnitude_vector {tuple(pair['magnitude'].shape)}; it needs [{base.out_features}]")
    alpha = float(_pattern_value(config["alpha_pattern"], name, config["lora_alpha"]))
    rslora = config["use_rslora"]
    if isinstance(module, AdapterLinear):
        if module.r != r:
            raise ValueError(f"{where}: module {name!r} is a LoRALinear with r={module.r}, the file has r={r}")
        if module.use_dora != use_dora:
            raise ValueError(f"{where}: module {name!r} is a LoRALinear with use_dora={module.use_dora}, the file has "
                             f"use_dora={use_dora}")
        return None, alpha, rslora
    return LoRALinear(module, r=r, alpha=alpha, dropout=config["lora_dropout"], use_rslora=rslora,
                      use_dora=use_dora), alpha, rslora


def _plan_mora(where, name, module, pair, config):
    M = pair["lora_A"]
    base = module.base_layer if isinstance(module, AdapterLinear) else module
    mora_type = config["mora_type"]
    r = _pattern_value(config["rank_pattern"], name, config["r"])
    r_hat = _checked_r_hat(f"{where}: module {name!r}", base.in_features, base.out_features, r, mora_type)
    if tuple(M.shape) != (r_hat, r_hat):
        raise ValueError(f"{where}: module {name!r} ({base.in_features}->{base.out_features}) at r={r}, "
                         f"mora_type={mora_type} needs M [{r_hat}, {r_hat}], but the file has {tuple(M.shape)}")
    if isinstance(module, AdapterLinear):
        if module.r_hat != r_hat:
            raise ValueError(f"{where}: module {name!r} is a MoRALinear with r_hat={module.r_hat}, the file has "
                             f"{r_hat}")
        return None, mora_type, None
    return MoRALinear(module, r=r, mora_type=mora_type, dropout=config["lora_dropout"]), mora_type, None


def _warn_unloaded_targets(where: str, model: nn.Module, groups: dict, config: dict) -> None:
    """Warn about Linear layers of the model named like the file's targets (same last name, e.g.
    q_proj) that get no weights: a 2-layer adapter loaded into a 3-layer model adapts 2 of them."""
    if config.get("layers_to_transform") is not None:
        return
    leaves = {name.rpartition(".")[2] for name in groups}
    missing = [n for n, m in model.named_modules() if n not in groups and n.rpartition(".")[2] in leaves
               and isinstance(m, (nn.Linear, AdapterLinear)) and not n.endswith(".base_layer")]
    if missing:
        warnings.warn(f"{where}: partial load: {len(missing)} layer(s) of the model named like the adapter's "
                      f"targets get no weights and stay unadapted: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                      f" (the file adapts {len(groups)}); was it saved from a different architecture?", stacklevel=3)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter directory (save_adapter's or PEFT's save_pretrained's) into ``model``; returns it.

    Each module named in the file must exist in ``model``: a plain nn.Linear is wrapped in a new
    LoRALinear / MoRALinear (r from the tensors, alpha from lora_alpha / alpha_pattern, use_rslora,
    lora_dropout, use_dora with the magnitude; MoRA: r / rank_pattern and mora_type from the
    config); an existing adapter layer of the same kind and shape gets the weights copied in (and
    the file's scaling / mora_type).
    Then everything but the adapters is frozen, as apply_lora does. Tensors are copied to each
    layer's device and adapter dtype. Every check runs before the model is changed, and a failed
    load leaves it as it was: config fields read (booleans must be JSON true / false, r and
    rank_pattern positive ints, lora_alpha / alpha_pattern finite numbers, patterns valid regexes,
    lora_dropout in [0, 1), mora_type in 1-4, 6), keys (each names a target nn.Linear or adapter
    layer, never a module inside an adapter), tensors (at least one; non-empty 2-D float), shapes,
    and adapter layers of the model left without weights. Errors are ValueError naming the
    field or key and the file. Linear layers named like the file's targets that get no weights
    (a partial load) are named in a UserWarning.
    """
    where = f"fusedpeft.load_adapter({os.fspath(path)!r})"
    raw, tensors, config_file, weights_file = _read(where, path)
    config = _check_config(where, config_file, raw)
    use_mora = config["use_mora"]
    groups = _group(where, weights_file, tensors, use_mora, config["use_dora"])
    model = _unwrap(model)
    _warn_unloaded_targets(where, model, groups, raw)
    want = MoRALinear if use_mora else LoRALinear
    existing = {n for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    if existing - set(groups):
        raise ValueError(f"{where}: the file has no weights for the model's adapter layers "
                         f"{sorted(existing - set(groups))[:5]}")
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    plans, seen = [], {}
    try:
        for name, pair in groups.items():
            module = _target(where, model, name, set(groups))
            if id(module) in seen:
                raise ValueError(f"{where}: the file has weights for {seen[id(module)]!r} and {name!r}, two names of "
                                 f"one module; keep one")
            seen[id(module)] = name
            if isinstance(module, AdapterLinear) and not isinstance(module, want):
                raise ValueError(f"{where}: module {name!r} is a {type(module).__name__} but the file holds a "
                                 f"{want.__name__} adapter")
            if isinstance(module, AdapterLinear) and module.merged:
                raise ValueError(f"{where}: module {name!r} is merged; unmerge() it before loading new weights")
            if not isinstance(module, (nn.Linear, AdapterLinear)):
                raise TypeError(f"{where}: module {name!r} is a {type(module).__name__}, not a torch.nn.Linear")
            plan = _plan_mora if use_mora else _plan_lora
            plans.append((name, module, pair, *plan(where, name, module, pair, config)))
    except BaseException:
        for p, flag in grad_state:
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    for name, module, pair, new, setting, rslora in plans:
        layer = new if new is not None else module
        if use_mora:
            layer.M.copy_(pair["lora_A"])
            layer.mora_type = setting
        else:
            layer.lora_A.weight.copy_(pair["lora_A"])
            layer.lora_B.weight.copy_(pair["lora_B"])
            if "magnitude" in pair:
                layer.lora_magnitude_vector.copy_(pair["magnitude"])
            layer.alpha, layer.use_rslora = setting, rslora
            layer.scaling = lora_scaling(layer.r, setting, rslora)
        if new is not None:
            _replace_everywhere(model, module, new)
    unfreeze_adapters(model)
    return model
