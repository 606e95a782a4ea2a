"""Backend selection (docs/contract.md §1): automatic choice, FUSEDPEFT_BACKEND, forced backends and reasons."""

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import backends


def test_available_backends_reports_a_reason_per_backend():
    report = fp.available_backends()
    assert set(report) == {"triton", "cuda", "cpu", "torch"}
    assert report["torch"] is None
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and len(reason) > 10), name


def test_automatic_choice_on_cpu_is_a_usable_backend():
    for family in backends.FAMILIES:
        chosen = backends.resolve_backend(family, None, torch.device("cpu"))
        assert backends.unavailable_reason(chosen, family, torch.device("cpu")) is None


def test_cuda_backend_is_automatic_only_once_verified(monkeypatch):
    """With only "cuda" and "torch" usable, auto picks cuda on CUDA tensors only once verified."""
    usable = {"cuda", "torch"}
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, family=None, device=None: None if name in usable else "not here")
    monkeypatch.setattr(backends, "VERIFIED_ON_GPU", set())
    assert backends.resolve_backend("lora", None, torch.device("cuda")) == "torch"
    monkeypatch.setattr(backends, "VERIFIED_ON_GPU", {("lora", "cuda")})
    assert backends.resolve_backend("lora", None, torch.device("cuda")) == "cuda"
    assert backends.resolve_backend("mora", None, torch.device("cuda")) == "torch"


def test_environment_variable_sets_the_default(monkeypatch):
    layer = fp.LoRALinear(nn.Linear(4, 4), r=2)
    x = torch.randn(3, 4)
    monkeypatch.setenv("FUSEDPEFT_BACKEND", "torch")
    y = layer(x)
    monkeypatch.setenv("FUSEDPEFT_BACKEND", "auto")
    torch.testing.assert_close(layer(x), y)
    monkeypatch.setenv("FUSEDPEFT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FUSEDPEFT_BACKEND='tpu' is not a fusedpeft backend"):
        layer(x)
    monkeypatch.setenv("FUSEDPEFT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run fusedpeft lora ops on cpu tensors"):
        layer(x)
    assert fp.LoRALinear(nn.Linear(4, 4), r=2, backend="torch")(x).shape == (3, 4)  # the argument wins


@pytest.mark.parametrize("name", ["triton", "cpu"])
def test_forced_backend_without_implementation_says_why(name):
    reason = backends.unavailable_reason(name, "mora", torch.device("cpu"))
    if reason is None:
        pytest.skip(f"{name} implements mora here")
    with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run fusedpeft mora ops"):
        fp.MoRALinear(nn.Linear(8, 8), r=1, backend=name)(torch.randn(2, 8))
