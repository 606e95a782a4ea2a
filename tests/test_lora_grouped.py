"""Grouped LoRA (fusedpeft.fused.lora_grouped.lora_group_forward, op fusedpeft::lora_linear_grouped)
on every backend with a grouped implementation, against separate layers and the reference."""

import pytest
import torch
from torch import nn
from torch.library import opcheck

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.fused.lora_grouped import lora_group_forward
from fusedpeft.ops.lora_grouped import lora_linear_grouped_backward_op, lora_linear_grouped_op
from helpers import assert_within, runnable

BACKENDS = [b for b in runnable("lora") if b in ("torch", "triton")]
# q/k/v-like: different out_features and ranks, one layer without bias
GROUP = [(40, 3, True), (20, 1, False), (17, 16, True)]


def make_group(k, dtype, backend, dropout=0.0, spec=GROUP):
    layers = []
    for d, r, bias in spec:
        layer = fp.LoRALinear(nn.Linear(k, d, bias=bias).to(dtype), r=r, alpha=2.0 * r, dropout=dropout,
                              backend=backend)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        layers.append(layer)
    return layers


def params(layers):
    return [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_group_equals_separate_layers_without_dropout(backend, dtype, atol):
    """Dropout 0: outputs and every gradient as calling each layer on its own (the separate layers'
    error against float64 is the yardstick: 2x it + atol)."""
    k = 33
    layers = make_group(k, dtype, backend)
    x = torch.randn(2, 4, k, dtype=dtype, requires_grad=True)
    ys = lora_group_forward(layers, x)
    separate = [layer(x) for layer in layers]
    inputs = [x, *params(layers)]
    x64 = x.detach().double().requires_grad_()
    adapters64 = [p.detach().double().requires_grad_() for p in params(layers)]
    ys64 = [ref.lora_linear(x64, layer.base_layer.weight.double(),
                            None if layer.base_layer.bias is None else layer.base_layer.bias.double(),
                            adapters64[2 * i], adapters64[2 * i + 1], layer.scaling)
            for i, layer in enumerate(layers)]
    for y, y_sep, y64 in zip(ys, separate, ys64):
        assert y.dtype == dtype and y.shape == y_sep.shape
        assert_within(y, y64, y_sep, atol, "y")
    gs = [torch.randn_like(y64) for y64 in ys64]
    total = sum((y.double() * g).sum() for y, g in zip(ys, gs))
    total_sep = sum((y.double() * g).sum() for y, g in zip(separate, gs))
    total64 = sum((y * g).sum() for y, g in zip(ys64, gs))
    got = torch.autograd.grad(total, inputs)
    want = torch.autograd.grad(total64, [x64, *adapters64])
    yard = torch.autograd.grad(total_sep, inputs)
    for i, (a, b, c) in enumerate(zip(got, want, yard)):
        assert_within(a, b, c, atol, f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_with_dropout_uses_one_shared_mask(backend):
    """p > 0: one seed drawn for the group; every layer equals the reference with that seed."""
    k, p = 33, 0.3
    layers = make_group(k, torch.float32, backend, dropout=p)
    x = torch.randn(7, k, requires_grad=True)
    state = torch.get_rng_state()
    ys = lora_group_forward(layers, x)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    assert torch.equal(torch.get_rng_state(), after)  # the group drew exactly one seed
    gs = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, gs)), [x, *params(layers)])
    x64 = x.detach().double().requires_grad_()
    adapters64 = [q.detach().double().requires_grad_() for q in params(layers)]
    total64 = 0
    for i, (layer, y, g) in enumerate(zip(layers, ys, gs)):
        bias = layer.base_layer.bias
        y64 = ref.lora_linear(x64, layer.base_layer.weight.double(), None if bias is None else bias.double(),
                              adapters64[2 * i], adapters64[2 * i + 1], layer.scaling, p, seed)
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
        total64 = total64 + (y64 * g.double()).sum()
    for a, b in zip(got, torch.autograd.grad(total64, [x64, *adapters64])):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_output_and_stride0_gradient(backend):
    """Only the first and last outputs feed the loss (the middle one gets no gradient), through
    .sum() (stride-0 gradients); x is a non-contiguous view."""
    layers = make_group(20, torch.float32, backend, dropout=0.2)
    x = torch.randn(20, 6).t().requires_grad_()
    state = torch.get_rng_state()
    ys = lora_group_forward(layers, x)
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    (ys[0].sum() + ys[2].sum()).backward()
    x64 = x.detach().double().requires_grad_()
    loss64 = 0
    for i in (0, 2):
        layer = layers[i]
        loss64 = loss64 + ref.lora_linear(x64, layer.base_layer.weight.double(), layer.base_layer.bias.double(),
                                          layer.lora_A.weight.double(), layer.lora_B.weight.double(), layer.scaling,
                                          0.2, seed).sum()
    loss64.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(layers[1].lora_B.weight.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_x_and_S_only(backend):
    n = 5
    layers = make_group(24, torch.float32, backend, dropout=0.1)
    x = torch.randn(n, 24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_group_forward(layers, x)
    activations = sorted(tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[0] == n)
    assert activations == [(n, 20), (n, 24)]  # S is [N, 3 + 1 + 16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_grouped_op_opcheck_and_gradcheck(backend, dropout_p):
    """opcheck of both ops (schema, fake, autograd registration, AOT dispatch) and a float64
    gradcheck (fast mode: a random projection of the Jacobian) of the grouped op."""
    dt = torch.float64
    x = torch.randn(5, 9, dtype=dt, requires_grad=True)
    weights = [torch.randn(d, 9, dtype=dt) for d in (6, 4)]
    biases = [torch.randn(6, dtype=dt), torch.empty(0, dtype=dt)]  # empty: no bias
    As = [torch.randn(r, 9, dtype=dt, requires_grad=True) for r in (2, 1)]
    Bs = [torch.randn(d, r, dtype=dt, requires_grad=True) for d, r in ((6, 2), (4, 1))]
    seed = torch.tensor(20251128) if dropout_p else None
    args = (x, weights, biases, As, Bs, [0.5, 2.0], dropout_p, seed, backend)
    opcheck(lora_linear_grouped_op, args)
    S = torch.randn(5, 3, dtype=dt)
    grad_ys = [torch.randn(5, 6, dtype=dt), torch.randn(5, 4, dtype=dt)]
    opcheck(lora_linear_grouped_backward_op, (grad_ys, x.detach(), weights, [a.detach() for a in As],
                                              [b.detach() for b in Bs], S, [0.5, 2.0], dropout_p, seed, True, True,
                                              False, backend))

    def f(x, A0, A1, B0, B1):
        return tuple(lora_linear_grouped_op(x, weights, biases, [A0, A1], [B0, B1], [0.5, 2.0], dropout_p, seed,
                                            backend)[:2])

    torch.autograd.gradcheck(f, (x, *As, *Bs), fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_compiles_fullgraph(backend):
    layers = make_group(24, torch.float32, backend)
    x = torch.randn(2, 3, 24, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    ys = torch.compile(lambda t: lora_group_forward(layers, t), fullgraph=True)(x)
    want = lora_group_forward(layers, x_eager)
    for y, w in zip(ys, want):
        torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-5)
    sum(y.sum() for y in ys).backward()
    sum(w.sum() for w in want).backward()
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


def test_bad_groups_raise_before_running():
    k = 8
    a, b = make_group(k, torch.float32, "torch", spec=[(6, 2, True), (5, 2, True)])
    x = torch.randn(3, k)
    with pytest.raises(TypeError, match="layers must be a sequence .* of LoRALinear, got LoRALinear"):
        lora_group_forward(a, x)
    with pytest.raises(ValueError, match="layers is empty"):
        lora_group_forward([], x)
    with pytest.raises(TypeError, match=r"layers\[1\] must be a fusedpeft.LoRALinear, got Linear"):
        lora_group_forward([a, nn.Linear(k, 3)], x)
    other = fp.LoRALinear(nn.Linear(k + 1, 4), r=2)
    with pytest.raises(ValueError, match=r"layers\[1\] has in_features=9 but layers\[0\] has 8"):
        lora_group_forward([a, other], x)
    with pytest.raises(ValueError, match=r"layers\[1\] has dropout=0.1 but layers\[0\] has 0.0"):
        lora_group_forward([a, fp.LoRALinear(nn.Linear(k, 4), r=2, dropout=0.1)], x)
    with pytest.raises(ValueError, match=r"layers\[1\] has backend='triton' but layers\[0\] has 'torch'"):
        lora_group_forward([a, fp.LoRALinear(nn.Linear(k, 4), r=2, backend="triton")], x)
    b.eval()
    with pytest.raises(ValueError, match=r"layers\[1\] is in eval mode but layers\[0\] is not"):
        lora_group_forward([a, b], x)
    b.train()
    b.merge()
    with pytest.raises(ValueError, match=r"layers\[1\] is merged"):
        lora_group_forward([a, b], x)
    b.unmerge()
    with pytest.raises(ValueError, match=r"x has shape \(3, 7\).*in_features=8"):
        lora_group_forward([a, b], torch.randn(3, 7))
    assert len(lora_group_forward(nn.ModuleList([a, b]), x)) == 2


@pytest.mark.gpu
def test_llama_qkv_group_bf16_on_gpu():
    """q/k/v of a Llama-8B-like attention (4096 -> 4096, 1024, 1024; r = 16) in bf16 on the GPU,
    triton backend: every output and gradient within 2x the separate layers' error against an
    fp32 evaluation of the same layers, + 1e-2."""
    n, k = 4096, 4096
    layers = [fp.LoRALinear(nn.Linear(k, d, bias=False, device="cuda", dtype=torch.bfloat16), r=16, alpha=32,
                            backend="triton") for d in (4096, 1024, 1024)]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.02)
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ys = lora_group_forward(layers, x)
    separate = [layer(x) for layer in layers]
    xf = x.detach().float().requires_grad_()
    adapters = [p.detach().float().requires_grad_() for p in params(layers)]
    ysf = [ref.lora_linear(xf, layer.base_layer.weight.float(), None, adapters[2 * i], adapters[2 * i + 1],
                           layer.scaling) for i, layer in enumerate(layers)]
    for y, y_sep, yf in zip(ys, separate, ysf):
        assert_within(y, yf.detach(), y_sep.detach(), 1e-2, "y")
    gs = [torch.randn_like(yf) for yf in ysf]
    inputs = [x, *params(layers)]
    got = torch.autograd.grad(sum((y.float() * g).sum() for y, g in zip(ys, gs)), inputs)
    yard = torch.autograd.grad(sum((y.float() * g).sum() for y, g in zip(separate, gs)), inputs)
    want = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ysf, gs)), [xf, *adapters])
    for i, (a, b, c) in enumerate(zip(got, want, yard)):
        assert_within(a, b, c, 1e-2, f"grad {i}")
