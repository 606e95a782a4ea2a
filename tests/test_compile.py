"""torch.compile(fullgraph=True) of every public module: no graph break, same numbers as eager."""

import pytest
import torch
from torch import nn

import fusedpeft as fp


def _compare(module, inputs, call=None):
    call = call or (lambda m, *a: m(*a))
    eager_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    compiled = torch.compile(module, fullgraph=True)
    out = call(compiled, *inputs)
    want = call(module, *eager_inputs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    for got, expected in zip(inputs, eager_inputs):
        if got.requires_grad:
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lora_linear_compiles():
    layer = fp.LoRALinear(nn.Linear(24, 40), r=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    _compare(layer, [torch.randn(2, 5, 24, requires_grad=True)])


@pytest.mark.slow
def test_lora_linear_with_dropout_compiles():
    layer = fp.LoRALinear(nn.Linear(24, 40), r=4, dropout=0.1)
    y = torch.compile(layer, fullgraph=True)(torch.randn(2, 5, 24, requires_grad=True))
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_linear_compiles(mora_type):
    layer = fp.MoRALinear(nn.Linear(30, 50), r=2, mora_type=mora_type)
    with torch.no_grad():
        layer.M.normal_()
    _compare(layer, [torch.randn(3, 7, 30, requires_grad=True)])


@pytest.mark.slow
def test_masked_cross_entropy_loss_compiles():
    loss = fp.MaskedCrossEntropyLoss(instruction_weight=0.1, label_smoothing=0.1)
    labels, mask = torch.randint(0, 50, (3, 7)), torch.rand(3, 7) < 0.5
    _compare(loss, [torch.randn(3, 7, 50, requires_grad=True)],
             call=lambda m, z: m(z, labels, instruction_mask=mask, num_items_in_batch=torch.tensor(9)))


@pytest.mark.slow
def test_linear_cross_entropy_loss_compiles():
    loss = fp.LinearCrossEntropyLoss(z_loss=1e-3, softcap=5.0, chunk_budget_bytes=2000)
    labels, weights = torch.randint(0, 50, (3, 7)), torch.rand(3, 7)
    _compare(loss, [torch.randn(3, 7, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)],
             call=lambda m, h, w: m(h, w, labels, token_weights=weights))
