"""masked_cross_entropy / linear_cross_entropy on every backend that runs here, against
fusedpeft.reference (docs/contract.md §4, §6)."""

import itertools

import pytest
import torch

import fusedpeft as fp
from fusedpeft import reference as ref
from helpers import assert_within, grads, runnable

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3, "softcap": 3.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 2.0, "ignore_index": 5},
]
WEIGHTING = ["none", "mask0", "mask_half_and_weights"]


def weighting(kind, labels_shape):
    if kind == "none":
        return {}
    mask = torch.rand(labels_shape) < 0.5
    if kind == "mask0":
        return {"instruction_mask": mask, "instruction_weight": 0.0}
    return {"instruction_mask": mask, "instruction_weight": 0.5, "token_weights": torch.rand(labels_shape) * 2}


def make_labels(shape, vocab, ignore_index=-100):
    labels = torch.randint(0, vocab, shape)
    labels.view(-1)[::4] = ignore_index
    return labels


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("kind", WEIGHTING)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_masked_cross_entropy_matches_reference(backend, options, kind, reduction, dtype, atol):
    vocab = 1000 + 3
    logits = (torch.randn(3, 7, vocab) * 3).to(dtype).requires_grad_()
    labels = make_labels((3, 7), vocab, options.get("ignore_index", -100))
    kw = {**options, **weighting(kind, labels.shape), "reduction": reduction}
    loss = fp.masked_cross_entropy(logits, labels, backend=backend, **kw)
    logits64 = logits.detach().double().requires_grad_()
    want = ref.masked_cross_entropy(logits64, labels, **kw)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.rand_like(want)
    baseline = ref.masked_cross_entropy(logits, labels, **kw)  # the same formulas on the low-precision input
    assert_within(grads(loss, (logits,), g.float())[0], grads(want, (logits64,), g)[0],
                  grads(baseline, (logits,), g.float())[0], atol, "grad logits")


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
@pytest.mark.parametrize("options,kind", list(itertools.product(OPTIONS[::3], ["none", "mask_half_and_weights"])))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_linear_cross_entropy_matches_reference(backend, options, kind, reduction, bias, trainable_head):
    vocab, hidden_size = 97, 24
    hidden = torch.randn(2, 9, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 4).requires_grad_(trainable_head)
    b = torch.randn(vocab).requires_grad_(trainable_head) if bias else None
    labels = make_labels((2, 9), vocab, options.get("ignore_index", -100))
    kw = {**options, **weighting(kind, labels.shape), "reduction": reduction}
    loss = fp.linear_cross_entropy(hidden, weight, labels, b, chunk_budget_bytes=vocab * 4 * 5, backend=backend, **kw)
    inputs = [hidden] + ([weight] if trainable_head else []) + ([b] if bias and trainable_head else [])
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    h64 = inputs64[0]
    w64 = inputs64[1] if trainable_head else weight.double()
    b64 = (inputs64[2] if trainable_head else b.double()) if bias else None
    want = ref.linear_cross_entropy(h64, w64, labels, b64, chunk_rows=4, **kw)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.rand_like(want)
    for got, expected in zip(grads(loss, inputs, g.float()), grads(want, inputs64, g)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
def test_all_rows_ignored_is_zero_without_nan(backend):
    logits = torch.randn(4, 11, requires_grad=True)
    labels = torch.full((4,), -100)
    hidden, weight = torch.randn(4, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    for loss in (fp.masked_cross_entropy(logits, labels, backend=backend),
                 fp.linear_cross_entropy(hidden, weight, labels, backend=backend),
                 fp.masked_cross_entropy(logits, torch.randint(0, 11, (4,)), num_items_in_batch=0, backend=backend)):
        assert loss.item() == 0.0
        loss.backward()
    for grad in (logits.grad, hidden.grad, weight.grad):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("num_items", [5, torch.tensor(5), torch.tensor(5.0)])
def test_num_items_in_batch_replaces_denominator(num_items):
    logits, labels = torch.randn(3, 8, 20), torch.randint(0, 20, (3, 8))
    total = fp.masked_cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(fp.masked_cross_entropy(logits, labels, num_items_in_batch=num_items), total / 5)


def test_modules_equal_functionals():
    logits, labels = torch.randn(2, 6, 30), make_labels((2, 6), 30)
    mask, weights = torch.rand(2, 6) < 0.5, torch.rand(2, 6)
    module = fp.MaskedCrossEntropyLoss(instruction_weight=0.3, label_smoothing=0.1)
    torch.testing.assert_close(
        module(logits, labels, instruction_mask=mask, token_weights=weights),
        fp.masked_cross_entropy(logits, labels, instruction_mask=mask, token_weights=weights, instruction_weight=0.3,
                                label_smoothing=0.1))
    hidden, weight = torch.randn(2, 6, 8), torch.randn(30, 8)
    lce = fp.LinearCrossEntropyLoss(z_loss=1e-3, chunk_budget_bytes=1000)
    torch.testing.assert_close(lce(hidden, weight, labels, num_items_in_batch=7),
                               fp.linear_cross_entropy(hidden, weight, labels, z_loss=1e-3, num_items_in_batch=7))
    assert "chunk_budget_bytes=1000" in repr(lce)


def test_autocast_linear_cross_entropy():
    hidden, weight, labels = torch.randn(6, 16), torch.randn(40, 16), torch.randint(0, 40, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fp.linear_cross_entropy(hidden, weight, labels)
    want = ref.masked_cross_entropy(hidden.bfloat16().double() @ weight.bfloat16().double().t(), labels)
    torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)


BAD_CASES = [
    ("labels shape", lambda z, y: fp.masked_cross_entropy(z, y[:, :-1]), ValueError,
     r"labels has shape \(2, 4\) but must equal logits.shape\[:-1\] = \(2, 5\)"),
    ("label range", lambda z, y: fp.masked_cross_entropy(z, y.masked_fill(y == y[0, 0], 7)), ValueError,
     r"labels\[0, 0\] = 7 is outside \[0, 7\) and is not ignore_index=-100"),
    ("float labels", lambda z, y: fp.masked_cross_entropy(z, y.float()), TypeError, "labels must be an integer tensor"),
    ("reduction", lambda z, y: fp.masked_cross_entropy(z, y, reduction="avg"), ValueError, "reduction must be"),
    ("smoothing", lambda z, y: fp.masked_cross_entropy(z, y, label_smoothing=1.5), ValueError, "label_smoothing"),
    ("softcap", lambda z, y: fp.masked_cross_entropy(z, y, softcap=0.0), ValueError, "softcap must be None or"),
    ("z_loss", lambda z, y: fp.masked_cross_entropy(z, y, z_loss=-1.0), ValueError, "z_loss must be"),
    ("instruction_weight", lambda z, y: fp.masked_cross_entropy(z, y, instruction_weight=-0.5), ValueError,
     r"instruction_weight must be a number in \[0, 1\]"),
    ("mask shape", lambda z, y: fp.masked_cross_entropy(z, y, instruction_mask=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, r"instruction_mask has shape \(2, 4\) but must have labels' shape \(2, 5\)"),
    ("mask dtype", lambda z, y: fp.masked_cross_entropy(z, y, instruction_mask=torch.ones(2, 5)), TypeError,
     "instruction_mask must be a bool"),
    ("negative weights", lambda z, y: fp.masked_cross_entropy(z, y, token_weights=-torch.ones(2, 5)), ValueError,
     "token_weights has negative entries"),
    ("nan weights", lambda z, y: fp.masked_cross_entropy(z, y, token_weights=torch.full((2, 5), float("nan"))),
     ValueError, "token_weights contains NaN"),
    ("num_items with sum", lambda z, y: fp.masked_cross_entropy(z, y, reduction="sum", num_items_in_batch=3),
     ValueError, "num_items_in_batch replaces the 'mean' denominator"),
    ("negative num_items", lambda z, y: fp.masked_cross_entropy(z, y, num_items_in_batch=-1), ValueError,
     "num_items_in_batch must be a number >= 0"),
    ("lce dtypes", lambda z, y: fp.linear_cross_entropy(torch.randn(2, 5, 3), torch.randn(7, 3).double(), y),
     TypeError, "hidden has dtype torch.float32 but weight has dtype torch.float64"),
    ("lce shapes", lambda z, y: fp.linear_cross_entropy(torch.randn(2, 5, 3), torch.randn(7, 4), y), ValueError,
     r"weight must be \[V, H\] with H = hidden.shape\[-1\]"),
    ("lce bias", lambda z, y: fp.linear_cross_entropy(torch.randn(2, 5, 3), torch.randn(7, 3), y, torch.randn(6)),
     ValueError, r"bias must have shape \(7,\)"),
    ("lce budget", lambda z, y: fp.linear_cross_entropy(torch.randn(2, 5, 3), torch.randn(7, 3), y,
                                                        chunk_budget_bytes=0),
     ValueError, "chunk_budget_bytes must be a positive integer"),
    ("backend", lambda z, y: fp.masked_cross_entropy(z, y, backend="gpu"), ValueError, "backend='gpu' is not"),
]


@pytest.mark.parametrize("case,call,error,match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input(case, call, error, match):
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    before = logits.clone()
    with pytest.raises(error, match=match):
        call(logits, labels)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("backend", [b for b in runnable("cross_entropy") if b != "triton"])
@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_linear_cross_entropy_backward_twice_through_one_graph(backend, scale):
    """Mean/sum: the gradients computed in the forward are scaled out of place while the graph is
    retained, so every backward through it gives the same gradients (gradcheck and autograd.grad
    rely on it); the last backward (no retain_graph) scales them in place and hands them over."""
    hidden = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=True)
    labels = torch.randint(0, 11, (6,))
    loss = fp.linear_cross_entropy(hidden, weight, labels, backend=backend)
    want = torch.autograd.grad(scale * torch.nn.functional.cross_entropy(hidden @ weight.t(), labels),
                               (hidden, weight))
    for _ in range(2):
        got = torch.autograd.grad(scale * loss, (hidden, weight), retain_graph=True)
        torch.testing.assert_close(got, want)
    (scale * loss).backward(retain_graph=True)
    (scale * loss).backward()  # in place now, accumulated onto the retained backward's .grad
    torch.testing.assert_close((hidden.grad, weight.grad), tuple(2 * g for g in want))


@pytest.mark.parametrize("backend", [b for b in runnable("cross_entropy") if b != "triton"])
def test_linear_cross_entropy_gradcheck(backend):
    """float64 gradcheck of hidden, weight and bias (mean and sum: gradients precomputed in the
    forward and scaled in backward), with several chunks."""
    hidden = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 8, 2, -100, 5])
    for reduction in ("mean", "sum"):
        torch.autograd.gradcheck(lambda h, w, b: fp.linear_cross_entropy(
            h, w, labels, b, reduction=reduction, z_loss=1e-2, chunk_budget_bytes=9 * 8 * 2, backend=backend),
            (hidden, weight, bias))


@pytest.mark.parametrize("backend", [b for b in runnable("cross_entropy") if b != "triton"])
def test_bf16_head_gradient_accumulation_over_many_chunks(backend):
    """A bf16 trainable head's gradient over many chunks: with a budget that holds an fp32 [V, H]
    accumulator (and its bf16 copy) in half of it, fp32 accumulation (10 chunks), the error of one
    rounding; with a smaller budget, accumulated in bf16 (64 chunks, one rounding each, no fp32
    [V, H] buffer), a bounded larger error."""
    torch.manual_seed(0)
    hidden = torch.randn(256, 32).bfloat16().requires_grad_()
    weight = (torch.randn(500, 32) / 32**0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, 500, (256,))
    (want,) = torch.autograd.grad(ref.masked_cross_entropy(hidden.double() @ weight.double().t(), labels), (weight,))

    def error(budget):
        (got,) = torch.autograd.grad(fp.linear_cross_entropy(hidden, weight, labels, chunk_budget_bytes=budget,
                                                             backend=backend), (weight,))
        assert got.dtype == torch.bfloat16
        return float((got.double() - want).norm() / want.norm())

    one = error(10**9)  # one chunk
    chunk = 4 * 500 * 8  # 4-row chunks at 8 bytes per logit
    fp32_sum = error(chunk + 2 * 500 * 32 * 6)
    bf16_sum = error(chunk)
    assert fp32_sum <= 1.05 * one + 1e-5, (fp32_sum, one)
    assert one < bf16_sum < 2e-2, (bf16_sum, one)
