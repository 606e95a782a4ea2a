"""Independent spec tests for the losses (docs/contract.md §4, §6).

Oracles: ``torch.nn.functional.cross_entropy`` where it applies (ignore_index, label smoothing,
reductions), and elsewhere an explicit per-token formula written here from docs/contract.md §4 in float64
(log_softmax form, not reference.py's). ``linear_cross_entropy`` is checked against
``masked_cross_entropy`` on materialised logits, and the nn.Modules against the functionals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedpeft as fp

V = 1003  # odd vocabulary (1000 + 3)


def spec_loss(logits, labels, *, instruction_mask=None, instruction_weight=0.0, token_weights=None,
              ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
              num_items_in_batch=None):
    """docs/contract.md §4 in float64, written independently: l_t from log-probabilities, w_t, reductions."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    tgt = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # lse - z[y]
    smooth = -logp.mean(dim=-1)  # lse - mean(z)
    eps = label_smoothing
    per_token = (1 - eps) * nll + eps * smooth + z_loss * lse**2

    w = valid.double()
    if instruction_mask is not None:
        w = w * torch.where(instruction_mask.bool(), torch.full_like(w, instruction_weight), torch.ones_like(w))
    if token_weights is not None:
        w = w * token_weights.double()
    # rows with w == 0 contribute exactly nothing (also no NaN from their gradient)
    contrib = torch.where(w != 0, w * per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return contrib
    total = contrib.sum()
    if reduction == "sum":
        return total
    denom = w.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=torch.float64)
    if float(denom) == 0.0:
        return total * 0.0
    return total / denom


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _grad_close(actual, expected, rel=1e-5):
    """max-norm comparison scaled by the largest expected gradient entry."""
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale + 1e-12, f"gradient error {err:.3e} vs scale {scale:.3e}"


def _labels(shape, n_ignored=2, ignore_index=-100):
    labels = torch.randint(0, V, shape)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = ignore_index
    return labels


# --------------------------------------------------------------------------------------------
# vs F.cross_entropy
# --------------------------------------------------------------------------------------------


def _torch_ce(logits, labels, reduction, label_smoothing, ignore_index=-100):
    out = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                          reduction=reduction, label_smoothing=label_smoothing)
    return out.reshape(labels.shape) if reduction == "none" else out


@pytest.mark.parametrize("shape", [(9,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 7])
def test_matches_torch_fp32(shape, label_smoothing, reduction, ignore_index):
    logits = (torch.randn(*shape, V) * 3).requires_grad_(True)
    labels = _labels(shape, ignore_index=ignore_index)
    if ignore_index == 7:  # make sure some labels equal the custom ignore index, none equal -100
        labels.view(-1)[0] = 7
    x_ref = logits.detach().clone().requires_grad_(True)
    loss = fp.masked_cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing)
    expected = _torch_ce(x_ref, labels, reduction, label_smoothing, ignore_index)
    assert loss.shape == expected.shape
    _close(loss, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(expected) if reduction == "none" else torch.tensor(1.7)
    loss.backward(g)
    expected.backward(g)
    _grad_close(logits.grad, x_ref.grad)


@pytest.mark.parametrize("vocab", [2, 5])
@pytest.mark.parametrize("label_smoothing", [0.1, 0.4])
def test_tiny_vocab_label_smoothing(vocab, label_smoothing):
    """Tiny V makes eps / V visible in the gradient (eps / (V - 1) or a dropped term would fail)."""
    logits = torch.randn(6, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (6,))
    labels[2] = -100
    x_ref = logits.detach().clone().requires_grad_(True)
    loss = fp.masked_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    expected = F.cross_entropy(x_ref, labels, label_smoothing=label_smoothing)
    _close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    _grad_close(logits.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_low_precision_logits_loss_in_fp32(dtype, reduction, label_smoothing):
    shape = (2, 7)
    logits = (torch.randn(*shape, V) * 3).to(dtype).requires_grad_(True)
    labels = _labels(shape)
    loss = fp.masked_cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing)
    # the loss is computed in fp32 from the 16-bit values
    x32 = logits.detach().float().requires_grad_(True)
    expected = _torch_ce(x32, labels, reduction, label_smoothing)
    _close(loss, expected, rtol=1e-5, atol=1e-5)

    g = torch.randn(shape) if reduction == "none" else torch.tensor(1.0)
    loss.backward(g.to(loss.dtype))
    expected.backward(g)
    assert logits.grad.dtype == dtype
    # docs/architecture.md §5: kernel error <= 2 x (PyTorch's own error in that dtype) + atol, vs the fp32 gradient
    x_lp = logits.detach().clone().requires_grad_(True)
    _torch_ce(x_lp, labels, reduction, label_smoothing).backward(g.to(dtype))
    ref32 = x32.grad
    torch_err = max((x_lp.grad.float() - ref32).abs().max().item(),
                    (ref32.to(dtype).float() - ref32).abs().max().item())
    err = (logits.grad.float() - ref32).abs().max().item()
    assert err <= 2 * torch_err + 1e-7, f"{err:.3e} > 2 x {torch_err:.3e}"


# --------------------------------------------------------------------------------------------
# vs the docs/contract.md §4 formula
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("instruction_weight", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("with_token_weights", [False, True], ids=["", "tokw"])
@pytest.mark.parametrize("z_loss,softcap,label_smoothing", [(0.0, None, 0.0), (1e-3, None, 0.0), (0.0, 30.0, 0.0),
                                                            (1e-3, 30.0, 0.1)],
                         ids=["plain", "zloss", "softcap", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_spec_formula(instruction_weight, with_token_weights, z_loss, softcap, label_smoothing, reduction):
    shape = (3, 6)
    logits = (torch.randn(*shape, V) * 12).requires_grad_(True)  # large enough that softcap bends
    labels = _labels(shape, n_ignored=3)
    instruction_mask = torch.zeros(shape, dtype=torch.bool)
    instruction_mask[:, :2] = True  # "prompt" tokens
    token_weights = torch.rand(shape) * 2 if with_token_weights else None
    kw = dict(instruction_mask=instruction_mask, instruction_weight=instruction_weight, token_weights=token_weights,
              reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    loss = fp.masked_cross_entropy(logits, labels, **kw)
    x64 = logits.detach().double().requires_grad_(True)
    expected = spec_loss(x64, labels, **kw)
    assert loss.shape == expected.shape
    _close(loss, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    loss.backward(g.to(loss.dtype))
    expected.backward(g)
    _grad_close(logits.grad, x64.grad)
    # rows whose weight is zero get exactly zero gradient
    w = spec_weights(labels, instruction_mask, instruction_weight, token_weights)
    assert torch.count_nonzero(logits.grad[w == 0]) == 0


def spec_weights(labels, instruction_mask, instruction_weight, token_weights, ignore_index=-100):
    w = (labels != ignore_index).double()
    w = torch.where(instruction_mask, w * instruction_weight, w)
    return w if token_weights is None else w * token_weights.double()


def test_mean_denominator_is_sum_of_weights():
    """Explicit small case: mean = sum w l / sum w, not / count."""
    logits = torch.randn(4, V)
    labels = torch.tensor([1, 2, 3, -100])
    tw = torch.tensor([0.5, 2.0, 0.25, 9.0])
    loss = fp.masked_cross_entropy(logits, labels, token_weights=tw)
    l = torch.logsumexp(logits.double(), -1) - logits.double()[torch.arange(4), labels.clamp(min=0)]
    expected = (0.5 * l[0] + 2.0 * l[1] + 0.25 * l[2]) / 2.75
    _close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["int", "tensor"])
@pytest.mark.parametrize("instruction_weight", [0.0, 0.1])
def test_num_items_in_batch_replaces_denominator(kind, instruction_weight):
    shape = (2, 8)
    logits = torch.randn(*shape, V, requires_grad=True)
    labels = _labels(shape, n_ignored=3)
    instruction_mask = torch.zeros(shape, dtype=torch.bool)
    instruction_mask[:, :3] = True
    n = 37 if kind == "int" else torch.tensor(37)
    kw = dict(instruction_mask=instruction_mask, instruction_weight=instruction_weight, num_items_in_batch=n)
    loss = fp.masked_cross_entropy(logits, labels, **kw)
    x64 = logits.detach().double().requires_grad_(True)
    expected = spec_loss(x64, labels, **kw)
    total = spec_loss(x64.detach(), labels, instruction_mask=instruction_mask, instruction_weight=instruction_weight,
                      reduction="sum")
    _close(expected, total / 37, rtol=1e-12, atol=0)  # guard on the oracle
    _close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    _grad_close(logits.grad, x64.grad)


@pytest.mark.parametrize("how", ["ignore", "instruction", "token_weights"])
def test_all_rows_weightless_gives_exact_zero(how):
    shape = (3, 4)
    logits = torch.randn(*shape, V, requires_grad=True)
    labels = torch.randint(0, V, shape)
    kw = {}
    if how == "ignore":
        labels.fill_(-100)
    elif how == "instruction":
        kw = dict(instruction_mask=torch.ones(shape, dtype=torch.bool), instruction_weight=0.0)
    else:
        kw = dict(token_weights=torch.zeros(shape))
    loss = fp.masked_cross_entropy(logits, labels, z_loss=1e-3, label_smoothing=0.1, **kw)
    assert loss.item() == 0.0 and not torch.isnan(loss).any()
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0 and not torch.isnan(logits.grad).any()
    for red in ("sum", "none"):
        out = fp.masked_cross_entropy(logits.detach(), labels, reduction=red, **kw)
        assert torch.count_nonzero(out) == 0 and not torch.isnan(out).any()


# --------------------------------------------------------------------------------------------
# linear_cross_entropy == masked_cross_entropy(hidden @ weight.T + bias)
# --------------------------------------------------------------------------------------------

LINEAR_KW = [
    dict(),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none", z_loss=1e-3),
    dict(instruction_weight=0.1, z_loss=1e-3, softcap=30.0, label_smoothing=0.1, with_mask=True, with_tw=True),
    dict(instruction_weight=0.0, with_mask=True, num_items_in_batch=11),
    dict(with_tw=True, num_items_in_batch="tensor"),
]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("chunk_budget", [None, 4096], ids=["default", "tiny-chunks"])
@pytest.mark.parametrize("kw", LINEAR_KW, ids=["mean", "sum-ls", "none-z", "all", "instr0-n", "tw-ntensor"])
def test_linear_matches_masked_on_materialised_logits(kw, chunk_budget, with_bias):
    kw = dict(kw)
    shape, H = (2, 7), 24
    hidden = torch.randn(*shape, H)
    weight = torch.randn(V, H) / H**0.5 * 4
    bias = torch.randn(V) if with_bias else None
    labels = _labels(shape, n_ignored=3)
    if kw.pop("with_mask", False):
        m = torch.zeros(shape, dtype=torch.bool)
        m[:, :2] = True
        kw["instruction_mask"] = m
    if kw.pop("with_tw", False):
        kw["token_weights"] = torch.rand(shape) * 2
    if kw.get("num_items_in_batch") == "tensor":
        kw["num_items_in_batch"] = torch.tensor(13)

    leaves_l = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    leaves_m = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    extra = {} if chunk_budget is None else dict(chunk_budget_bytes=chunk_budget)
    b_l = leaves_l[2] if with_bias else None
    loss_l = fp.linear_cross_entropy(leaves_l[0], leaves_l[1], labels, b_l, **kw, **extra)
    logits = leaves_m[0] @ leaves_m[1].t()
    if with_bias:
        logits = logits + leaves_m[2]
    loss_m = fp.masked_cross_entropy(logits, labels, **kw)
    assert loss_l.shape == loss_m.shape
    _close(loss_l, loss_m, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape) if kw.get("reduction") == "none" else torch.tensor(1.0)
    loss_l.backward(g)
    loss_m.backward(g)
    for a, b in zip(leaves_l, leaves_m):
        _grad_close(a.grad, b.grad)
    # and against the docs/contract.md §4 formula directly
    h64 = hidden.double()
    logits64 = h64 @ weight.double().t() + (bias.double() if with_bias else 0.0)
    _close(loss_l, spec_loss(logits64, labels, **kw), rtol=1e-5, atol=1e-5)


def test_linear_all_ignored_is_zero_with_zero_grads():
    hidden = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    labels = torch.full((5,), -100)
    loss = fp.linear_cross_entropy(hidden, weight, labels, chunk_budget_bytes=4096)
    assert loss.item() == 0.0
    loss.backward()
    for t in (hidden, weight):
        assert t.grad is None or (torch.count_nonzero(t.grad) == 0 and not torch.isnan(t.grad).any())


# --------------------------------------------------------------------------------------------
# nn.Module wrappers
# --------------------------------------------------------------------------------------------

MODULE_KW = dict(instruction_weight=0.1, ignore_index=-100, reduction="mean", label_smoothing=0.05, z_loss=1e-4,
                 softcap=30.0)


def test_masked_module_equals_functional():
    shape = (2, 6)
    logits = torch.randn(*shape, V) * 5
    labels = _labels(shape)
    m = torch.zeros(shape, dtype=torch.bool)
    m[:, :2] = True
    tw = torch.rand(shape)
    module = fp.MaskedCrossEntropyLoss(**MODULE_KW)
    for k, v in MODULE_KW.items():
        assert getattr(module, k) == v, k
    for n in (None, 9, torch.tensor(9)):
        a = module(logits, labels, instruction_mask=m, token_weights=tw, num_items_in_batch=n)
        b = fp.masked_cross_entropy(logits, labels, instruction_mask=m, token_weights=tw, num_items_in_batch=n,
                                    **MODULE_KW)
        _close(a, b, rtol=1e-6, atol=1e-6)
    _close(fp.MaskedCrossEntropyLoss(reduction="sum")(logits, labels),
           fp.masked_cross_entropy(logits, labels, reduction="sum"), rtol=1e-6, atol=1e-6)


def test_linear_module_equals_functional():
    shape, H = (2, 6), 16
    hidden, weight, bias = torch.randn(*shape, H), torch.randn(V, H), torch.randn(V)
    labels = _labels(shape)
    m = torch.zeros(shape, dtype=torch.bool)
    m[:, :2] = True
    tw = torch.rand(shape)
    module = fp.LinearCrossEntropyLoss(**MODULE_KW)
    for k, v in MODULE_KW.items():
        assert getattr(module, k) == v, k
    for n in (None, 9):
        a = module(hidden, weight, labels, bias, instruction_mask=m, token_weights=tw, num_items_in_batch=n)
        b = fp.linear_cross_entropy(hidden, weight, labels, bias, instruction_mask=m, token_weights=tw,
                                    num_items_in_batch=n, **MODULE_KW)
        _close(a, b, rtol=1e-6, atol=1e-6)
    _close(module(hidden, weight, labels), fp.linear_cross_entropy(hidden, weight, labels, **MODULE_KW),
           rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input (docs/contract.md §6): the message names the argument; nothing is modified
# --------------------------------------------------------------------------------------------

ERRORS = (ValueError, TypeError)


def test_bad_labels_shape():
    logits = torch.randn(4, 11)
    before = logits.clone()
    with pytest.raises(ERRORS, match="labels"):
        fp.masked_cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ERRORS, match="labels"):
        fp.masked_cross_entropy(logits.view(2, 2, 11), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ERRORS, match="labels"):
        fp.linear_cross_entropy(torch.randn(4, 8), torch.randn(11, 8), torch.zeros(3, dtype=torch.long))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("bad", [11, 1000, -5, -1])
def test_bad_label_value(bad):
    logits = torch.randn(4, 11, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.tensor([0, 3, bad, -100])
    with pytest.raises(ERRORS, match="labels"):
        fp.masked_cross_entropy(logits, labels)
    with pytest.raises(ERRORS, match="labels"):
        fp.linear_cross_entropy(torch.randn(4, 8), torch.randn(11, 8), labels)
    assert torch.equal(logits.detach(), before)


def test_ignore_index_is_not_a_bad_label():
    logits = torch.randn(3, 11)
    loss = fp.masked_cross_entropy(logits, torch.tensor([0, 5, -1]), ignore_index=-1)
    _close(loss, F.cross_entropy(logits, torch.tensor([0, 5, -1]), ignore_index=-1), rtol=1e-5, atol=1e-6)


def test_hidden_weight_dtype_mismatch():
    with pytest.raises(ERRORS, match=r"(?s)(hidden.*weight|weight.*hidden)"):
        fp.linear_cross_entropy(torch.randn(4, 8), torch.randn(11, 8, dtype=torch.float64),
                                torch.zeros(4, dtype=torch.long))
    with pytest.raises(ERRORS, match=r"(?s)(hidden.*weight|weight.*hidden)"):
        fp.linear_cross_entropy(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(11, 8),
                                torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("bad", ["negative", "nan"])
@pytest.mark.parametrize("entry", ["masked", "linear"])
def test_bad_token_weights(bad, entry):
    tw = torch.rand(4)
    tw[1] = -0.5 if bad == "negative" else float("nan")
    labels = torch.tensor([0, 3, 5, 7])
    with pytest.raises(ERRORS, match="token_weights"):
        if entry == "masked":
            fp.masked_cross_entropy(torch.randn(4, 11), labels, token_weights=tw)
        else:
            fp.linear_cross_entropy(torch.randn(4, 8), torch.randn(11, 8), labels, token_weights=tw)


@pytest.mark.parametrize("arg", ["instruction_mask", "token_weights"])
@pytest.mark.parametrize("entry", ["masked", "linear"])
def test_bad_mask_or_weights_shape(arg, entry):
    labels = torch.tensor([0, 3, 5, 7])
    bad = torch.ones(5, dtype=torch.bool) if arg == "instruction_mask" else torch.rand(5)
    with pytest.raises(ERRORS, match=arg):
        if entry == "masked":
            fp.masked_cross_entropy(torch.randn(4, 11), labels, **{arg: bad})
        else:
            fp.linear_cross_entropy(torch.randn(4, 8), torch.randn(11, 8), labels, **{arg: bad})


def test_hidden_weight_width_mismatch():
    with pytest.raises(ERRORS, match=r"(?s)(hidden.*weight|weight.*hidden)"):
        fp.linear_cross_entropy(torch.randn(4, 8), torch.randn(11, 9), torch.zeros(4, dtype=torch.long))


def test_no_gradient_to_token_weights():
    """docs/contract.md §4: gradients flow to logits only; labels, masks and weights get none."""
    logits = torch.randn(4, 11, requires_grad=True)
    tw = torch.rand(4, requires_grad=True)
    loss = fp.masked_cross_entropy(logits, torch.tensor([0, 3, 5, 7]), token_weights=tw)
    loss.backward()
    assert logits.grad is not None
    assert tw.grad is None or torch.count_nonzero(tw.grad) == 0
