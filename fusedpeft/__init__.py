"""fusedpeft: fused LoRA / MoRA linear layers and masked / weighted cross-entropy for fine-tuning."""

__version__ = "0.1.0"
