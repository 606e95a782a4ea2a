"""The "torch" backend: optimised PyTorch implementations of every op family (any device)."""
