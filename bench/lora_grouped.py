"""Grouped LoRA suite: q/k/v projections that read the same x, each y_i = x @ W_i^T + scaling
x @ A_i^T @ B_i^T (dropout 0), outputs concatenated [N, D_q + D_k + D_v].

Providers, floor first: one frozen nn.Linear holding the three base weights ([sum D_i, K], the
fused-QKV layout: one base GEMM); PEFT's three LoRA layers; fusedpeft's three LoRALinear layers
called one by one; fusedpeft's grouped op (``lora_group_forward``: one shrink pass over x for
the three adapters, one pass for their dA and one dX accumulator) on every backend that can run
here. Every provider pays the same concatenation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from bench.common import Case, Provider, Settings, Skip, Step
from bench.lora import floor_work, lora_work
from bench.providers import fusedpeft_attr, fusedpeft_providers, peft_lora_layer

# (N, K, (D_q, D_k, D_v), r): Llama-3-8B attention on the GPU, scaled down on the CPU
GPU_CASES = [(8192, 4096, (4096, 1024, 1024), 16)]
CPU_CASES = [(2048, 1024, (1024, 256, 256), 16)]
SMOKE_CASES = [(64, 48, (48, 16, 16), 4)]


def build_case(settings: Settings, n: int, k: int, outs: tuple[int, ...], r: int, name: str) -> Case:
    """Inputs: x [N, K] (requires grad), base W_i [D_i, K] frozen, A_i [r, K], B_i [D_i, r], grad_out [N, sum D_i]."""
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    adapter_dtype = torch.float32 if elt == 2 else dt
    alpha = 2.0 * r
    d_total = sum(outs)
    fused_base = nn.Linear(k, d_total, bias=False, device=dev, dtype=dt).requires_grad_(False)
    bases = []
    for w in fused_base.weight.split(list(outs)):
        layer = nn.Linear(k, w.shape[0], bias=False, device=dev, dtype=dt).requires_grad_(False)
        layer.weight.data = w  # a view of the fused weight: the same numbers, no copy
        bases.append(layer)
    x = torch.randn(n, k, device=dev, dtype=dt, requires_grad=True)
    grad_out = torch.randn(n, d_total, device=dev, dtype=dt)
    adapters = [((torch.rand(r, k, device=dev, dtype=adapter_dtype) * 2 - 1) / k**0.5,
                 torch.randn(d, r, device=dev, dtype=adapter_dtype) * 0.02) for d in outs]

    def floor():
        return Step(lambda: fused_base(x), [x], grad_out)

    def peft():
        layers = [peft_lora_layer(base, r, alpha, 0.0, a, b) for base, (a, b) in zip(bases, adapters)]
        params = [q for layer in layers for q in layer.parameters() if q.requires_grad]
        return Step(lambda: torch.cat([layer(x) for layer in layers], -1), [x, *params], grad_out)

    def fused_layers(backend):
        lora_linear_cls = fusedpeft_attr("LoRALinear")
        layers = []
        for base, (a, b) in zip(bases, adapters):
            layer = lora_linear_cls(base, r=r, alpha=alpha, backend=backend)
            with torch.no_grad():
                layer.lora_A.weight.copy_(a)
                layer.lora_B.weight.copy_(b)
            layers.append(layer)
        params = [q for layer in layers for q in (layer.lora_A.weight, layer.lora_B.weight)]
        return layers, params

    def separate(backend):
        layers, params = fused_layers(backend)
        return Step(lambda: torch.cat([layer(x) for layer in layers], -1), [x, *params], grad_out)

    def grouped(backend):
        from fusedpeft.fused.lora_grouped import lora_group_forward
        from fusedpeft.ops.lora_grouped import grouped_implementation

        if grouped_implementation(backend) is None:
            raise Skip(f"the {backend!r} backend has no grouped LoRA implementation (triton and torch have)")
        layers, params = fused_layers(backend)
        return Step(lambda: torch.cat(lora_group_forward(layers, x), -1), [x, *params], grad_out)

    providers = [Provider("fused-QKV nn.Linear (floor)", floor, work=floor_work(n, k, d_total, elt), check=False),
                 Provider("peft LoRA x3", peft)]
    providers += [Provider(p.name.replace("fusedpeft[", "fusedpeft separate["), p.make, p.work, p.check)
                  for p in fusedpeft_providers("lora", dev, separate)]
    providers += [Provider(p.name.replace("fusedpeft[", "fusedpeft grouped["), p.make, p.work, p.check)
                  for p in fusedpeft_providers("lora", dev, grouped)]

    def expected():
        from fusedpeft import reference

        return torch.cat([reference.lora_linear(x, base.weight, None, a, b, alpha / r)
                          for base, (a, b) in zip(bases, adapters)], -1)

    work = lora_work(n, k, d_total, r, elt)
    params = {"N": n, "K": k, "D": list(outs), "r": r, "alpha": alpha, "dtype": str(dt)}
    return Case("lora_grouped", name, params, work, providers, expected)


def cases(settings: Settings):
    """[(case name, builder, priority)] for the device."""
    specs = SMOKE_CASES if settings.smoke else GPU_CASES if settings.device.type == "cuda" else CPU_CASES
    priority = 1 if settings.device.type == "cuda" else 0  # on the GPU after every suite's headline cases
    return [(f"N{n}_K{k}_D{'+'.join(map(str, outs))}_r{r}", functools.partial(
        build_case, settings, n, k, outs, r, f"N{n}_K{k}_D{'+'.join(map(str, outs))}_r{r}"), priority)
        for n, k, outs, r in specs]
