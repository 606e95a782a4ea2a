"""Every custom op: torch.library.opcheck (schema, fake, autograd registration, AOT dispatch)
and gradcheck in float64 against finite differences, on every backend that can run here."""

import os

import pytest
import torch
from torch.library import opcheck

from fusedpeft.ops.cross_entropy import (
    cross_entropy_backward_op,
    cross_entropy_op,
    linear_cross_entropy_backward_op,
    linear_cross_entropy_op,
    row_scale_and_labels,
)
from fusedpeft.ops.lora import lora_linear_backward_op, lora_linear_op
from fusedpeft.ops.mora import mora_linear_backward_op, mora_linear_op
from helpers import runnable

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _gradcheck(fn, inputs, backend: str) -> None:
    """float64 gradcheck against finite differences. Triton under the interpreter uses fast mode
    (one random projection of the Jacobian instead of every column): the full mode needs ~1700
    interpreted launches per op."""
    torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton" and INTERPRET)


def _lora_inputs(dtype, dropout_p, bias=True):
    x = torch.randn(7, 33, dtype=dtype, requires_grad=True)
    weight = torch.randn(65, 33, dtype=dtype)
    b = torch.randn(65, dtype=dtype) if bias else None
    A = torch.randn(4, 33, dtype=dtype, requires_grad=True)
    B = torch.randn(65, 4, dtype=dtype, requires_grad=True)
    seed = torch.tensor(20251128) if dropout_p else None
    return x, weight, b, A, B, 0.75, dropout_p, seed


@pytest.mark.parametrize("backend", runnable("lora"))
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_op(backend, dropout_p, bias):
    args = _lora_inputs(torch.float64, dropout_p, bias)
    opcheck(lora_linear_op, (*args, backend))
    x, weight, b, A, B, scaling, p, seed = args
    grad_y = torch.randn(7, 65, dtype=torch.float64)
    S = torch.randn(7, 4, dtype=torch.float64)
    keep = lora_linear_op(*args, backend)[2]  # the saved dropout mask (torch backend on CPU), else empty
    assert keep.dtype == torch.bool and keep.shape == ((7, 33) if backend == "torch" and dropout_p else (0,))
    opcheck(lora_linear_backward_op, (grad_y, x.detach(), weight, A.detach(), B.detach(), S, keep, scaling, p, seed,
                                      True, False, True, backend))
    _gradcheck(lambda x, A, B: lora_linear_op(x, weight, b, A, B, scaling, p, seed, backend)[0], (x, A, B), backend)


def _mora_inputs(dtype, mora_type, k, d, r_hat, dropout_p, rows=9):
    x = torch.randn(rows, k, dtype=dtype, requires_grad=True)
    weight = torch.randn(d, k, dtype=dtype)
    M = torch.randn(r_hat, r_hat, dtype=dtype, requires_grad=True)
    return x, weight, torch.randn(d, dtype=dtype), M, mora_type, dropout_p, torch.tensor(7) if dropout_p else None


@pytest.mark.parametrize("backend", runnable("mora"))
@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k,d,r_hat", [(13, 29, 6), (30, 7, 6)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_mora_op(backend, mora_type, k, d, r_hat, dropout_p):
    args = _mora_inputs(torch.float64, mora_type, k, d, r_hat, dropout_p)
    opcheck(mora_linear_op, (*args, backend))
    x, weight, bias, M, t, p, seed = args
    grad_y = torch.randn(x.shape[0], d, dtype=torch.float64)
    opcheck(mora_linear_backward_op, (grad_y, x.detach(), weight, M.detach(), t, p, seed, True, True, backend))
    _gradcheck(lambda x, M: mora_linear_op(x, weight, bias, M, t, p, seed, backend), (x, M), backend)


@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_op_merged_strategy_gradcheck(backend, mora_type):
    """Enough rows that the torch backend takes the merged-weight strategy."""
    x, weight, bias, M, t, p, seed = _mora_inputs(torch.float64, mora_type, 13, 29, 6, 0.0, rows=70)
    torch.autograd.gradcheck(lambda x, M: mora_linear_op(x, weight, bias, M, t, p, seed, backend), (x, M))


def _ce_inputs(dtype, reduce, n=11, vocab=13):
    logits = torch.randn(n, vocab, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    labels[2] = -100
    mask = torch.rand(n) < 0.4
    weights = torch.rand(n, dtype=dtype)
    scale, safe = row_scale_and_labels(labels, vocab, instruction_mask=mask, instruction_weight=0.3,
                                       token_weights=weights, reduction="mean" if reduce else "none", dtype=dtype)
    return logits, safe, scale


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("options", [(0.0, 0.0, None), (0.1, 1e-3, 5.0)])
def test_cross_entropy_op(backend, reduce, options):
    logits, labels, scale = _ce_inputs(torch.float64, reduce)
    opcheck(cross_entropy_op, (logits, labels, scale, reduce, *options, backend))
    loss, lse = cross_entropy_op(logits.detach(), labels, scale, reduce, *options, backend)
    grad = torch.randn_like(loss)
    opcheck(cross_entropy_backward_op, (grad, logits.detach(), labels, scale, lse, *options, backend))
    _gradcheck(lambda z: cross_entropy_op(z, labels, scale, reduce, *options, backend)[0], (logits,), backend)


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("options", [(0.0, 0.0, None), (0.1, 1e-3, 5.0)])
def test_linear_cross_entropy_op(backend, reduce, options):
    _, labels, scale = _ce_inputs(torch.float64, reduce)
    hidden = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    budget = 13 * 8 * 3  # three rows per chunk: several chunks
    args = (hidden, weight, bias, labels, scale, reduce, *options, budget, True, True, True, backend)
    opcheck(linear_cross_entropy_op, args)
    grad = torch.randn(11, dtype=torch.float64)
    opcheck(linear_cross_entropy_backward_op, (grad, hidden.detach(), weight.detach(), bias.detach(), labels, scale,
                                               *options, budget, True, False, True, backend))

    def loss(h, w, b):
        return linear_cross_entropy_op(h, w, b, labels, scale, reduce, *options, budget, True, True, True, backend)[0]

    _gradcheck(loss, (hidden, weight, bias), backend)


# Outside torch.compile the ops run through their eager twins (same body, setup_context and
# backward, without torch.library's per-call dispatch): check that path on its own.


def _ran_eagerly(out: torch.Tensor, name: str) -> bool:
    """True when out's autograd node (or the one under a final reshape) is the op's eager twin."""
    nodes = [out.grad_fn] + [n for n, _ in out.grad_fn.next_functions if n is not None]
    return any(type(n).__name__.startswith(f"_{name}_eager") for n in nodes)


def test_eager_twins_are_used_and_pass_gradcheck():
    from fusedpeft.ops import cross_entropy as ce_ops, lora as lora_ops, lora_grouped as grouped_ops
    from fusedpeft.ops import mora as mora_ops

    x, weight, b, A, B, scaling, p, seed = _lora_inputs(torch.float64, 0.25)
    y = lora_ops.lora_linear(x, weight, b, A, B, scaling, p, seed, backend="torch")
    assert _ran_eagerly(y, "lora_linear")
    torch.autograd.gradcheck(lambda x, A, B: lora_ops.lora_linear(x, weight, b, A, B, scaling, p, seed, "torch"),
                             (x, A, B))

    weights, biases = [weight, weight[:20]], [b, None]
    As, Bs = [A, A[:3].detach().clone().requires_grad_()], [B, B[:20, :3].detach().clone().requires_grad_()]
    ys = grouped_ops.lora_linear_grouped(x, weights, biases, As, Bs, [scaling, 2.0], p, seed, backend="torch")
    assert all(_ran_eagerly(y, "lora_linear_grouped") for y in ys)
    torch.autograd.gradcheck(
        lambda x, *ab: tuple(grouped_ops.lora_linear_grouped(x, weights, biases, ab[:2], ab[2:], [scaling, 2.0], p,
                                                             seed, backend="torch")),
        (x, *As, *Bs))

    x, weight, bias, M, t, p, seed = _mora_inputs(torch.float64, 6, 13, 29, 6, 0.3)
    assert _ran_eagerly(mora_ops.mora_linear(x, weight, bias, M, t, p, seed), "mora_linear")
    torch.autograd.gradcheck(lambda x, M: mora_ops.mora_linear(x, weight, bias, M, t, p, seed), (x, M))

    logits = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5))
    loss = ce_ops.cross_entropy(logits, labels, label_smoothing=0.1, softcap=4.0)
    assert _ran_eagerly(loss, "cross_entropy")
    torch.autograd.gradcheck(lambda z: ce_ops.cross_entropy(z, labels, reduction="none", z_loss=0.01), (logits,))

    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    head = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        loss = ce_ops.linear_cross_entropy(hidden, head, labels, reduction=reduction, chunk_budget_bytes=200)
        assert _ran_eagerly(loss, "linear_cross_entropy")
        torch.autograd.gradcheck(
            lambda h, w: ce_ops.linear_cross_entropy(h, w, labels, reduction=reduction, chunk_budget_bytes=200),
            (hidden, head))


def _fusedpeft_ops() -> set[str]:
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fusedpeft::")}


def test_import_fusedpeft_registers_every_op():
    """A fresh interpreter with only ``import fusedpeft`` has every fusedpeft:: op registered (a
    torch.export-ed graph holding one must load without importing the module that defines it);
    "every op" = what importing every module of the package registers."""
    import importlib
    import pkgutil
    import subprocess
    import sys

    import fusedpeft

    for module in pkgutil.walk_packages(fusedpeft.__path__, "fusedpeft."):
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional dependency missing here: whatever it registers is not expected
            pass
    every = _fusedpeft_ops()
    assert "fusedpeft::lora_linear_grouped" in every
    code = ("import torch, fusedpeft\n"
            "print(*sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('fusedpeft::')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(fusedpeft.__file__)))
    assert set(out.stdout.split()) == every
