"""The Triton cross-entropy backend (fusedpeft/kernels/cross_entropy.py) against fusedpeft.reference.

The common parametrized parity tests (tests/test_losses.py, tests/test_ops.py) already run this
backend over every keyword x weighting x reduction x dtype at V = 1003; the tests here cover what
is specific to the kernels: tile tails and single-tile rows, extreme logits, every keyword at
once with a per-row incoming gradient, the in-place gradient, zero-scale rows, chunking and
compaction of linear_cross_entropy, 16-bit heads, and (marked gpu) Llama-3 shapes in bf16
without host syncs.
"""

import pytest
import torch

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.kernels import cross_entropy as tce
from fusedpeft.kernels._common import interpreting
from fusedpeft.ops.cross_entropy import row_scale_and_labels
from fusedpeft.torch_backend import cross_entropy as torch_ce
from helpers import assert_within, grads

DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
ALL_OPTIONS = {"label_smoothing": 0.15, "z_loss": 1e-2, "softcap": 4.0}


def _weighting(rows, device):
    return {"instruction_mask": torch.rand(rows, device=device) < 0.5, "instruction_weight": 0.25,
            "token_weights": torch.rand(rows, device=device) * 2}


def check_masked_cross_entropy(rows, vocab, dtype, atol, device, scale=3.0, **kw):
    """Triton masked_cross_entropy vs the float64 reference: loss and grad logits (with a random
    per-row incoming gradient for reduction "none"); the error bound comes from the reference run
    on the low-precision input."""
    logits = (torch.randn(rows, vocab, device=device) * scale).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[::5] = -100
    loss = fp.masked_cross_entropy(logits, labels, backend="triton", **kw)
    logits64 = logits.detach().double().requires_grad_()
    want = ref.masked_cross_entropy(logits64, labels, **kw)
    baseline = ref.masked_cross_entropy(logits, labels, **kw)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert_within(loss, want, baseline, atol, "loss")
    g = torch.rand_like(want)
    got = grads(loss, (logits,), g.float())[0]
    assert got.dtype == dtype
    assert_within(got, grads(want, (logits64,), g)[0], grads(baseline, (logits,), g.float())[0], atol, "grad logits")
    return got, labels


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 256, 1000 + 3])  # under one tile, exactly one tile, a tail
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tile_tails_every_option_and_weighting(dtype, atol, vocab, reduction, device):
    kw = {**ALL_OPTIONS, **_weighting(9, device), "reduction": reduction}
    check_masked_cross_entropy(9, vocab, dtype, atol, device, **kw)


@pytest.mark.parametrize("option", ["label_smoothing", "z_loss", "softcap"])
def test_each_option_alone_sum(option, device):
    check_masked_cross_entropy(6, 300, torch.float32, 1e-5, device, reduction="sum", **{option: ALL_OPTIONS[option]})


def test_extreme_logits_are_stable(device):
    """|logits| ~ 1e4: the online logsumexp must rescale, never overflow; target at column 0 and V-1."""
    logits = torch.randn(4, 700, device=device) * 1e4
    labels = torch.tensor([0, 699, 5, 699], device=device)
    logits[1, 699] = 3e4
    loss = fp.masked_cross_entropy(logits.requires_grad_(), labels, reduction="none", backend="triton")
    want = ref.masked_cross_entropy(logits.detach().double(), labels, reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-3)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_zero_scale_rows_have_zero_gradient_and_no_nan(device):
    """Ignored, instruction-masked (weight 0) and zero-token-weight rows: zero gradient rows, no
    NaN even with z_loss and softcap, lse 0 on those rows."""
    logits = torch.randn(8, 50, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (8,), device=device)
    labels[0] = -100
    mask = torch.zeros(8, dtype=torch.bool, device=device)
    mask[1] = True
    weights = torch.ones(8, device=device)
    weights[2] = 0.0
    kw = dict(instruction_mask=mask, token_weights=weights, z_loss=1e-2, softcap=2.0)
    loss = fp.masked_cross_entropy(logits, labels, backend="triton", **kw)
    loss.backward()
    assert torch.equal(logits.grad[:3], torch.zeros_like(logits.grad[:3]))
    assert (logits.grad[3:].abs().sum(1) > 0).all() and torch.isfinite(logits.grad).all()
    scale, safe = row_scale_and_labels(labels, 50, instruction_mask=mask, token_weights=weights)
    _, lse = tce.cross_entropy_forward(logits.detach(), safe, scale, True, 0.0, 0.0, None)
    assert torch.equal(lse[:3], torch.zeros(3, device=device))


@pytest.mark.parametrize("num_items", [7, torch.tensor(7), torch.tensor(7.0)])
def test_num_items_in_batch(num_items, device):
    logits = torch.randn(3, 5, 40, device=device)
    labels = torch.randint(0, 40, (3, 5), device=device)
    total = fp.masked_cross_entropy(logits, labels, reduction="sum", backend="triton")
    got = fp.masked_cross_entropy(logits, labels, num_items_in_batch=num_items, backend="triton")
    torch.testing.assert_close(got, total / 7)
    zero = fp.masked_cross_entropy(logits, labels, num_items_in_batch=torch.tensor(0), backend="triton")
    assert zero.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backend_functions_match_the_torch_backend(dtype, device):
    """Module API: same outputs as fusedpeft.torch_backend, gradient written in place gives the same."""
    vocab = 333
    logits = (torch.randn(10, vocab, device=device) * 2).to(dtype)
    labels = torch.randint(0, vocab, (10,), device=device)
    labels[3] = -100
    scale, safe = row_scale_and_labels(labels, vocab, token_weights=torch.rand(10, device=device), reduction="none")
    options = (0.1, 1e-3, 5.0)
    loss, lse = tce.cross_entropy_forward(logits, safe, scale, False, *options)
    loss_t, lse_t = torch_ce.cross_entropy_forward(logits, safe, scale, False, *options)
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_t, rtol=1e-5, atol=1e-5)
    grad_loss = torch.rand(10, device=device)
    grad = tce.cross_entropy_backward(grad_loss, logits, safe, scale, lse, *options)
    want = torch_ce.cross_entropy_backward(grad_loss, logits, safe, scale, lse_t, *options)
    assert grad.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad.float(), want.float(), rtol=tol, atol=tol)
    in_place = logits.clone()
    tce.row_backward(in_place, safe, scale, lse, grad_loss, in_place, *options)
    assert torch.equal(in_place, grad)


@pytest.mark.parametrize("call,error,match", [
    (lambda z, h, w, y: fp.masked_cross_entropy(z, y.masked_fill(y == y[0], 40), backend="triton"), ValueError,
     r"labels\[0\] = 40 is outside \[0, 40\)"),
    (lambda z, h, w, y: fp.masked_cross_entropy(z, y, token_weights=-torch.ones(6), backend="triton"), ValueError,
     "token_weights has negative entries"),
    (lambda z, h, w, y: fp.linear_cross_entropy(h, w, y, chunk_budget_bytes=-1, backend="triton"), ValueError,
     "chunk_budget_bytes must be a positive integer"),
    (lambda z, h, w, y: fp.linear_cross_entropy(h, w.half(), y, backend="triton"), TypeError,
     "hidden has dtype torch.float32 but weight has dtype torch.float16"),
])
@pytest.mark.skipif(not interpreting(), reason="CPU-only checks (a label range check would sync on a GPU)")
def test_bad_input_raises_before_any_kernel(call, error, match, monkeypatch):
    launched = []
    monkeypatch.setattr(tce, "row_forward", lambda *a: launched.append(a))
    logits, hidden, weight = torch.randn(6, 40), torch.randn(6, 8), torch.randn(40, 8)
    labels = torch.randint(0, 40, (6,))
    before = logits.clone()
    with pytest.raises(error, match=match):
        call(logits, hidden, weight, labels)
    assert not launched and torch.equal(logits, before)


@pytest.mark.skipif(not interpreting(), reason="checks the interpreter's single config")
def test_one_config_under_the_interpreter_and_few_per_arch():
    assert len(tce._tuned("fwd", 90).configs) == 1
    assert all(1 <= len(configs) <= 3 for configs in tce.CONFIGS.values())


def _linear_inputs(rows, hidden_size, vocab, dtype, device, bias, trainable, masked):
    hidden = torch.randn(rows, hidden_size, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5 * 2).to(dtype)
    weight.requires_grad_(trainable)
    b = (torch.randn(vocab, device=device) / 4).to(dtype).requires_grad_(trainable) if bias else None
    labels = torch.randint(0, vocab, (rows,), device=device)
    if masked:
        labels[::3] = -100
    return hidden, weight, b, labels


def check_linear_cross_entropy(rows, hidden_size, vocab, dtype, atol, device, bias, trainable, masked, budget, **kw):
    """Triton linear_cross_entropy vs the float64 reference: loss and every gradient; the bound
    comes from the unfused PyTorch computation on the low-precision inputs."""
    hidden, weight, b, labels = _linear_inputs(rows, hidden_size, vocab, dtype, device, bias, trainable, masked)
    loss = fp.linear_cross_entropy(hidden, weight, labels, b, chunk_budget_bytes=budget, backend="triton", **kw)
    inputs = [hidden] + ([weight] + ([b] if bias else []) if trainable else [])
    inputs64 = {id(t): t.detach().double().requires_grad_(t.requires_grad)
                for t in (hidden, weight, b) if t is not None}
    h64, w64 = inputs64[id(hidden)], inputs64[id(weight)]
    b64 = inputs64[id(b)] if bias else None
    want = ref.linear_cross_entropy(h64, w64, labels, b64, **kw)
    baseline = ref.masked_cross_entropy(hidden @ weight.t() + (b if bias else 0), labels, **kw)
    assert_within(loss, want, baseline, atol, "loss")
    g = torch.rand_like(want)
    got = grads(loss, inputs, g.float())
    expected = grads(want, [inputs64[id(t)] for t in inputs], g)
    base = grads(baseline, inputs, g.float())
    for name, a, e, bl in zip(["grad hidden", "grad weight", "grad bias"], got, expected, base):
        assert a.dtype == dtype
        assert_within(a, e, bl, atol, name)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias,trainable,masked", [(False, False, True), (True, True, False), (False, True, True)])
def test_linear_cross_entropy_chunks(dtype, atol, reduction, bias, trainable, masked, device):
    """Chunks of 4 rows over 17 rows (a short last chunk), with and without compaction of zero rows,
    grad_weight / grad_bias on and off, every keyword."""
    vocab, itemsize = 211, torch.empty((), dtype=dtype).element_size()
    kw = {**ALL_OPTIONS, "reduction": reduction, **_weighting(17, device)}
    if not masked:
        kw.pop("instruction_mask")
    check_linear_cross_entropy(17, 24, vocab, dtype, atol, device, bias, trainable, masked, vocab * itemsize * 4, **kw)


def test_linear_cross_entropy_all_rows_ignored(device):
    hidden, weight, b, labels = _linear_inputs(6, 8, 30, torch.float32, device, True, True, False)
    labels.fill_(-100)
    for reduction in ("mean", "none"):
        loss = fp.linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, z_loss=0.1, backend="triton")
        assert torch.equal(loss, torch.zeros_like(loss))
        g = grads(loss, (hidden, weight, b), torch.ones_like(loss))
        assert all(torch.equal(t, torch.zeros_like(t)) for t in g)


def test_linear_cross_entropy_pass_matches_the_torch_backend(device):
    """Backend API: per-row scaled losses and unscaled-by-grad gradients equal the torch backend's."""
    hidden, weight, b, labels = _linear_inputs(13, 16, 90, torch.float32, device, True, True, True)
    scale, safe = row_scale_and_labels(labels, 90, reduction="mean")
    args = (hidden.detach(), weight.detach(), b.detach(), safe, scale, True, 0.1, 1e-3, 3.0, 90 * 4 * 5, True, True,
            True)
    for a, e in zip(tce.linear_cross_entropy_forward(*args), torch_ce.linear_cross_entropy_forward(*args)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    grad_loss = torch.rand(13, device=device)
    bwd = (grad_loss, *args[:5], *args[6:])
    for a, e in zip(tce.linear_cross_entropy_backward(*bwd), torch_ce.linear_cross_entropy_backward(*bwd)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ GPU, Llama-3 shapes


@pytest.mark.gpu
def test_masked_cross_entropy_llama3_vocab_bf16():
    kw = {**ALL_OPTIONS, **_weighting(512, "cuda"), "reduction": "mean"}
    check_masked_cross_entropy(512, 128256, torch.bfloat16, 1e-2, "cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("trainable", [False, True])
def test_linear_cross_entropy_llama3_head_bf16(trainable):
    """V = 128256, H = 4096, 1024 rows (a third masked) in chunks of 128 rows."""
    check_linear_cross_entropy(1024, 4096, 128256, torch.bfloat16, 1e-2, "cuda", False, trainable, True,
                               128 * 128256 * 2, reduction="mean")


@pytest.mark.gpu
def test_no_host_sync_in_masked_cross_entropy():
    logits = torch.randn(64, 128256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 128256, (64,), device="cuda")
    weights = torch.rand(64, device="cuda")
    num_items = torch.tensor(40, device="cuda")
    scale, safe = row_scale_and_labels(labels, 128256, token_weights=weights, num_items_in_batch=num_items)
    grad_loss = torch.ones((), device="cuda")

    def step():
        loss, lse = tce.cross_entropy_forward(logits.detach(), safe, scale, True, 0.1, 1e-3, 30.0)
        return loss, tce.cross_entropy_backward(grad_loss, logits.detach(), safe, scale, lse, 0.1, 1e-3, 30.0)

    step()  # autotuning benchmarks (and synchronises) on the first call only
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, grad = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_compiles_fullgraph(device):
    """torch.compile(fullgraph=True) through the custom ops, with the Triton backend inside."""
    logits = torch.randn(2, 5, 40, device=device, requires_grad=True)
    hidden = torch.randn(2, 5, 8, device=device, requires_grad=True)
    weight = torch.randn(40, 8, device=device, requires_grad=True)
    labels = torch.randint(0, 40, (2, 5), device=device)
    num_items = torch.tensor(6, device=device)

    def both(z, h, w):
        return (fp.masked_cross_entropy(z, labels, num_items_in_batch=num_items, softcap=3.0, backend="triton")
                + fp.linear_cross_entropy(h, w, labels, z_loss=1e-3, chunk_budget_bytes=40 * 4 * 3,
                                          backend="triton"))

    torch._dynamo.reset()
    got = torch.compile(both, fullgraph=True, backend="aot_eager")(logits, hidden, weight)
    want = both(logits, hidden, weight)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, (logits, hidden, weight), torch.ones(())),
                    grads(want, (logits, hidden, weight), torch.ones(()))):
        torch.testing.assert_close(a, b)
