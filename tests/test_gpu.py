"""GPU parity at Llama shapes in bf16 (run by bench/gpu_check.sh; skipped without CUDA).

Every backend that can run on CUDA tensors is compared with fusedpeft.reference evaluated in
fp32 on the same device, for the output and EVERY gradient (x, lora_A, lora_B, M), within twice
the error of plain PyTorch in bf16 (tests/helpers.py); the dropout masks each backend applies,
forward and backward, must be the reference's bit for bit.

With FUSEDPEFT_GPU_DRY_RUN=1 (bench/gpu_check.sh's dry run) the same tests run on CPU tensors at
tiny shapes in fp32, for every backend that runs here (Triton under the interpreter): they check
the plumbing of the GPU run, not GPU numerics.
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
LORA_SHAPES = [(40, 24)] if DRY_RUN else [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
LORA_RANKS = [(4, 0.0), (4, 0.1)] if DRY_RUN else [(16, 0.0), (64, 0.05)]
MORA_CASES = ([(40, 48, 4, 6), (40, 24, 8, 1)] if DRY_RUN else
              [(4096, 4096, 8, 6), (4096, 4096, 256, 1), (4096, 14336, 8, 6), (14336, 4096, 8, 6)])
CE_ROWS, CE_HIDDEN, CE_VOCABS = (32, 40, [1003]) if DRY_RUN else (2048, 4096, [32000, 128256])
MASK_ROWS = 16 if DRY_RUN else 8192  # rows of the dropout-mask check (64 features each)


def _backends(family):
    return runnable(family, DEVICE) if torch.cuda.is_available() or DRY_RUN else ["torch"]


def _lowp(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(DTYPE)


@pytest.mark.parametrize("backend", _backends("lora"))
@pytest.mark.parametrize("k,d", LORA_SHAPES)
@pytest.mark.parametrize("r,dropout", LORA_RANKS)
def test_lora_llama_shapes(backend, k, d, r, dropout):
    base = nn.Linear(k, d, bias=False, device=DEVICE, dtype=DTYPE)
    layer = fp.LoRALinear(base, r=r, alpha=2 * r, dropout=dropout, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.02)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    A32, B32 = (p.detach().float().requires_grad_() for p in (A, B))
    x32 = x.detach().float().requires_grad_()
    y32 = ref.lora_linear(x32, base.weight.float(), None, A32, B32, layer.scaling, dropout, seed)
    # the yardstick: the same computation in plain PyTorch in the layer's dtype
    A_lp, B_lp = _lowp(A).requires_grad_(), _lowp(B).requires_grad_()
    x_lp = x.detach().clone().requires_grad_()
    mask = ref.dropout_keep_mask(seed, TOKENS, k, dropout).to(DEVICE) if dropout else None
    x_drop = x_lp if mask is None else x_lp * mask.to(DTYPE) / (1 - dropout)
    eager = base(x_lp) + layer.scaling * (x_drop @ A_lp.t()) @ B_lp.t()
    assert_within(y, y32, eager, ATOL, "y")
    g = torch.randn_like(y32)
    ours = grads(y, (x, A, B), g.to(DTYPE))
    want = grads(y32, (x32, A32, B32), g)
    yardstick = grads(eager, (x_lp, A_lp, B_lp), g.to(DTYPE))
    for name, got, expected, baseline in zip(("grad x", "grad A", "grad B"), ours, want, yardstick):
        assert_within(got, expected, baseline, ATOL, name)


@pytest.mark.parametrize("backend", _backends("mora"))
@pytest.mark.parametrize("k,d,r,mora_type", MORA_CASES)
def test_mora_llama_shapes(backend, k, d, r, mora_type):
    base = nn.Linear(k, d, bias=False, device=DEVICE, dtype=DTYPE)
    layer = fp.MoRALinear(base, r=r, mora_type=mora_type, backend=backend)
    with torch.no_grad():
        layer.M.normal_(0, 0.02)
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    y = layer(x)
    x32, M32 = x.detach().float().requires_grad_(), layer.M.detach().float().requires_grad_()
    y32 = ref.mora_linear(x32, base.weight.float(), None, M32, mora_type)
    x_lp, M_lp = x.detach().clone().requires_grad_(), _lowp(layer.M).requires_grad_()
    eager = base(x_lp) + ref.mora_linear(x_lp, torch.zeros_like(base.weight), None, M_lp, mora_type).to(DTYPE)
    assert_within(y, y32, eager, ATOL, "y")
    g = torch.randn_like(y32)
    ours = grads(y, (x, layer.M), g.to(DTYPE))
    want = grads(y32, (x32, M32), g)
    yardstick = grads(eager, (x_lp, M_lp), g.to(DTYPE))
    for name, got, expected, baseline in zip(("grad x", "grad M"), ours, want, yardstick):
        assert_within(got, expected, baseline, ATOL, name)


def _identity_adapter(family: str, backend: str, p: float) -> nn.Module:
    """A 64 -> 64 layer whose output is exactly dropout(x) and whose input gradient for dY = 1 is
    exactly mask / (1 - p): zero base weight, identity adapter (LoRA A = B = I with scaling 1;
    MoRA r_hat = 64 = in = out, one chunk, no padding, M = I; type 6's chunk 0 is not rotated)."""
    base = nn.Linear(64, 64, bias=False, device=DEVICE, dtype=torch.float32)
    with torch.no_grad():
        base.weight.zero_()
    eye = torch.eye(64, device=DEVICE)
    if family == "lora":
        layer = fp.LoRALinear(base, r=64, alpha=64.0, dropout=p, backend=backend)
        with torch.no_grad():
            layer.lora_A.weight.copy_(eye)
            layer.lora_B.weight.copy_(eye)
        return layer
    mora_type = int(family.split("-")[1])
    layer = fp.MoRALinear(base, r=32, mora_type=mora_type, dropout=p, backend=backend)
    assert layer.r_hat == 64
    with torch.no_grad():
        layer.M.copy_(eye)
    return layer


@pytest.mark.parametrize("family,backend", [(f, b) for f in ("lora", "mora-1", "mora-6")
                                            for b in _backends(f.split("-")[0])])
def test_dropout_masks_match_reference(family, backend):
    p = 0.3
    layer = _identity_adapter(family, backend, p)
    x = (torch.rand(MASK_ROWS, 64, device=DEVICE) + 1.0).requires_grad_()  # no zeros: kept <=> nonzero
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    want = ref.dropout_keep_mask(int(ref.new_dropout_seed()), MASK_ROWS, 64, p).to(DEVICE)
    forward_mask = y.detach() != 0
    assert torch.equal(forward_mask, want), f"forward mask: {(forward_mask != want).sum().item()} elements differ"
    torch.testing.assert_close(y.detach(), torch.where(want, x.detach() / (1 - p), 0.0))
    (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y))
    backward_mask = grad_x != 0
    assert torch.equal(backward_mask, want), f"backward mask: {(backward_mask != want).sum().item()} elements differ"


@pytest.mark.parametrize("backend", _backends("cross_entropy"))
@pytest.mark.parametrize("vocab", CE_VOCABS)
def test_linear_cross_entropy_llama_head(backend, vocab):
    hidden = torch.randn(CE_ROWS, CE_HIDDEN, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(vocab, CE_HIDDEN, device=DEVICE) / 64).to(DTYPE)
    labels = torch.randint(0, vocab, (CE_ROWS,), device=DEVICE)
    labels[: CE_ROWS // 4] = -100
    loss = fp.linear_cross_entropy(hidden, weight, labels, backend=backend)
    logits = hidden.detach().float() @ weight.float().t()
    want = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, want, rtol=2e-3, atol=2e-3)
    loss.backward()
    h32 = hidden.detach().float().requires_grad_()
    torch.nn.functional.cross_entropy(h32 @ weight.float().t(), labels).backward()
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=5e-2, atol=5e-6)
