"""DoRA at Llama shapes in bf16 on a GPU (run by bench/gpu_check.sh; skipped without CUDA).

Every backend that runs DoRA on CUDA tensors against fusedpeft.reference.dora_linear in fp32 on
the same device: the output and every gradient (x, lora_A, lora_B, the magnitude), within twice
the error of PEFT's formula in plain bf16 PyTorch (tests/helpers.py). With
FUSEDPEFT_GPU_DRY_RUN=1 the same tests run on CPU tensors at tiny shapes in fp32.
"""

import os

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from helpers import assert_within, grads, runnable

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_dry_run]

DRY_RUN = os.environ.get("FUSEDPEFT_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
DTYPE = torch.float32 if DRY_RUN else torch.bfloat16
ATOL = 1e-4 if DRY_RUN else 1e-2
TOKENS = 24 if DRY_RUN else 4096
SHAPES = [(40, 24)] if DRY_RUN else [(4096, 4096), (4096, 14336), (14336, 4096)]
RANKS = [(4, 0.0), (4, 0.1)] if DRY_RUN else [(16, 0.0), (16, 0.05), (64, 0.0)]


def _backends():
    return runnable("dora", DEVICE) if torch.cuda.is_available() or DRY_RUN else ["torch"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k,d", SHAPES)
@pytest.mark.parametrize("r,dropout", RANKS)
def test_dora_llama_shapes(backend, k, d, r, dropout):
    base = nn.Linear(k, d, bias=False, device=DEVICE, dtype=DTYPE)
    layer = fp.LoRALinear(base, r=r, alpha=2 * r, dropout=dropout, backend=backend, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.02)
        layer.lora_magnitude_vector.mul_(1.0 + 0.1 * torch.rand_like(layer.lora_magnitude_vector))
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    A32, B32, m32 = (p.detach().float().requires_grad_() for p in (A, B, m))
    x32 = x.detach().float().requires_grad_()
    y32 = ref.dora_linear(x32, base.weight.float(), None, A32, B32, m32, layer.scaling, dropout, seed)
    # the yardstick: PEFT's formula in plain PyTorch in the layer's dtype (norm in fp32)
    A_lp, B_lp = A.detach().to(DTYPE).requires_grad_(), B.detach().to(DTYPE).requires_grad_()
    m_lp = m.detach().clone().requires_grad_()
    x_lp = x.detach().clone().requires_grad_()
    mask = ref.dropout_keep_mask(seed, TOKENS, k, dropout).to(DEVICE) if dropout else None
    x_drop = x_lp if mask is None else x_lp * mask.to(DTYPE) / (1 - dropout)
    n = ref.dora_weight_norm(base.weight, A, B, layer.scaling)
    g_lp = (m_lp / n).to(DTYPE)
    lora = (x_drop @ A_lp.t()) @ B_lp.t()
    eager = base(x_lp) + (g_lp - 1) * (x_drop @ base.weight.t()) + g_lp * layer.scaling * lora
    assert_within(y, y32, eager, ATOL, "y")
    gy = torch.randn_like(y32)
    ours = grads(y, (x, A, B, m), gy.to(DTYPE))
    want = grads(y32, (x32, A32, B32, m32), gy)
    yardstick = grads(eager, (x_lp, A_lp, B_lp, m_lp), gy.to(DTYPE))
    for name, got, expected, baseline in zip(("grad x", "grad A", "grad B", "grad m"), ours, want, yardstick):
        assert_within(got, expected, baseline, ATOL, name)


def _needs_the_cuda_kernel():
    if DEVICE != "cuda":
        pytest.skip("the cuda backend's own kernel (not part of the CPU dry run)")


def test_cuda_backend_runs_dora():
    _needs_the_cuda_kernel()
    from fusedpeft.backends import unavailable_reason

    assert unavailable_reason("cuda", "dora", torch.device("cuda")) is None
    assert "cuda" in _backends()  # so test_dora_llama_shapes covers it


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("need", [(True, True, True, True), (False, True, False, True), (True, False, True, False),
                                  (False, False, False, True), (True, True, False, False)])
@pytest.mark.parametrize("rows", [0, 1, 333])
def test_cuda_dora_backward_p0_matches_the_cpu_kernel(dtype, tol, need, rows):
    """csrc/cuda/dora_ops.cpp against csrc/cpu/dora.cpp (the same op) at odd shapes, every output
    flag combination; the cuda one computes dS in the input dtype, the cpu one in fp32."""
    _needs_the_cuda_kernel()
    D, K, r = 257, 130, 5
    gen = torch.Generator().manual_seed(rows)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    args = [rand(rows, D), rand(rows, D), rand(rows, K), rand(D, K), rand(rows, r), rand(r, K, dt=acc),
            rand(D, r, dt=acc), rand(D, dt=acc)]
    args[-1][::7] = 0.0  # zero magnitudes
    cpu = torch.ops.fusedpeft_C.dora_backward_p0(*args, 0.75, *need)
    gpu = torch.ops.fusedpeft_C.dora_backward_p0(*(t.cuda() for t in args), 0.75, *need)
    for name, want, got, needed in zip(("grad_x", "grad_A", "grad_B", "colsum"), cpu, gpu, need):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if needed:
            scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
            torch.testing.assert_close(got.cpu().double(), want.double(), rtol=tol, atol=tol * scale, msg=name)
