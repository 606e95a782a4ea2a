"""fusedpeft.linear_log_probs (the TRL head's per-token outputs) against float64 full logits:
every output, gradients of log_probs and entropy to hidden, weight and bias, temperature, softcap,
ignored rows, small chunks; 16-bit within twice plain PyTorch's error; bad input."""

import itertools

import pytest
import torch

import fusedpeft as fp
from helpers import assert_within, runnable

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def reference(h, w, b, y, temperature=1.0, softcap=None):
    z = h.double() @ w.double().t() + (0 if b is None else b.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    valid = y != -100
    out = {"log_probs": logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], "entropy": -(logp.exp() * logp).sum(-1),
           "log_sum_sq_probs": torch.logsumexp(2 * logp, -1), "mean_logits": z.mean(-1),
           "is_top1": z.argmax(-1) == y}
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def _inputs(n=13, h=8, v=37, dtype=torch.float64, bias=False, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, requires_grad=True)
    b = torch.randn(v, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[[2, 5]] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
@pytest.mark.parametrize("temperature,softcap,bias,outputs",
                         [(1.0, None, False, ("log_probs",)), (0.7, 3.0, True, ("log_probs",)),
                          (1.0, None, True, ALL), (0.7, 3.0, False, ALL), (1.3, None, False, ("log_probs", "entropy"))])
def test_float64_outputs_and_gradients(backend, temperature, softcap, bias, outputs):
    hidden, weight, b, labels = _inputs(bias=bias)
    budget = 3 * weight.shape[0] * 16  # a few rows per chunk
    out = fp.linear_log_probs(hidden, weight, labels, b, outputs=outputs, temperature=temperature, softcap=softcap,
                              chunk_budget_bytes=budget, backend=backend)
    ref = reference(hidden, weight, b, labels, temperature, softcap)
    assert set(out) == set(outputs) | {"log_probs"}
    for key, value in out.items():
        if key == "is_top1":
            assert value.dtype == torch.bool and torch.equal(value, ref[key])
        else:
            torch.testing.assert_close(value, ref[key], rtol=1e-12, atol=1e-12, msg=key)
    g_lp, g_h = torch.randn(labels.shape, dtype=torch.float64), torch.randn(labels.shape, dtype=torch.float64)
    params = [p for p in (hidden, weight, b) if p is not None]

    def objective(o):
        return (g_lp * o["log_probs"]).sum() + ((g_h * o["entropy"]).sum() if "entropy" in outputs else 0.0)

    for got, want in zip(torch.autograd.grad(objective(out), params), torch.autograd.grad(objective(ref), params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_low_precision_within_plain_pytorch(dtype, atol):
    hidden, weight, _, labels = _inputs(n=33, h=24, v=301, dtype=dtype, seed=1)
    out = fp.linear_log_probs(hidden, weight, labels, outputs=ALL)
    ref = reference(hidden, weight, None, labels)
    logp_plain = torch.log_softmax((hidden @ weight.t()).float(), -1)
    plain = {"log_probs": logp_plain.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100),
             "entropy": -(logp_plain.exp() * logp_plain).sum(-1) * (labels != -100)}
    for key in ("log_probs", "entropy"):
        assert out[key].dtype == torch.float32
        assert_within(out[key], ref[key], plain[key], atol, key)
    g = torch.randn(labels.shape)
    got = torch.autograd.grad((g * out["log_probs"]).sum(), [hidden, weight])
    want = torch.autograd.grad((g * ref["log_probs"]).sum(), [hidden, weight])
    base = torch.autograd.grad((g * plain["log_probs"]).sum(), [hidden, weight])
    for a, b, c, name in zip(got, want, base, ("hidden", "weight")):
        assert a.dtype == dtype
        assert_within(a, b, c, atol, name)


def test_all_rows_ignored_gives_zeros_and_zero_gradients():
    hidden, weight, _, labels = _inputs()
    labels.fill_(-100)
    out = fp.linear_log_probs(hidden, weight, labels, outputs=ALL)
    assert all(not v.any() for v in out.values())
    grad = torch.autograd.grad(out["log_probs"].sum() + out["entropy"].sum(), hidden)[0]
    assert not grad.any()


def test_bad_input():
    hidden, weight, _, labels = _inputs()
    for kwargs, error, match in itertools.chain(
            [({"outputs": ("log_probs", "logits")}, ValueError, "unknown output"),
             ({"outputs": "entropy"}, TypeError, "outputs must be a tuple of names"),
             ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
             ({"softcap": -1.0}, ValueError, "softcap must be a finite number > 0 or None"),
             ({"chunk_budget_bytes": 0}, ValueError, "chunk_budget_bytes must be a positive integer"),
             ({"backend": "tpu"}, ValueError, "backend='tpu' is not a fusedpeft backend")]):
        with pytest.raises(error, match=match):
            fp.linear_log_probs(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="labels has shape"):
        fp.linear_log_probs(hidden, weight, labels[:-1])
    with pytest.raises(TypeError, match="weight has dtype torch.float32"):
        fp.linear_log_probs(hidden, weight.float(), labels)
    bad = labels.clone()
    bad[0] = 37
    with pytest.raises(ValueError, match=r"labels\[0\] = 37 is outside \[0, 37\)"):
        fp.linear_log_probs(hidden, weight, bad)


@pytest.mark.parametrize("outputs", [1, 31])
def test_custom_op_schema_fake_and_autograd(outputs):
    """torch.library.opcheck: the op's schema, fake (meta) kernel and autograd registration agree,
    which torch.compile relies on (log p alone, and every output)."""
    from fusedpeft.ops.log_probs import linear_log_probs_op

    hidden, weight, _, labels = _inputs(n=6, h=4, v=11)
    mask = (labels != -100).double()
    torch.library.opcheck(linear_log_probs_op, (hidden, weight, None, labels.clamp(min=0), mask, outputs, 1.0, None,
                                                4096, "torch"))
