"""Glue for transformers / PEFT / Trainer (apply_lora, patch_causal_lm, ...). None yet."""
