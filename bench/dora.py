"""DoRA suite: y = base(x) + (m/n - 1) x' W^T + (m/n) s x' A^T B^T with W frozen (PEFT's use_dora).

Providers, floor first: the frozen base nn.Linear alone (forward + backward to x only); PEFT's DoRA
layer as users get it (get_peft_model with use_dora=True: the norm of W + s B@A built from an
out x in matrix every forward); fusedpeft LoRALinear(use_dora=True) on every backend that can run
here. Gradients: x, A, B and the magnitude m.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from bench.common import Case, Provider, Settings, Step
from bench.lora import adapter_dtype, adapter_inputs, floor_work, lora_specs, lora_work
from bench.providers import fusedpeft_attr, fusedpeft_providers, peft_lora_layer

GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336)]
GPU_RANKS = (16,)
# CPU: the headline (2048 tokens, 1024 -> 1024, r = 16, dropout 0) first, then dropout.
CPU_CASES = [(2048, 1024, 1024, 16, 0.0), (2048, 1024, 1024, 16, 0.05)]
GPU_HEADLINE = (8192, 4096, 4096, 16)


def build_case(settings: Settings, n: int, k: int, d: int, r: int, p: float, name: str) -> Case:
    """Inputs: x [N, K] (requires grad), base W [D, K] frozen, A [r, K], B [D, r], m [D] random,
    grad_out [N, D]."""
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    alpha = 2.0 * r
    scaling = alpha / r
    base = nn.Linear(k, d, bias=False, device=dev, dtype=dt).requires_grad_(False)
    x, grad_out, lora_a, lora_b = adapter_inputs(settings, n, k, d, r)
    magnitude = (torch.linalg.vector_norm(base.weight.float(), dim=1) * (1 + 0.1 * torch.rand(d, device=dev)))
    magnitude = magnitude.to(adapter_dtype(dt))

    def floor():
        return Step(lambda: base(x), [x], grad_out)

    def peft():
        layer = peft_lora_layer(base, r, alpha, p, lora_a, lora_b, magnitude=magnitude)
        return Step(lambda: layer(x), [x, *[q for q in layer.parameters() if q.requires_grad]], grad_out)

    def fused(backend):
        layer = fusedpeft_attr("LoRALinear")(base, r=r, alpha=alpha, dropout=p, backend=backend, use_dora=True)
        with torch.no_grad():
            layer.lora_A.weight.copy_(lora_a)
            layer.lora_B.weight.copy_(lora_b)
            layer.lora_magnitude_vector.copy_(magnitude)
        return Step(lambda: layer(x), [x, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector],
                    grad_out)

    providers = [Provider("base nn.Linear (floor)", floor, work=floor_work(n, k, d, elt), check=False),
                 Provider("peft DoRA", peft)]
    providers += fusedpeft_providers("dora", dev, fused)

    def expected():
        from fusedpeft import reference

        return reference.dora_linear(x, base.weight, None, lora_a, lora_b, magnitude, scaling)

    notes = [f"adapters and magnitude: {str(adapter_dtype(dt)).replace('torch.', '')}; scaling = alpha/r = {scaling}",
             "work counted as LoRA's (the norm adds 2 D K r + 2 r^2 K FLOPs per forward)"]
    if p > 0:
        notes.append("dropout on: each provider draws its own mask, so outputs are not compared")
    params = {"N": n, "K": k, "D": d, "r": r, "alpha": alpha, "dropout": p, "dtype": str(dt)}
    return Case("dora", name, params, lora_work(n, k, d, r, elt), providers, None if p > 0 else expected, notes)


def cases(settings: Settings):
    """[(case name, builder, priority)]: the headline first (priority 0)."""
    out = []
    for n, k, d, r, p in lora_specs(settings, GPU_SHAPES, GPU_RANKS, CPU_CASES):
        name = f"N{n}_K{k}_D{d}_r{r}_p{p:g}"
        priority = 0 if settings.device.type == "cpu" or (n, k, d, r) == GPU_HEADLINE else 1
        out.append((name, functools.partial(build_case, settings, n, k, d, r, p, name), priority))
    return out
