"""GPU parity at Llama shapes in bf16 (run by bench/gpu_check.sh; skipped without CUDA).

Every backend that can run on CUDA tensors is compared with fusedpeft.reference evaluated in
fp32 on the same device, within twice the error of plain PyTorch in bf16 (DESIGN §5)."""

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from helpers import assert_within, grads, runnable

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOKENS = 4096


def _backends(family):
    return runnable(family, DEVICE) if torch.cuda.is_available() else ["torch"]


@pytest.mark.parametrize("backend", _backends("lora"))
@pytest.mark.parametrize("k,d", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("r,dropout", [(16, 0.0), (64, 0.05)])
def test_lora_llama_shapes_bf16(backend, k, d, r, dropout):
    base = nn.Linear(k, d, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer = fp.LoRALinear(base, r=r, alpha=2 * r, dropout=dropout, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.02)
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    A, B = (p.detach().float().requires_grad_() for p in (layer.lora_A.weight, layer.lora_B.weight))
    x32 = x.detach().float().requires_grad_()
    y32 = ref.lora_linear(x32, base.weight.float(), None, A, B, layer.scaling, dropout, seed)
    mask = ref.dropout_keep_mask(seed, TOKENS, k, dropout).to(DEVICE) if dropout else None
    x_drop = x if mask is None else x * mask.to(x.dtype) / (1 - dropout)
    A_x, B_x = layer.lora_A.weight.to(x.dtype), layer.lora_B.weight.to(x.dtype)
    eager = base(x) + layer.scaling * (x_drop @ A_x.t()) @ B_x.t()
    assert_within(y, y32, eager, 1e-2, "y")
    g = torch.randn_like(y32)
    assert_within(grads(y, (x,), g.bfloat16())[0], grads(y32, (x32,), g)[0], grads(eager, (x,), g.bfloat16())[0],
                  1e-2, "grad x")


@pytest.mark.parametrize("backend", _backends("mora"))
@pytest.mark.parametrize("k,d,r,mora_type", [(4096, 4096, 8, 6), (4096, 4096, 256, 1), (4096, 14336, 8, 6),
                                             (14336, 4096, 8, 6)])
def test_mora_llama_shapes_bf16(backend, k, d, r, mora_type):
    base = nn.Linear(k, d, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer = fp.MoRALinear(base, r=r, mora_type=mora_type, backend=backend)
    with torch.no_grad():
        layer.M.normal_(0, 0.02)
    x = torch.randn(TOKENS, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    x32, M32 = x.detach().float().requires_grad_(), layer.M.detach().float().requires_grad_()
    y32 = ref.mora_linear(x32, base.weight.float(), None, M32, mora_type)
    eager = base(x) + x @ layer.delta_weight().t()
    assert_within(y, y32, eager, 1e-2, "y")
    g = torch.randn_like(y32)
    assert_within(grads(y, (x,), g.bfloat16())[0], grads(y32, (x32,), g)[0], grads(eager, (x,), g.bfloat16())[0],
                  1e-2, "grad x")


@pytest.mark.parametrize("backend", _backends("cross_entropy"))
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_linear_cross_entropy_llama_head_bf16(backend, vocab):
    rows, hidden_size = 2048, 4096
    hidden = torch.randn(rows, hidden_size, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) / 64).bfloat16()
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[: rows // 4] = -100
    loss = fp.linear_cross_entropy(hidden, weight, labels, backend=backend)
    logits = hidden.detach().float() @ weight.float().t()
    want = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, want, rtol=2e-3, atol=2e-3)
    loss.backward()
    h32 = hidden.detach().float().requires_grad_()
    torch.nn.functional.cross_entropy(h32 @ weight.float().t(), labels).backward()
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=5e-2, atol=5e-6)
