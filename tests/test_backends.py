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


def test_forced_backend_without_implementation_says_why(monkeypatch):
    """A (family, backend) pair with no implementation says so (every pair has one now: DoRA's
    cuda one is taken away here)."""
    assert ("dora", "cuda") in backends.IMPLEMENTATIONS
    monkeypatch.delitem(backends.IMPLEMENTATIONS, ("dora", "cuda"))
    reason = "fusedpeft has no 'cuda' implementation of dora yet"
    assert backends.unavailable_reason("cuda", "dora", torch.device("cuda")) == reason
    with pytest.raises(RuntimeError, match=f"backend 'cuda' cannot run fusedpeft dora ops on cpu tensors: {reason}"):
        fp.LoRALinear(nn.Linear(8, 8), r=1, use_dora=True, backend="cuda")(torch.randn(2, 8))


def _imported_modules(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_backends_share_host_helpers_not_the_torch_backend():
    """The cpu / cuda (cpp_backend) and triton (kernels) backends, the ops and fusedpeft/host take what
    they share from fusedpeft.host, never from the torch backend; host imports no backend."""
    from pathlib import Path

    root = Path(backends.__file__).parent
    offenders = []
    for layer, banned in (("cpp_backend", "torch_backend"), ("kernels", "torch_backend"), ("ops", "torch_backend"),
                          ("host", "torch_backend"), ("host", "cpp_backend"), ("host", "kernels")):
        for path in sorted((root / layer).glob("*.py")):
            name = f"{layer}/{path.name}"
            if any(m.startswith(f"fusedpeft.{banned}") for m in _imported_modules(path)):
                offenders.append(name)
    assert not offenders, f"import fusedpeft.torch_backend / a backend where fusedpeft.host should serve: {offenders}"
