"""LoRA suite: y = x @ W^T + scaling * dropout(x) @ A^T @ B^T with W frozen, x [N, K], W [D, K].

Providers, floor first: the frozen base nn.Linear alone (forward + backward to x only); PEFT's LoRA
layer as users get it (adapters upcast to fp32 next to a 16-bit base, input cast to fp32 for the
adapter branch); the Unsloth pattern (cuBLAS GEMM, then the rank-r product added with addmm_,
hand-written backward, no dropout); torch.compile of the eager PyTorch LoRA forward; fusedpeft
LoRALinear on every backend that can run here.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import Case, Provider, Settings, Skip, Step, Work
from bench.providers import fusedpeft_attr, fusedpeft_providers, peft_lora_layer

GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 1024), (8192, 4096, 14336), (8192, 14336, 4096)]  # Llama-3-8B
GPU_RANKS = (8, 16, 64)
DROPOUTS = (0.0, 0.05)
# CPU: the headline case (2048 tokens, 1024 -> 1024, r=16) and two scaled projections.
CPU_CASES = [(2048, 1024, 1024, 16, 0.0), (2048, 1024, 1024, 16, 0.05),
             (1024, 1024, 256, 16, 0.0), (1024, 1024, 3584, 16, 0.0)]
SMOKE_CASES = [(64, 48, 40, 4, 0.05)]
GPU_COMPILE_RANK = 16        # torch.compile only at this rank on the GPU (compile time)
GPU_HEADLINE = (8192, 4096, 4096, 16)  # the issues' GPU targets: measured first (priority 0), both dropouts
COMPILE_BUDGET_S = {"cuda": 45.0, "cpu": 150.0}
_compile_spent_s = [0.0]


def lora_work(n: int, k: int, d: int, r: int, elt: int) -> Work:
    """Useful work of the full LoRA layer (adapter bytes ignored: r(K+D) values, < 1%)."""
    return Work(
        flops_fwd=2 * n * k * d + 2 * n * r * (k + d),
        flops_fwd_bwd=4 * n * k * d + 6 * n * r * (k + d),
        bytes_fwd=(n * k + k * d + n * d) * elt,
        bytes_fwd_bwd=(3 * n * k + 2 * k * d + 2 * n * d) * elt,
        formula="flops fwd 2NKD + 2Nr(K+D), fwd+bwd 4NKD + 6Nr(K+D) (dX, dS=dY@B, dB, dA, dS@A); "
                "bytes fwd (NK + KD + ND)*elt, fwd+bwd (3NK + 2KD + 2ND)*elt",
    )


def floor_work(n: int, k: int, d: int, elt: int) -> Work:
    """The frozen base linear alone: forward and the backward to x."""
    return Work(2 * n * k * d, 4 * n * k * d, (n * k + k * d + n * d) * elt, (2 * n * k + 2 * k * d + 2 * n * d) * elt,
                "flops fwd 2NKD, fwd+bwd 4NKD; bytes fwd (NK+KD+ND)*elt, fwd+bwd 2(NK+KD+ND)*elt")


class _AddmmLoRA(torch.autograd.Function):
    """Unsloth pattern. x [N, K], W [D, K], A [r, K], B [D, r] (all x.dtype) -> [N, D].

    Forward: out = x @ W^T, then out += s * (x @ A^T) @ B^T in place (addmm_). Backward recomputes
    x @ A^T; dX = dY @ W + s * (dY @ B) @ A (addmm_), dA = s (dY @ B)^T x, dB = s dY^T (x A^T).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        out = x @ weight.t()
        out.addmm_(x @ lora_a.t(), lora_b.t(), alpha=scaling)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy_b = grad_out @ lora_b                       # [N, r]
        grad_a = (dy_b.t() @ x).mul_(s)                # [r, K]
        grad_b = (grad_out.t() @ (x @ lora_a.t())).mul_(s)  # [D, r]
        grad_x = grad_out @ weight                     # [N, K]
        grad_x.addmm_(dy_b, lora_a, alpha=s)
        return grad_x, None, grad_a, grad_b, None


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The adapters' dtype in every LoRA-family case: fp32 next to a 16-bit base (PEFT's habit,
    docs/contract.md §2), else the base's dtype."""
    return torch.float32 if torch.finfo(dtype).bits == 16 else dtype


def adapter_inputs(settings: Settings, n: int, k: int, d: int, r: int):
    """The random inputs every LoRA-family case draws, in this order, after its base layer:
    x [N, K] (requires grad) and grad_out [N, D] in the settings' dtype, lora_a [r, K] and
    lora_b [D, r] in adapter_dtype."""
    dev, dt = settings.device, settings.dtype
    x = torch.randn(n, k, device=dev, dtype=dt, requires_grad=True)
    grad_out = torch.randn(n, d, device=dev, dtype=dt)
    lora_a = (torch.rand(r, k, device=dev, dtype=adapter_dtype(dt)) * 2 - 1) / k**0.5
    lora_b = torch.randn(d, r, device=dev, dtype=adapter_dtype(dt)) * 0.02
    return x, grad_out, lora_a, lora_b


def _eager_lora(x, weight, lora_a, lora_b, scaling: float, p: float):
    """The PyTorch LoRA forward as written by hand: x [N, K] -> [N, D]."""
    return F.linear(x, weight) + scaling * F.linear(F.linear(F.dropout(x, p, training=True), lora_a), lora_b)


def build_case(settings: Settings, n: int, k: int, d: int, r: int, p: float, name: str) -> Case:
    """Inputs: x [N, K] (requires grad), base W [D, K] frozen, A [r, K], B [D, r] random, grad_out [N, D]."""
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    alpha = 2.0 * r
    scaling = alpha / r
    base = nn.Linear(k, d, bias=False, device=dev, dtype=dt).requires_grad_(False)
    x, grad_out, lora_a, lora_b = adapter_inputs(settings, n, k, d, r)

    def floor():
        return Step(lambda: base(x), [x], grad_out)

    def peft():
        layer = peft_lora_layer(base, r, alpha, p, lora_a, lora_b)
        return Step(lambda: layer(x), [x, *[q for q in layer.parameters() if q.requires_grad]], grad_out)

    def addmm():
        if p > 0:
            raise Skip("the Unsloth addmm_ pattern has no dropout (Unsloth's fast path needs lora_dropout=0)")
        a = lora_a.to(dt).requires_grad_(True)
        b = lora_b.to(dt).requires_grad_(True)
        return Step(lambda: _AddmmLoRA.apply(x, base.weight, a, b, scaling), [x, a, b], grad_out)

    def compiled():
        if dev.type == "cuda" and r != GPU_COMPILE_RANK:
            raise Skip(f"torch.compile measured at r={GPU_COMPILE_RANK} only (compile time keeps the GPU run short)")
        if dev.type == "cpu" and settings.quick:
            raise Skip("skipped with --quick: a cold Inductor compile (C++, fwd+bwd) takes ~20 s per shape on 2 cores")
        budget = COMPILE_BUDGET_S[dev.type]
        if _compile_spent_s[0] > budget:
            raise Skip(f"compile budget of {budget:.0f} s for this run used up ({_compile_spent_s[0]:.0f} s)")
        torch._dynamo.reset()  # a fresh cache per shape: never hit the recompile limit and fall back to eager
        fn = torch.compile(_eager_lora, dynamic=False)
        a = lora_a.to(dt).requires_grad_(True)
        b = lora_b.to(dt).requires_grad_(True)
        step = Step(lambda: fn(x, base.weight, a, b, scaling, p), [x, a, b], grad_out)
        start = time.perf_counter()
        step.run_forward_backward()  # compiles forward and backward graphs
        step.info["compile_s"] = round(time.perf_counter() - start, 2)
        _compile_spent_s[0] += step.info["compile_s"]
        return step

    providers = [Provider("base nn.Linear (floor)", floor, work=floor_work(n, k, d, elt), check=False),
                 Provider("peft LoRA", peft), Provider("unsloth-style addmm_", addmm),
                 Provider("torch.compile eager LoRA", compiled)]

    def fused(backend):
        lora_linear_cls = fusedpeft_attr("LoRALinear")
        layer = lora_linear_cls(base, r=r, alpha=alpha, dropout=p, backend=backend)
        with torch.no_grad():
            layer.lora_A.weight.copy_(lora_a)
            layer.lora_B.weight.copy_(lora_b)
        return Step(lambda: layer(x), [x, layer.lora_A.weight, layer.lora_B.weight], grad_out)

    providers += fusedpeft_providers("lora", dev, fused)

    def expected():
        from fusedpeft import reference

        return reference.lora_linear(x, base.weight, None, lora_a, lora_b, scaling)

    notes = [f"adapters: {str(adapter_dtype(dt)).replace('torch.', '')} for PEFT/fusedpeft, "
             f"{str(dt).replace('torch.', '')} for addmm_/compile; scaling = alpha/r = {scaling}"]
    if p > 0:
        notes.append("dropout on: each provider draws its own mask, so outputs are not compared")
    params = {"N": n, "K": k, "D": d, "r": r, "alpha": alpha, "dropout": p, "dtype": str(dt)}
    return Case("lora", name, params, lora_work(n, k, d, r, elt), providers, None if p > 0 else expected, notes)


def lora_specs(settings: Settings, gpu_shapes, gpu_ranks, cpu_cases) -> list[tuple]:
    """(N, K, D, r, p) cases of a LoRA-shaped suite for the device: the smoke case, the GPU grid
    (shape x rank x dropout) or the CPU cases."""
    if settings.smoke:
        return SMOKE_CASES
    if settings.device.type == "cuda":
        return [(n, k, d, r, p) for (n, k, d) in gpu_shapes for r in gpu_ranks for p in DROPOUTS]
    return cpu_cases


def cases(settings: Settings):
    """[(case name, builder, priority)] for the device: builders allocate inputs only when called;
    priority 0 runs first (GPU: r=16), priority 1 after every suite's priority-0 cases."""
    specs = lora_specs(settings, GPU_SHAPES, GPU_RANKS, CPU_CASES)
    out = []
    for n, k, d, r, p in specs:
        name = f"N{n}_K{k}_D{d}_r{r}_p{p:g}"
        if settings.device.type == "cpu" or (n, k, d, r) == GPU_HEADLINE:
            priority = 0
        else:
            priority = 1 if r == GPU_COMPILE_RANK else 2
        out.append((name, functools.partial(build_case, settings, n, k, d, r, p, name), priority))
    return out
