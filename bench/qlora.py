"""QLoRA suite: LoRA over a bitsandbytes NF4 base, y = x @ deq(W)^T + scaling * dropout(x) @ A^T @ B^T.

Providers, floor first: the frozen bitsandbytes Linear4bit alone (its forward + backward to x,
which dequantizes W in both); PEFT's QLoRA layer (get_peft_model on a 4-bit model: base_layer(x)
.clone() + the unfused adapter branch, fp32 adapters); an Unsloth-style baseline (dequantize with
bitsandbytes, one GEMM, the rank-r product added by addmm_, hand-written backward that
dequantizes again, no dropout); fusedpeft LoRALinear on every backend that can run here.
Compute dtype: the run's dtype (bfloat16 on CUDA, float32 on CPU); NF4, blocksize 64, double
quantization on (QLoRA's default).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn

from bench.common import Case, Provider, Settings, Skip, Step
from bench.lora import adapter_dtype, adapter_inputs, floor_work, lora_work
from bench.providers import fusedpeft_attr, fusedpeft_providers, peft_lora_layer

GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)]  # Llama-3-8B projections
GPU_RANK = 16
# CPU: the target case (2048 tokens, 1024 -> 1024 NF4, r=16) and a wider projection
CPU_CASES = [(2048, 1024, 1024, 16, 0.0), (2048, 1024, 1024, 16, 0.05), (1024, 1024, 3584, 16, 0.0)]
SMOKE_CASES = [(64, 64, 48, 4, 0.05)]  # in_features a multiple of the 64-wide quantization block


def _bnb():
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"bitsandbytes not importable ({type(exc).__name__}: {exc})") from exc
    return bitsandbytes


def nf4_linear(k: int, d: int, dtype: torch.dtype, device: torch.device, weight: torch.Tensor) -> nn.Module:
    """A frozen bitsandbytes Linear4bit k -> d (NF4, double quantization) holding ``weight`` [d, k]."""
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(k, d, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight.to("cpu", dtype), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer.to(device).requires_grad_(False)


def _dequantize(layer) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(layer.weight.data, layer.weight.quant_state)


class _UnslothStyle(torch.autograd.Function):
    """Unsloth's fast_lora pattern over a 4-bit base: W = dequantize(W4) for the GEMM and again in
    backward (never stored); out = x @ W^T, out += s (x @ A^T) @ B^T by addmm_; dX = dY @ W +
    s (dY @ B) @ A (addmm_), dA = s (dY @ B)^T x, dB = s dY^T (x @ A^T). No dropout, no bias."""

    @staticmethod
    def forward(ctx, x, layer, lora_a, lora_b, scaling):
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.layer, ctx.scaling = layer, scaling
        out = x @ _dequantize(layer).to(x.dtype).t()
        return out.addmm_(x @ lora_a.t(), lora_b.t(), alpha=scaling)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy_b = grad_out @ lora_b
        grad_a = (dy_b.t() @ x).mul_(s)
        grad_b = (grad_out.t() @ (x @ lora_a.t())).mul_(s)
        grad_x = (grad_out @ _dequantize(ctx.layer).to(x.dtype)).addmm_(dy_b, lora_a, alpha=s)
        return grad_x, None, grad_a, grad_b, None


def build_case(settings: Settings, n: int, k: int, d: int, r: int, p: float, name: str) -> Case:
    """Inputs: x [N, K] (requires grad), an NF4 Linear4bit [D, K] frozen, A [r, K], B [D, r], grad_out [N, D]."""
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    alpha = 2.0 * r
    scaling = alpha / r
    weight = torch.randn(d, k) / k**0.5
    base = nf4_linear(k, d, dt, dev, weight)
    x, grad_out, lora_a, lora_b = adapter_inputs(settings, n, k, d, r)

    def floor():
        base.train()  # bitsandbytes' eval-mode CPU path repacks the weight; training is what is measured
        return Step(lambda: base(x), [x], grad_out)

    def peft():
        layer = peft_lora_layer(nf4_linear(k, d, dt, dev, weight), r, alpha, p, lora_a, lora_b,
                                quantized_4bit=True)
        return Step(lambda: layer(x), [x, *[q for q in layer.parameters() if q.requires_grad]], grad_out)

    def unsloth():
        if p > 0:
            raise Skip("the Unsloth pattern has no dropout (its fast path needs lora_dropout=0)")
        a = lora_a.to(dt).requires_grad_(True)
        b = lora_b.to(dt).requires_grad_(True)
        return Step(lambda: _UnslothStyle.apply(x, base, a, b, scaling), [x, a, b], grad_out)

    providers = [Provider("bnb Linear4bit (floor)", floor, work=floor_work(n, k, d, elt), check=False),
                 Provider("peft QLoRA", peft), Provider("unsloth-style dequant + addmm_", unsloth)]

    def fused(backend):
        layer = fusedpeft_attr("LoRALinear")(base, r=r, alpha=alpha, dropout=p, backend=backend)
        with torch.no_grad():
            layer.lora_A.weight.copy_(lora_a)
            layer.lora_B.weight.copy_(lora_b)
        return Step(lambda: layer(x), [x, layer.lora_A.weight, layer.lora_B.weight], grad_out)

    providers += fusedpeft_providers("lora", dev, fused)

    def expected():
        from fusedpeft import reference

        return reference.lora_linear(x, _dequantize(base).to(dt), None, lora_a, lora_b, scaling)

    notes = ["NF4, blocksize 64, double quantization; W dequantized by each provider in forward and backward",
             f"adapters: {str(adapter_dtype(dt)).replace('torch.', '')} for PEFT/fusedpeft, "
             f"{str(dt).replace('torch.', '')} for the unsloth-style baseline; scaling = alpha/r = {scaling}"]
    if p > 0:
        notes.append("dropout on: each provider draws its own mask, so outputs are not compared")
    params = {"N": n, "K": k, "D": d, "r": r, "alpha": alpha, "dropout": p, "dtype": str(dt), "quant": "nf4"}
    return Case("qlora", name, params, lora_work(n, k, d, r, elt), providers, None if p > 0 else expected, notes)


def cases(settings: Settings):
    """[(case name, builder, priority)] for the device (see bench.lora.cases)."""
    if settings.smoke:
        specs = SMOKE_CASES
    elif settings.device.type == "cuda":
        specs = [(n, k, d, GPU_RANK, p) for (n, k, d) in GPU_SHAPES for p in (0.0, 0.05)]
    else:
        specs = CPU_CASES
    out = []
    for n, k, d, r, p in specs:
        name = f"N{n}_K{k}_D{d}_r{r}_p{p:g}_nf4"
        # GPU: the headline shape (4096 -> 4096) first, the other projections after every suite's headline
        priority = 1 if settings.device.type == "cuda" and (n, k, d) != GPU_SHAPES[0] else 0
        out.append((name, functools.partial(build_case, settings, n, k, d, r, p, name), priority))
    return out
