"""Shapes at the op boundary.

One x feeding several adapter layers (q/k/v, gate/up): autograd must sum their gradients for x in
place. An op whose input is a view of x, or whose grad_x is a view, makes the engine add out of
place and hold one more x-sized tensor at the peak of the backward (what F.linear on 3-D input,
and so PEFT, pays). And batches with no rows at all."""

import pytest
import torch
import torch.nn as nn

import fusedpeft as fp
from fusedpeft import backends


def _out_of_place_add_shapes(step) -> list:
    """Input shapes of every aten::add (the out-of-place one; add_ is in place) that step() runs.

    The profiler, not a TorchDispatchMode: a Python mode gives every intermediate a Python object,
    which itself stops the engine from adding in place."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return [tuple(tuple(s) for s in e.input_shapes if s) for e in prof.events() if e.name == "aten::add"]


def _layers(kind, backend):
    torch.manual_seed(0)
    bases = [nn.Linear(48, d, bias=False).requires_grad_(False) for d in (48, 16, 16)]
    if kind == "lora":
        return [fp.LoRALinear(b, r=4, alpha=8, backend=backend) for b in bases]
    return [fp.MoRALinear(b, r=4, mora_type=6, backend=backend) for b in bases]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["lora", "mora"])
@pytest.mark.parametrize("shape", [(70, 48), (2, 35, 48)])
def test_gradients_of_a_shared_input_are_summed_in_place(kind, backend, shape):
    if backends.unavailable_reason(backend) is not None:
        pytest.skip(backends.unavailable_reason(backend))
    layers = _layers(kind, backend)
    x = torch.randn(*shape, requires_grad=True)
    out = torch.cat([layer(x) for layer in layers], -1)
    grad_out = torch.randn_like(out)
    adds = _out_of_place_add_shapes(lambda: out.backward(grad_out))
    assert not [a for a in adds if tuple(x.shape) in a], f"grad_x summed out of place: {adds}"
    # and the sum is right
    x2 = x.detach().clone().requires_grad_(True)
    (grad_x2,) = torch.autograd.grad([layer(x2) for layer in layers],
                                     [x2], list(grad_out.split([48, 16, 16], -1)))
    torch.testing.assert_close(x.grad, grad_x2)


def test_layer_output_can_be_modified_in_place():
    """The output of a 3-D call is a plain tensor (not a view made inside the op)."""
    layer = _layers("lora", "torch")[0]
    x = torch.randn(2, 5, 48, requires_grad=True)
    y = layer(x)
    y.mul_(2.0)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind,mora_type,dropout", [("lora", None, 0.0), ("lora", None, 0.1), ("mora", 1, 0.0),
                                                     ("mora", 6, 0.0), ("mora", 6, 0.1)])
@pytest.mark.parametrize("shape", [(0, 48), (2, 0, 48)])
def test_empty_batch(kind, mora_type, dropout, backend, shape):
    """No rows at all (an empty micro-batch): right shapes forward and backward, no error."""
    if backends.unavailable_reason(backend) is not None:
        pytest.skip(backends.unavailable_reason(backend))
    base = nn.Linear(48, 20)
    layer = (fp.LoRALinear(base, r=4, dropout=dropout, backend=backend) if kind == "lora"
             else fp.MoRALinear(base, r=4, mora_type=mora_type, dropout=dropout, backend=backend))
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (*shape[:-1], 20) and x.grad.shape == x.shape
