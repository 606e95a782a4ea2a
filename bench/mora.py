"""MoRA suite: y = x @ W^T + decompress(compress(x) @ M^T), W frozen, x [N, K], M [R, R] (R = r_hat).

Providers, floor first: the frozen base nn.Linear alone; an eager MoRA written the way the MoRA
reference implementation computes it (PEFT-fork ``_apply_mora``: wrap padding with ``cat``,
``view`` into chunks, chunk sum (type 1) or RoPE with cached cos/sin (type 6), M as an fp32
nn.Linear, decompression by repeating and truncating); fusedpeft MoRALinear per usable backend.
Dropout is 0 here (the LoRA suite covers the dropout paths).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from bench.common import Case, Provider, Settings, Step, Work
from bench.providers import fusedpeft_attr, fusedpeft_providers
from bench.lora import floor_work

# (N, K, D, mora_type, r)
GPU_CASES = [(8192, 4096, 4096, 6, 8), (8192, 4096, 4096, 1, 256), (8192, 4096, 14336, 6, 8), (8192, 14336, 4096, 6, 8)]
CPU_CASES = [(2048, 1024, 1024, 6, 8), (2048, 1024, 1024, 1, 8)]
SMOKE_CASES = [(64, 40, 48, 6, 4)]
GPU_HEADLINE = GPU_CASES[:2]  # 4096 -> 4096, types 6 and 1: the issues' GPU targets, measured first


def r_hat_of(k: int, d: int, r: int, mora_type: int) -> int:
    """docs/contract.md §3: round(sqrt((K + D) r)), even for type 6 (fusedpeft.reference.mora_r_hat when present)."""
    try:
        from fusedpeft.reference import mora_r_hat

        return mora_r_hat(k, d, r, mora_type)
    except ImportError:
        r_hat = int(math.sqrt((k + d) * r) + 0.5)
        return r_hat // 2 * 2 if mora_type == 6 else r_hat


class EagerMoRA(nn.Module):
    """MoRA as the reference implementation computes it, types 1 and 6. x [..., K] -> [..., D].

    M is an ``nn.Linear(R, R, bias=False)`` in fp32 (the reference never casts it to the base
    dtype); x is cast to fp32 for the adapter branch; the type-6 cos/sin tables [n, R] are built
    once in fp32 and cached as plain attributes.
    """

    def __init__(self, base: nn.Linear, r_hat: int, mora_type: int, m_weight: torch.Tensor):
        super().__init__()
        self.base, self.r_hat, self.mora_type = base, r_hat, mora_type
        self.m = nn.Linear(r_hat, r_hat, bias=False, device=base.weight.device, dtype=torch.float32)
        with torch.no_grad():
            self.m.weight.copy_(m_weight)
        self.cos = self.sin = None

    def _rope_tables(self, n: int, like: torch.Tensor):
        if self.cos is None:
            even = torch.arange(0, self.r_hat, 2, dtype=torch.float32, device=like.device)
            inv_freq = 1.0 / 10000 ** (even / self.r_hat)
            angles = torch.outer(torch.arange(n, dtype=torch.float32, device=like.device), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self.cos, self.sin = angles.cos().to(like.dtype), angles.sin().to(like.dtype)
        return self.cos, self.sin

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """The MoRA branch, x [..., K] (fp32) -> [..., D]."""
        k, d, r_hat = x.shape[-1], self.base.out_features, self.r_hat
        pad = (r_hat - k % r_hat) % r_hat
        if pad:
            x = torch.cat([x, x[..., :pad]], dim=-1)
        n = x.shape[-1] // r_hat
        chunks = x.view(*x.shape[:-1], n, r_hat)
        if self.mora_type == 1:
            out = self.m(chunks.sum(dim=-2))                          # [..., R]
            return torch.cat([out] * math.ceil(d / r_hat), dim=-1)[..., :d]
        cos, sin = self._rope_tables(n, x)
        half = r_hat // 2
        rotated = chunks * cos + torch.cat([-chunks[..., half:], chunks[..., :half]], dim=-1) * sin
        out = self.m(rotated).view(*x.shape[:-1], n * r_hat)
        if out.shape[-1] < d:
            out = torch.cat([out] * math.ceil(d / out.shape[-1]), dim=-1)
        return out[..., :d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        result = result + self.adapter(x.to(self.m.weight.dtype))
        return result.to(x.dtype)


def mora_work(n: int, k: int, d: int, r_hat: int, mora_type: int, elt: int) -> Work:
    """Base GEMM plus the adapter's r_hat x r_hat products; bytes as the floor (a fused layer
    needs no extra traffic beyond it)."""
    chunks = math.ceil(k / r_hat)
    adapter = 2 * n * (chunks if mora_type == 6 else 1) * r_hat * r_hat
    floor = floor_work(n, k, d, elt)
    return Work(floor.flops_fwd + adapter, floor.flops_fwd_bwd + 3 * adapter, floor.bytes_fwd, floor.bytes_fwd_bwd,
                "flops fwd 2NKD + a, fwd+bwd 4NKD + 3a, a = 2N*n*R^2 (type 6, n = ceil(K/R) chunks) or 2N*R^2 "
                "(type 1); bytes as the floor: (NK+KD+ND)*elt fwd, 2(NK+KD+ND)*elt fwd+bwd")


def build_case(settings: Settings, n: int, k: int, d: int, mora_type: int, r: int, name: str) -> Case:
    """Inputs: x [N, K] (requires grad), base W [D, K] frozen, M [R, R] random, grad_out [N, D]."""
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    r_hat = r_hat_of(k, d, r, mora_type)
    base = nn.Linear(k, d, bias=False, device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(n, k, device=dev, dtype=dt, requires_grad=True)
    grad_out = torch.randn(n, d, device=dev, dtype=dt)
    m_weight = torch.randn(r_hat, r_hat, device=dev, dtype=torch.float32) * 0.02

    def floor():
        return Step(lambda: base(x), [x], grad_out)

    def eager():
        layer = EagerMoRA(base, r_hat, mora_type, m_weight)
        return Step(lambda: layer(x), [x, layer.m.weight], grad_out)

    providers = [Provider("base nn.Linear (floor)", floor, work=floor_work(n, k, d, elt), check=False),
                 Provider("eager MoRA (reference-style)", eager)]

    def fused(backend):
        mora_linear_cls = fusedpeft_attr("MoRALinear")
        layer = mora_linear_cls(base, r=r, mora_type=mora_type, dropout=0.0, backend=backend)
        with torch.no_grad():
            layer.M.copy_(m_weight)
        return Step(lambda: layer(x), [x, layer.M], grad_out)

    providers += fusedpeft_providers("mora", dev, fused)

    def expected():
        from fusedpeft import reference

        return reference.mora_linear(x, base.weight, None, m_weight, mora_type)

    pad = (r_hat - k % r_hat) % r_hat
    params = {"N": n, "K": k, "D": d, "r": r, "r_hat": r_hat, "mora_type": mora_type, "pad": pad, "dtype": str(dt)}
    notes = [f"r_hat = {r_hat}, wrap padding {pad}, M fp32 in every provider"]
    return Case("mora", name, params, mora_work(n, k, d, r_hat, mora_type, elt), providers, expected, notes)


def cases(settings: Settings):
    """[(case name, builder, priority)] for the device."""
    specs = SMOKE_CASES if settings.smoke else GPU_CASES if settings.device.type == "cuda" else CPU_CASES
    out = []
    for n, k, d, mora_type, r in specs:
        name = f"N{n}_K{k}_D{d}_type{mora_type}_r{r}"
        priority = 1 if settings.device.type == "cuda" and (n, k, d, mora_type, r) not in GPU_HEADLINE else 0
        out.append((name, functools.partial(build_case, settings, n, k, d, mora_type, r, name), priority))
    return out
