"""save_pretrained / Trainer checkpoints of a model with fusedpeft adapters.

An adapted transformers model's ``save_pretrained`` (what the Trainer calls for every checkpoint)
is replaced, per instance, by one that writes:

- ``config.json`` and ``model.safetensors`` with the base model's own key names
  (``...q_proj.weight``, not ``...q_proj.base_layer.weight``) plus the adapter tensors
  (``...q_proj.lora_A.weight`` / ``lora_B.weight``, MoRA's ``...M``);
- ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format (save_adapter).

So ``AutoModelForCausalLM.from_pretrained(checkpoint)`` loads the base weights and, through
transformers' PEFT integration (the adapter files sit next to config.json), the LoRA adapter: the
adapted model, never a silently re-initialised one; ``fp.load_adapter(base_model, checkpoint)`` and
``peft.PeftModel.from_pretrained(base_model, checkpoint)`` load the adapter alone; and the
Trainer's ``resume_from_checkpoint`` loads model.safetensors back into the adapted model (each
adapter layer maps ``weight`` / ``bias`` to its base layer on load, see AdapterLinear).
"""

from __future__ import annotations

import types

from torch import nn

from fusedpeft.fused import AdapterLinear


def _plain_keys(state_dict: dict, adapter_names: list[str]) -> dict:
    """state_dict with ``<layer>.base_layer.weight`` / ``.bias`` renamed ``<layer>.weight`` / ``.bias``."""
    renames = {f"{name}.base_layer.{p}": f"{name}.{p}" for name in adapter_names for p in ("weight", "bias")}
    return {renames.get(key, key): value for key, value in state_dict.items()}


def _save_pretrained(self, save_directory, *args, state_dict=None, is_main_process: bool = True, **kwargs):
    from fusedpeft.integrations.peft_io import save_adapter

    original = self._fusedpeft_save_pretrained
    adapters = [n for n, m in self.named_modules() if isinstance(m, AdapterLinear)]
    if not adapters:  # merge_adapters() put plain layers back: a plain checkpoint
        return original(save_directory, *args, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
    merged = [n for n in adapters if self.get_submodule(n).merged]
    if merged:
        raise ValueError(f"save_pretrained: adapter layers {merged[:3]} are merged (merge() folds the adapter into "
                         f"the base weight, so a checkpoint would apply it twice on load); call unmerge() on them, or "
                         f"fusedpeft.merge_adapters(model) to save a plain merged model")
    state = _plain_keys(self.state_dict() if state_dict is None else state_dict, adapters)
    result = original(save_directory, *args, state_dict=state, is_main_process=is_main_process, **kwargs)
    if is_main_process:
        save_adapter(self, save_directory)
    return result


def install_checkpointing(model: nn.Module) -> None:
    """Give ``model`` (when it has a transformers-style save_pretrained) the save_pretrained of this
    module's docstring; does nothing for other modules or when already installed."""
    if not hasattr(model, "save_pretrained") or "_fusedpeft_save_pretrained" in vars(model):
        return
    model._fusedpeft_save_pretrained = model.save_pretrained
    model.save_pretrained = types.MethodType(_save_pretrained, model)
