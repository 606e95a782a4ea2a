"""Property-based differential fuzzing (hypothesis) of LoRALinear, MoRALinear, masked_cross_entropy and
linear_cross_entropy on every backend that runs here, against float64 statements of the maths
written below (deliberately not fusedpeft.reference): outputs and every gradient, over shapes,
strides, dtypes, ranks (empty batches included), r_hat > in_features for every MoRA type, dropout
(the Philox mask recomputed here with numpy) and the loss keywords.

Deterministic and bounded: derandomize=True, no example database, deadline=None. The default budget
(``DEFAULT_EXAMPLES``) keeps the whole file well under two minutes on a 2-core CI machine (42 s wall
on 2 cores shared with other jobs); FUSEDPEFT_FUZZ_EXAMPLES=N runs N examples per test instead
(e.g. 1000 for a long local run, about 10 minutes).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fusedpeft as fp
from helpers import assert_within, runnable

DEFAULT_EXAMPLES = {"lora": 80, "mora": 120, "ce": 100, "lce": 60, "mask": 15}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# atol per dtype, relative to max(1, max |expected|): the last-bit noise of an fp32 (or fp64) accumulation
# plus, for a 16-bit result, one rounding of the output
ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fuzz(name: str):
    """settings for one fuzz test: deterministic, no database, FUSEDPEFT_FUZZ_EXAMPLES overrides the budget."""
    n = int(os.environ.get("FUSEDPEFT_FUZZ_EXAMPLES", "0")) or DEFAULT_EXAMPLES[name]
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def targets(family: str) -> list[tuple[str, str]]:
    return [(device, b) for device in DEVICES for b in runnable(family, device)]


# ============================================================================ float64 statements

_PHILOX = (0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85)
_M32 = np.uint64(0xFFFFFFFF)


def philox_keep(seed: int, n_rows: int, n_cols: int, p: float) -> torch.Tensor:
    """Bool [n_rows, n_cols]: element (m, j) kept when u >= p, u from Philox4x32-10 with key = the
    seed's two 32-bit halves and counter (m K + j mod 2^32, 0, 0, 0), first word read as int32,
    negatives folded (x -> -x - 1), times float32(4.6566127342e-10)."""
    c0 = (np.arange(n_rows * n_cols, dtype=np.uint64)) & _M32
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    a, b = np.uint64(_PHILOX[0]), np.uint64(_PHILOX[1])
    for _ in range(10):
        pa, pb = a * c0, b * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & _M32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + np.uint64(_PHILOX[2])) & _M32, (k1 + np.uint64(_PHILOX[3])) & _M32
    signed = c0.astype(np.int64)
    signed = np.where(signed >= 2**31, signed - 2**32, signed)
    folded = np.where(signed < 0, -signed - 1, signed)
    u = folded.astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(u >= np.float32(p)).reshape(n_rows, n_cols)


def dropped(x2: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """dropout(x) of the 2-D view x2 [N, K] in float64."""
    if p == 0.0:
        return x2
    return x2 * philox_keep(seed, *x2.shape, p).to(x2.device, x2.dtype) / (1.0 - p)


def groups(length: int, R: int) -> torch.Tensor:
    """[length] group index: R contiguous groups, the first length mod R of length // R + 1."""
    q, m = divmod(length, R)
    return torch.tensor([i // (q + 1) if i < m * (q + 1) else m + (i - m * (q + 1)) // max(q, 1)
                         for i in range(length)], dtype=torch.long)


def one_hot(index: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, width).to(torch.float64)


def mora_r_hat(k: int, d: int, r: int, mora_type: int) -> int:
    r_hat = int(math.sqrt((k + d) * r) + 0.5)
    return r_hat // 2 * 2 if mora_type == 6 else r_hat


def mora_delta(M: torch.Tensor, k: int, d: int, mora_type: int) -> torch.Tensor:
    """ΔW [d, k] (float64, differentiable in M) = decompress · M-blocks · compress."""
    R = M.shape[0]
    pad = 0 if mora_type in (2, 3) or k % R == 0 else R - k % R
    n = (k + pad) // R
    ext = one_hot(torch.tensor([e if e < k else e - k for e in range(n * R)], dtype=torch.long), k)  # [nR, k]
    if mora_type in (2, 3):
        compress = one_hot(groups(k, R), R).t()  # [R, k]
    else:
        compress = one_hot(torch.arange(n * R) % R, R).t() @ ext
    if mora_type in (1, 3):
        decompress = one_hot(torch.arange(d) % R, R)  # [d, R]
    elif mora_type in (2, 4):
        decompress = one_hot(groups(d, R), R)
    if mora_type != 6:
        return decompress @ M.double() @ compress
    h = R // 2
    inv_freq = 10000.0 ** (-2.0 * torch.arange(h, dtype=torch.float64) / R)
    blocks = []
    for i in range(n):
        angle = torch.cat([i * inv_freq, i * inv_freq])
        cos, sin = torch.diag(torch.cos(angle)), torch.diag(torch.sin(angle))
        swap = torch.zeros(R, R, dtype=torch.float64)  # (swap c)[j] = -c[j + h] (j < h), c[j - h] (j >= h)
        swap[:h, h:] = -torch.eye(h, dtype=torch.float64)
        swap[h:, :h] = torch.eye(h, dtype=torch.float64)
        blocks.append(M.double() @ (cos + sin @ swap))
    out = one_hot(torch.arange(d) % (n * R), n * R)  # truncate or tile the concatenated chunks
    return out @ torch.block_diag(*blocks) @ ext


def ce_formula(z, labels, *, ignore_index=-100, instruction_mask=None, instruction_weight=0.0, token_weights=None,
               reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, num_items_in_batch=None):
    """The weighted cross-entropy of logits z [..., V] (float64 math)."""
    z = z.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    valid = labels != ignore_index
    target = z.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    per_row = ((1 - label_smoothing) * (lse - target) + label_smoothing * (lse - z.mean(-1))
               + z_loss * lse ** 2)
    w = valid.double()
    if instruction_mask is not None:
        w = torch.where(instruction_mask, w * instruction_weight, w)
    if token_weights is not None:
        w = w * token_weights.double()
    loss = w * per_row
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denom = w.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=torch.float64)
    return loss.sum() / denom if denom > 0 else loss.sum() * 0.0


# ============================================================================ inputs


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t with another memory layout: contiguous, a transposed copy viewed back, or
    every other element of a wider buffer."""
    if kind == "contiguous" or t.dim() == 0:
        return t
    if kind == "transposed":
        return t.movedim(-1, 0).contiguous().movedim(0, -1)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def run_replaying_seed(fn):
    """fn() and the dropout seed it drew (docs/contract.md §5: one randint(0, 2^63 - 1) from the default CPU
    generator)."""
    state = torch.get_rng_state()
    out = fn()
    torch.set_rng_state(state)
    return out, int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def check_grads(got_out, want_out, baseline_out, got_inputs, want_inputs, baseline_inputs, dtype, names,
                atol=None):
    """Output and the gradient of <out, g> for every input, float64 vs. the implementation, bounded by
    2 x same-dtype PyTorch (baseline) + atol (default ATOL[dtype])."""
    atol = ATOL[dtype] if atol is None else atol
    assert_within(got_out, want_out, baseline_out, atol, "output")
    g = torch.randn_like(want_out)
    got = torch.autograd.grad(got_out, got_inputs, g.to(got_out.dtype), allow_unused=True)
    want = torch.autograd.grad(want_out, want_inputs, g, allow_unused=True)
    base = torch.autograd.grad(baseline_out, baseline_inputs, g.to(baseline_out.dtype), allow_unused=True)
    for name, a, b, c in zip(names, got, want, base):
        assert a is not None and b is not None, name
        assert a.dtype == c.dtype, f"grad {name}: dtype {a.dtype}, expected {c.dtype}"
        assert_within(a, b, c, atol, f"grad {name}")


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=2).map(tuple)  # leading dims of x / logits
layouts = st.sampled_from(["contiguous", "transposed", "strided"])


# ============================================================================ LoRA


@pytest.mark.parametrize("device,backend", targets("lora"))
@fuzz("lora")
@given(dtype=st.sampled_from(DTYPES), lead=shapes, k=st.integers(1, 24), d=st.integers(1, 24),
       r=st.integers(1, 6), alpha=st.floats(-4, 16, allow_nan=False).filter(bool),  # alpha = 0 is refused
       rslora=st.booleans(), bias=st.booleans(),
       p=st.sampled_from([0.0, 0.0, 0.1, 0.5]), kind=layouts, rows=st.integers(1, 9))
def test_lora(device, backend, dtype, lead, k, d, r, alpha, rslora, bias, p, kind, rows):
    layer = fp.LoRALinear(nn.Linear(k, d, bias=bias).to(device, dtype), r=r, alpha=alpha, dropout=p,
                          use_rslora=rslora, backend=backend)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = layout(torch.randn(*lead, rows, k, device=device).to(dtype), kind).requires_grad_()
    y, seed = run_replaying_seed(lambda: layer(x))
    assert y.shape == (*lead, rows, d) and y.dtype == dtype
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    W, b, A, B = (t.detach() if t is not None else None
                  for t in (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight))

    def formula(x_, A_, B_, to):
        x2 = x_.reshape(-1, k).to(to)
        adapter = (dropped(x2, p, seed) @ A_.to(to).t()) @ B_.to(to).t()
        out = x2 @ W.to(to).t() + (b.to(to) if bias else 0) + scale * adapter
        return out.reshape(*lead, rows, d)

    x64, A64, B64 = (t.double().requires_grad_() for t in (x.detach(), A, B))
    xb, Ab, Bb = (t.clone().requires_grad_() for t in (x.detach(), A, B))
    check_grads(y, formula(x64, A64, B64, torch.float64), formula(xb, Ab, Bb, dtype),
                (x, layer.lora_A.weight, layer.lora_B.weight), (x64, A64, B64), (xb, Ab, Bb), dtype, ("x", "A", "B"))


# ============================================================================ MoRA


def valid_r_hat(k: int, R: int, mora_type: int) -> bool:
    if R < (2 if mora_type == 6 else 1):
        return False
    return mora_type in (2, 3) or k % R == 0 or R - k % R <= k


@pytest.mark.parametrize("device,backend", targets("mora"))
@fuzz("mora")
@given(dtype=st.sampled_from(DTYPES), lead=shapes, k=st.integers(1, 30), d=st.integers(1, 30), r=st.integers(1, 12),
       mora_type=st.sampled_from([1, 2, 3, 4, 6]), bias=st.booleans(), p=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
       kind=layouts, rows=st.integers(1, 9))
# r_hat > in_features for every type (types 1, 4, 6 up to 2 k: the wrap padding fits), and r_hat > out_features
@example(dtype=torch.float64, lead=(), k=3, d=20, r=4, mora_type=2, bias=True, p=0.0, kind="contiguous", rows=3)
@example(dtype=torch.float32, lead=(2,), k=3, d=20, r=4, mora_type=3, bias=False, p=0.1, kind="strided", rows=3)
@example(dtype=torch.float64, lead=(), k=6, d=6, r=8, mora_type=1, bias=True, p=0.0, kind="contiguous", rows=4)
@example(dtype=torch.float32, lead=(), k=6, d=6, r=8, mora_type=4, bias=True, p=0.5, kind="transposed", rows=4)
@example(dtype=torch.float64, lead=(), k=7, d=5, r=8, mora_type=6, bias=True, p=0.0, kind="contiguous", rows=4)
@example(dtype=torch.float64, lead=(0,), k=5, d=3, r=6, mora_type=3, bias=True, p=0.1, kind="contiguous", rows=2)
def test_mora(device, backend, dtype, lead, k, d, r, mora_type, bias, p, kind, rows):
    R = mora_r_hat(k, d, r, mora_type)
    assume(valid_r_hat(k, R, mora_type))
    layer = fp.MoRALinear(nn.Linear(k, d, bias=bias).to(device, dtype), r=r, mora_type=mora_type, dropout=p,
                          backend=backend)
    assert layer.r_hat == R
    with torch.no_grad():
        layer.M.normal_(0, 0.5)
    x = layout(torch.randn(*lead, rows, k, device=device).to(dtype), kind).requires_grad_()
    y, seed = run_replaying_seed(lambda: layer(x))
    assert y.shape == (*lead, rows, d) and y.dtype == dtype
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias

    def formula(x_, M_, to):
        x2 = x_.reshape(-1, k).to(to)
        delta = mora_delta(M_, k, d, mora_type).to(device, to)
        out = x2 @ W.to(to).t() + (b.detach().to(to) if bias else 0) + dropped(x2, p, seed) @ delta.t()
        return out.reshape(*lead, rows, d)

    M = layer.M.detach().cpu()
    x64, M64 = x.detach().double().requires_grad_(), M.double().requires_grad_()
    xb, Mb = x.detach().clone().requires_grad_(), M.clone().requires_grad_()
    # type 6: the package's RoPE tables are float32 (docs/contract.md §3), these are float64: a few fp32 ulps apart
    atol = max(ATOL[dtype], 2e-6) if mora_type == 6 else ATOL[dtype]
    check_grads(y, formula(x64, M64, torch.float64), formula(xb, Mb, dtype), (x, layer.M), (x64, M64), (xb, Mb),
                dtype, ("x", "M"), atol)


# ============================================================================ cross-entropy


@st.composite
def ce_keywords(draw, labels_shape, vocab):
    n = int(np.prod(labels_shape)) if labels_shape else 1
    ignore_index = draw(st.sampled_from([-100, -1, vocab + 3]))
    labels = torch.tensor(draw(st.lists(st.sampled_from([*range(vocab), ignore_index]), min_size=n, max_size=n)),
                          dtype=torch.long).reshape(labels_shape)
    kw = dict(ignore_index=ignore_index, reduction=draw(st.sampled_from(["mean", "sum", "none"])),
              label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
              z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3, 0.5])), softcap=draw(st.sampled_from([None, None, 3.0])))
    if draw(st.booleans()):
        kw["instruction_mask"] = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                                              dtype=torch.bool).reshape(labels_shape)
        kw["instruction_weight"] = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))  # outside [0, 1] is refused
    if draw(st.booleans()):
        kw["token_weights"] = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=n,
                                                         max_size=n)), dtype=torch.float32).reshape(labels_shape)
    if kw["reduction"] == "mean" and draw(st.booleans()):
        kw["num_items_in_batch"] = draw(st.sampled_from([0, 1, 7, torch.tensor(5), torch.tensor(0)]))
    return labels, kw


@pytest.mark.parametrize("device,backend", targets("cross_entropy"))
@fuzz("ce")
@given(data=st.data(), dtype=st.sampled_from(DTYPES), lead=shapes, vocab=st.integers(1, 40), kind=layouts,
       scale=st.sampled_from([1.0, 30.0]))
def test_masked_cross_entropy(device, backend, data, dtype, lead, vocab, kind, scale):
    labels, kw = data.draw(ce_keywords(lead, vocab))
    labels = labels.to(device)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    logits = layout((torch.randn(*lead, vocab, device=device) * scale).to(dtype), kind).requires_grad_()
    loss = fp.masked_cross_entropy(logits, labels, backend=backend, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == (labels.shape if kw["reduction"] == "none" else ())
    z64 = logits.detach().double().requires_grad_()
    want = ce_formula(z64, labels, **kw)
    tol = ATOL[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item())
                               if want.numel() else tol)
    if not logits.numel():
        return
    g = torch.randn_like(want)
    got = torch.autograd.grad(loss, logits, g.to(loss.dtype))[0]
    expected = torch.autograd.grad(want, z64, g)[0]
    assert got.dtype == dtype
    bound = max(ATOL[dtype], tol) * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=bound)


@pytest.mark.parametrize("device,backend", targets("cross_entropy"))
@fuzz("lce")
@given(data=st.data(), dtype=st.sampled_from(DTYPES), lead=shapes, vocab=st.integers(1, 24), hidden=st.integers(1, 12),
       bias=st.booleans(), trainable=st.booleans(), kind=layouts,
       budget=st.sampled_from([1, 100, 2048, 256 * 2**20]))
def test_linear_cross_entropy(device, backend, data, dtype, lead, vocab, hidden, bias, trainable, kind, budget):
    labels, kw = data.draw(ce_keywords(lead, vocab))
    labels = labels.to(device)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    h = layout(torch.randn(*lead, hidden, device=device).to(dtype), kind).requires_grad_()
    W = (torch.randn(vocab, hidden, device=device) / math.sqrt(hidden)).to(dtype).requires_grad_(trainable)
    b = torch.randn(vocab, device=device).to(dtype).requires_grad_(trainable) if bias else None
    loss = fp.linear_cross_entropy(h, W, labels, b, chunk_budget_bytes=budget, backend=backend, **kw)
    inputs = [h] + ([W] + ([b] if bias else []) if trainable else [])

    def formula(to):
        ts = [t.detach().to(to).requires_grad_() for t in inputs]
        h_, W_ = ts[0], ts[1] if trainable else W.detach().to(to)
        b_ = (ts[2] if trainable else b.detach().to(to)) if bias else None
        logits = h_ @ W_.t() + (b_ if bias else 0)
        return ce_formula(logits, labels, **kw), ts

    want, ins64 = formula(torch.float64)
    base, ins_b = formula(dtype)
    check_grads(loss, want, base, inputs, ins64, ins_b, dtype, ("hidden", "weight", "bias")[:len(inputs)])


# ============================================================================ the dropout mask itself


@pytest.mark.parametrize("device,backend", targets("lora"))
@fuzz("mask")
@given(seed=st.integers(0, 2**63 - 2), p=st.sampled_from([0.1, 0.5, 0.9]), n=st.integers(1, 5), k=st.integers(1, 40))
def test_dropout_mask_is_the_philox_stream(device, backend, seed, p, n, k):
    """With A = B = I and W = 0 the layer returns dropout(x) itself: the kept set is the Philox mask
    computed here, kept values are x / (1 - p)."""
    layer = fp.LoRALinear(nn.Linear(k, k, bias=False).double().to(device), r=k, alpha=k, dropout=p, backend=backend)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.weight.copy_(torch.eye(k))
        layer.lora_B.weight.copy_(torch.eye(k))
    x = torch.rand(n, k, dtype=torch.float64, device=device) + 1.0
    torch.manual_seed(seed % 2**31)
    y, drawn = run_replaying_seed(lambda: layer(x))
    keep = philox_keep(drawn, n, k, p).to(device)
    torch.testing.assert_close(y, torch.where(keep, x / (1 - p), 0.0), rtol=1e-12, atol=0)


def test_dropout_mask_statistics():
    """The numpy Philox stream: kept fraction within 5 sigma of 1 - p; masks differ between seeds."""
    for p in (0.1, 0.5, 0.9):
        keep = philox_keep(12345, 200, 100, p)
        sigma = math.sqrt(p * (1 - p) / keep.numel())
        assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma
    assert not torch.equal(philox_keep(1, 10, 10, 0.5), philox_keep(2, 10, 10, 0.5))
