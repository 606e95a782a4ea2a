"""Comparison helpers (docs/architecture.md §5): an implementation's error against a float64 reference must be
within twice the error of plain PyTorch doing the same computation in the same dtype, plus atol."""

from __future__ import annotations

import torch

# (dtype, atol) pairs used across the parity tests; atol only absorbs the last-bit noise of sums.
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_within(actual, expected64, baseline, atol: float, name: str = "output") -> None:
    """max|actual - expected64| <= 2 max|baseline - expected64| + atol * max(1, max|expected64|).

    atol is relative to the values' scale so one rounding step of a large value does not fail."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    err = max_error(actual, expected64)
    scale = max(1.0, expected64.abs().max().item()) if expected64.numel() else 1.0
    bound = 2 * max_error(baseline, expected64) + atol * scale
    assert err <= bound, f"{name}: max error {err:.3e} exceeds bound {bound:.3e} (2 x same-dtype PyTorch + atol)"


def grads(output: torch.Tensor, inputs, grad_output: torch.Tensor):
    """Gradients of <output, grad_output> wrt inputs (None where an input gets none)."""
    return torch.autograd.grad(output, inputs, grad_output, allow_unused=True)


def runnable(family: str, device: str = "cpu") -> list[str]:
    """Backends implementing ``family`` that can run on ``device`` here."""
    from fusedpeft.backends import IMPLEMENTATIONS, unavailable_reason

    names = list(dict.fromkeys(b for (f, b) in IMPLEMENTATIONS if f == family))
    return [b for b in names if unavailable_reason(b, family, torch.device(device)) is None]
