"""Glue for transformers / PEFT / Trainer: apply_lora / apply_mora / merge_adapters (models),
from_peft / save_adapter / load_adapter (peft_io), patch_causal_lm (causal_lm),
InstructionCollator (collator), ReMoRACallback (remora), group_lora_projections (lora_grouped).
Import from ``fusedpeft`` (lazily resolved) or from the submodules."""
