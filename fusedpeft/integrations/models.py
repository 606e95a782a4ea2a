"""Model-level adapters: apply_lora / apply_mora swap target nn.Linear layers of any model for the
fused layers; merge_adapters folds them back into plain nn.Linear layers (docs/contract.md §1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fusedpeft.fused import AdapterLinear
from fusedpeft.fused.lora import LoRALinear
from fusedpeft.fused.mora import MoRALinear
from fusedpeft.integrations.checkpoints import install_checkpointing
from fusedpeft.integrations.peft_config import adapter_arguments, layer_keywords
from fusedpeft.quantized import dense_linear, is_quantized

# Attention and MLP projections of common HF decoder models, matched as the last component(s) of a
# module's qualified name:
#   Llama, Mistral, Mixtral (attention), Qwen2/3, Gemma 1-3, OLMo, DeepSeek (dense), Phi (attention):
#       q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
#   Phi-3:                      qkv_proj o_proj gate_up_proj down_proj
#   Falcon, GPT-NeoX, BLOOM:    query_key_value dense_h_to_4h dense_4h_to_h
#   GPT-BigCode (StarCoder):    c_attn c_proj c_fc   (GPT-2 names these Conv1D, which is rejected)
#   Phi-1/2 MLP:                fc1 fc2
# Deliberately absent: generic names such as "dense", "out_proj" or "lm_head" that also name
# output heads or encoder layers; pass them in target_modules when you want them.
DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "qkv_proj", "gate_up_proj",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
    "c_attn", "c_proj", "c_fc",
    "fc1", "fc2",
)


def _check_targets(where: str, target_modules) -> tuple[str, ...]:
    if target_modules is None:
        return DEFAULT_TARGET_MODULES
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not isinstance(target_modules, Iterable):
        raise TypeError(f"{where}: target_modules must be None, a str or a list of str, got "
                        f"{type(target_modules).__name__}")
    targets = tuple(target_modules)
    bad = [t for t in targets if not isinstance(t, str) or not t or t.startswith(".") or t.endswith(".")]
    if bad or not targets:
        raise TypeError(f"{where}: target_modules must be non-empty module names such as 'q_proj' or "
                        f"'self_attn.q_proj', got {list(target_modules)!r}")
    return targets


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _replace_everywhere(model: nn.Module, module: nn.Module, new: nn.Module) -> None:
    """Put ``new`` under every name ``module`` is registered as (one nn.Linear registered twice, e.g.
    tied projections, gets one shared adapter, not an adapter under its first name only)."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is module and n]
    for name in names:
        _set_submodule(model, name, new)


def _find_targets(where: str, model: nn.Module, targets: tuple[str, ...],
                  explicit: bool) -> list[tuple[str, nn.Linear]]:
    """(qualified name, nn.Linear) of every target. Errors for adapted layers, PEFT layers, and (with
    explicit targets) non-Linear matches; the default targets skip non-Linear matches."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    found, skipped, inside_adapter = [], [], ()
    for name, module in model.named_modules():
        if inside_adapter and any(name.startswith(p + ".") for p in inside_adapter):
            continue
        if isinstance(module, AdapterLinear):
            inside_adapter += (name,)
            if _matches(name, targets):
                raise ValueError(f"{where}: module {name!r} is already a {type(module).__name__}; call "
                                 f"fusedpeft.merge_adapters(model) first or leave it out of target_modules")
            continue
        if not name or not _matches(name, targets):
            continue
        if type(module).__module__.startswith("peft.tuners."):
            raise TypeError(f"{where}: module {name!r} is a PEFT adapter layer ({type(module).__name__}); convert a "
                            f"PEFT LoRA model with fusedpeft.from_peft(model) instead")
        if isinstance(module, nn.Linear):
            found.append((name, module))
        elif explicit:
            raise TypeError(f"{where}: module {name!r} matches target_modules but is a {type(module).__name__}, "
                            f"not a torch.nn.Linear (GPT-2's Conv1D stores a transposed weight and is not "
                            f"supported); drop it from target_modules")
        else:
            skipped.append(f"{name} ({type(module).__name__})")
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        names = sorted({n.rpartition(".")[2] for n in linear})
        not_linear = f"; matching modules that are not nn.Linear: {skipped[:5]}" if skipped else ""
        raise ValueError(f"{where}: no torch.nn.Linear in the model matches target_modules={list(targets)}; the "
                         f"model's Linear layers end with {names[:20]}{' ...' if len(names) > 20 else ''}"
                         f"{not_linear}")
    return found


def _swap_in(where: str, model: nn.Module, target_modules, make) -> nn.Module:
    """Build every adapter first (so a bad argument leaves the model unchanged), then swap and freeze."""
    targets = _check_targets(where, target_modules)
    found = _find_targets(where, model, targets, explicit=target_modules is not None)
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    try:
        built = []
        for name, linear in found:
            try:
                built.append((name, make(linear)))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: layer {name!r} ({linear.in_features}->{linear.out_features}): {e}") from e
    except BaseException:
        for p, flag in grad_state:
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    for (name, linear), (_, adapter) in zip(found, built):
        _replace_everywhere(model, linear, adapter)
    unfreeze_adapters(model)
    _mark_adapters_for_transformers(model, True)
    return model


# transformers' Trainer refuses a quantized model ("purely quantized") unless it carries adapters,
# which it recognises by this attribute (set when PEFT adapters are loaded through transformers).
_HF_ADAPTER_FLAG = "_hf_peft_config_loaded"


def _mark_adapters_for_transformers(model: nn.Module, adapted: bool) -> None:
    """Set (or, after merging, clear) transformers' adapter flag on a quantized HF model, so its
    Trainer trains the adapters; only a flag fusedpeft set itself is cleared."""
    if adapted and getattr(model, "is_quantized", False) and not getattr(model, _HF_ADAPTER_FLAG, False):
        setattr(model, _HF_ADAPTER_FLAG, True)
        model._fusedpeft_set_adapter_flag = True
    elif not adapted and getattr(model, "_fusedpeft_set_adapter_flag", False):
        setattr(model, _HF_ADAPTER_FLAG, False)
        del model._fusedpeft_set_adapter_flag


def unfreeze_adapters(model: nn.Module) -> None:
    """requires_grad on every adapter parameter of the model's fused layers (never their base layer),
    and a checkpoint-safe save_pretrained on a transformers model (integrations/checkpoints.py)."""
    install_checkpointing(model)
    for module in model.modules():
        if isinstance(module, AdapterLinear):
            for pname, param in module.named_parameters():
                if not pname.startswith("base_layer."):
                    param.requires_grad_(True)


def apply_lora(model: nn.Module, target_modules=None, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
               **kw) -> nn.Module:
    """Replace every target nn.Linear of ``model`` by a LoRALinear wrapping it, freeze everything else.

    Args:
        model: any nn.Module (an HF *ForCausalLM, a plain stack of layers, ...); modified in place.
        target_modules: None (DEFAULT_TARGET_MODULES: the attention and MLP projections of HF
            decoder models), a name, or a list of names; a module is a target when its qualified
            name equals a name or ends with "." + name ("q_proj", "self_attn.q_proj", ...).
            A peft.LoraConfig here stands for target_modules, r, lora_alpha, lora_dropout,
            use_rslora, use_dora and init_lora_weights (options fusedpeft lacks raise ValueError).
        r, alpha, dropout: rank, scaling numerator and adapter dropout p (docs/contract.md §2); PEFT's names
            lora_alpha / lora_dropout are accepted for alpha / dropout.
        **kw: passed to LoRALinear: use_rslora, init ("kaiming" / "gaussian"), backend, use_dora
            (DoRA: adds a trainable magnitude lora_magnitude_vector [out] per layer).
    Returns the same model. Adapter weights lora_A [r, in] / lora_B [out, r] live on each base
    weight's device, in float32 next to a 16-bit base weight, else in the base dtype; they are
    the only parameters left with requires_grad=True.
    Raises ValueError when nothing matches (listing the model's Linear names) or a target is
    already adapted; TypeError for bad target_modules, a PEFT layer, or a non-Linear module
    matching explicit target_modules (the default list skips those, e.g. GPT-2's Conv1D).
    """
    return _apply_adapter("fusedpeft.apply_lora", model, LoRALinear,
                          dict(target_modules=None, r=8, alpha=8.0, dropout=0.0),
                          dict(target_modules=target_modules, r=r, alpha=alpha, dropout=dropout), kw)


def apply_mora(model: nn.Module, target_modules=None, r: int = 8, mora_type: int = 6, dropout: float = 0.0,
               **kw) -> nn.Module:
    """Replace every target nn.Linear of ``model`` by a MoRALinear wrapping it, freeze everything else.

    Args: as apply_lora; r is the LoRA rank whose parameter count each layer's M [r_hat, r_hat]
    matches (r_hat per layer, docs/contract.md §3); mora_type in {1, 2, 3, 4, 6}; **kw: backend.
    Returns the same model; M is zero-initialised on the base weight's device (float32 next to a
    16-bit base weight). A layer for which r gives an invalid r_hat raises ValueError naming it,
    before any layer is swapped.
    """
    return _apply_adapter("fusedpeft.apply_mora", model, MoRALinear,
                          dict(target_modules=None, r=8, mora_type=6, dropout=0.0),
                          dict(target_modules=target_modules, r=r, mora_type=mora_type, dropout=dropout), kw)


def _apply_adapter(where: str, model: nn.Module, layer_class: type[AdapterLinear], defaults: dict, given: dict,
                   kw: dict) -> nn.Module:
    """apply_lora / apply_mora: ``given`` holds the named arguments as called, ``defaults`` their
    defaults, ``kw`` the rest; the checked arguments (adapter_arguments) build one ``layer_class``
    per target Linear."""
    args = adapter_arguments(where, given, defaults, kw, layer_keywords(layer_class, defaults))
    target_modules = args.pop("target_modules")

    def make(base: nn.Linear) -> AdapterLinear:
        return layer_class(base, **args)

    return _swap_in(where, model, target_modules, make)


@torch.no_grad()
def merge_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every LoRALinear / MoRALinear of ``model`` into its base weight (W += ΔW in W's dtype) and
    put the plain nn.Linear back in its place. Returns the model (the base nn.Linear itself when
    ``model`` is a single adapter layer). Parameter requires_grad flags are left as they are (the
    base weights stay frozen). Outputs equal the adapted model's with dropout off, up to rounding
    of W's dtype. Raises ValueError when the model holds no adapter layer.

    Quantized bases (bitsandbytes 4-bit / 8-bit): by default W + ΔW is re-quantized with the layer's
    own settings (PEFT's behaviour; warns: the sum is rounded to the quantization grid, so outputs
    differ from the adapted model's by about one quantization step of ΔW's size). With
    ``dequantize=True`` such a layer becomes a plain nn.Linear holding the dequantized W + ΔW in the
    dtype the weight was quantized from (4-bit) or float16 (8-bit): no re-quantization rounding.
    """
    if isinstance(model, AdapterLinear):
        return _merged_base(model, dequantize)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedpeft.merge_adapters: model must be a torch.nn.Module, got {type(model).__name__}")
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    if not adapters:
        raise ValueError(f"fusedpeft.merge_adapters: {type(model).__name__} holds no LoRALinear / MoRALinear layer "
                         f"(apply_lora / apply_mora / load_adapter add them)")
    for name, layer in adapters:
        _replace_everywhere(model, layer, _merged_base(layer, dequantize))
    _mark_adapters_for_transformers(model, False)
    return model


def _merged_base(layer: AdapterLinear, dequantize: bool) -> nn.Module:
    """The layer's base with its adapter folded in (an nn.Linear for a quantized base when dequantize)."""
    if dequantize and is_quantized(layer.base_layer):
        return dense_linear(layer.base_layer, None if layer.merged else layer.delta_weight())
    if not layer.merged:
        layer.merge()
    return layer.base_layer
