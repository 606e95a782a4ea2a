"""The backends the independent-oracle tests (tests/test_spec_*.py) run on: every one that can run here.

The spec tests call the public API with ``backend=None``, so their whole case grids run on the
automatic backend (the one a user gets; FUSEDPEFT_BACKEND, if set, chooses it). ``other_backends``
lists every other backend that can run on CPU tensors here (torch, cpu, and triton under the
interpreter at ~1 ms per program instance), and each spec file re-runs a few of its own tests on
them, selected through FUSEDPEFT_BACKEND (the switch a user has, docs/contract.md §1) with cases
chosen to reach each distinct path at small shapes, so the suite's wall time stays in budget.
"""

from __future__ import annotations

import pytest
import torch

from fusedpeft.backends import resolve_backend
from helpers import runnable


def automatic_backend(family: str) -> str:
    """The backend a ``backend=None`` call of ``family`` takes for CPU tensors here."""
    return resolve_backend(family, None, torch.device("cpu"))


def other_backends(family: str) -> list[str]:
    """Runnable backends of ``family`` on CPU tensors other than the automatic one."""
    auto = automatic_backend(family)
    return [b for b in runnable(family) if b != auto]


def on_every_backend(family: str, cases: list[tuple]) -> pytest.MarkDecorator:
    """Parametrize (backend, check, kwargs) over other_backends(family) x cases, where each case is
    (test function of the file, its keyword arguments)."""
    params = [pytest.param(b, check, kwargs, id=f"{b}-{check.__name__}-{i}")
              for b in other_backends(family) for i, (check, kwargs) in enumerate(cases)]
    return pytest.mark.parametrize("backend,check,kwargs", params)


def run_on(backend: str, family: str, monkeypatch, check, kwargs: dict) -> None:
    """Run ``check(**kwargs)`` with FUSEDPEFT_BACKEND=backend, after checking it selects ``backend``."""
    monkeypatch.setenv("FUSEDPEFT_BACKEND", backend)
    assert automatic_backend(family) == backend
    check(**kwargs)
