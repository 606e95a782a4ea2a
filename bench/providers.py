"""Guarded access to fusedpeft for the suites: which backends can run a family here, the public
names of docs/contract.md §1 (a Skip with the reason when one is missing), and providers that only report why
they cannot run."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from bench.common import Provider, Skip, Step


# --smoke runs the Triton backend on CPU tensors under TRITON_INTERPRET=1: far too slow to measure,
# but it walks the triton providers of every suite (bench/gpu_check.sh's dry run).
INTERPRETED_TRITON = {"allowed": False}


def skipped(name: str, reason: str) -> Provider:
    """A provider that only reports why it cannot run."""

    def make() -> Step:
        raise Skip(reason)

    return Provider(name, make)


def fusedpeft_backends(family: str, device: torch.device) -> list[tuple[str, str | None]]:
    """[(backend, None if it can run ``family`` on ``device`` else why not)], from
    fp.available_backends() refined by fusedpeft.backends.unavailable_reason when present."""
    try:
        import fusedpeft as fp

        backends = fp.available_backends()
    except Exception as exc:  # noqa: BLE001
        return [("(all)", f"fusedpeft.available_backends() is not usable yet ({type(exc).__name__}: {exc})")]
    try:
        from fusedpeft.backends import unavailable_reason
    except Exception:  # noqa: BLE001
        unavailable_reason = None
    out = []
    for name, reason in backends.items():
        if reason is None and unavailable_reason is not None:
            reason = unavailable_reason(name, family, device)
        if reason is None and name == "triton" and device.type == "cpu" and not INTERPRETED_TRITON["allowed"]:
            reason = "Triton on CPU tensors only runs under TRITON_INTERPRET=1, far too slow to benchmark"
        out.append((name, reason))
    return out


def fusedpeft_providers(family: str, device: torch.device, make_step: Callable[[str], Step]) -> list[Provider]:
    """One provider "fusedpeft[<backend>]" per backend; make_step(backend) builds its Step, and a
    backend that cannot run ``family`` here only reports why."""
    providers = []
    for backend, reason in fusedpeft_backends(family, device):
        label = f"fusedpeft[{backend}]"
        providers.append(skipped(label, reason) if reason is not None
                         else Provider(label, functools.partial(make_step, backend)))
    return providers


def fusedpeft_attr(name: str):
    """fusedpeft.<name>, imported when a provider is built: a failed import of fusedpeft skips
    that provider with the reason instead of ending the run."""
    try:
        import fusedpeft as fp
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"import fusedpeft failed ({type(exc).__name__}: {exc})") from exc
    return getattr(fp, name)


def peft_lora_layer(base: nn.Module, r: int, alpha: float, p: float, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, magnitude: torch.Tensor | None = None,
                    quantized_4bit: bool = False) -> nn.Module:
    """PEFT's LoRA layer around ``base``, built by get_peft_model with PEFT's defaults (fp32 adapters)
    and given the adapter weights lora_a [r, K], lora_b [D, r] (and DoRA's magnitude [D] when given:
    use_dora=True). quantized_4bit: ``base`` is a bitsandbytes Linear4bit and PEFT must pick its
    QLoRA layer (peft.tuners.lora.bnb), as it does on a BitsAndBytesConfig model."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"peft not importable ({type(exc).__name__}: {exc})") from exc

    class OneLinear(nn.Module):
        is_loaded_in_4bit = quantized_4bit  # what transformers sets on a 4-bit model: PEFT's bnb dispatch

        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    config = LoraConfig(target_modules=["proj"], r=r, lora_alpha=alpha, lora_dropout=p,
                        use_dora=magnitude is not None)
    layer = get_peft_model(OneLinear(base), config).base_model.model.proj
    if quantized_4bit and not type(layer).__module__.endswith("lora.bnb"):
        raise Skip(f"PEFT did not pick its bitsandbytes layer (got {type(layer).__module__})")
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
        if magnitude is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return layer
