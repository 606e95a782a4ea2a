"""Independent spec tests for MoRA (docs/contract.md §3, §5 dropout, §6 bad input).

The oracle is an eager re-statement, written for this file, of the MoRA reference code
(kongds/MoRA, peft-mora fork: ``_apply_mora`` and ``get_delta_weight``) as described in
docs/contract.md §3: round-to-nearest r_hat (even for type 6), wrap
padding with a copy of the first features, chunk sums / contiguous groups, tile or
repeat_interleave on the output side, RoPE chunks (fp32 tables, rotate-half, base 10000,
position = chunk index) and the Python-loop merge. It deliberately mirrors the reference
code's loop / cat / reshape style and does not call fusedpeft.

Checked against it, in float64: the re-statement's own forward-vs-merge identity,
``fusedpeft.reference`` (which computes in fp32, so fp32-level tolerance), and ``fp.MoRALinear``
(forward, delta_weight, gradients wrt x and M, merge / unmerge, dropout).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fusedpeft as fp
from fusedpeft import reference as ref

ALL_TYPES = (1, 2, 3, 4, 6)

# --------------------------------------------------------------------------------------------
# Eager re-statement of the MoRA reference code (mora.md §1, §3)
# --------------------------------------------------------------------------------------------


def restated_r_hat(in_f: int, out_f: int, r: int, mora_type: int) -> int:
    """update_layer: round(sqrt((k + d) r)) to nearest; type 6 floors it to even."""
    new_r = int(math.sqrt((in_f + out_f) * r) + 0.5)
    if mora_type == 6:
        new_r = new_r // 2 * 2
    return new_r


def _rope_tables(r: int, rb1: int):
    """cos, sin [rb1, r] in fp32: inv_freq over even indices, position = chunk index, emb = cat(f, f)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    t = torch.arange(rb1).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def restated_apply_mora(x: torch.Tensor, M: torch.Tensor, in_f: int, out_f: int, mora_type: int) -> torch.Tensor:
    """The MoRA branch of the forward: x [..., in_f] -> [..., out_f]; M [r, r] applied as z @ M^T."""
    r = M.shape[0]
    sum_inter = in_f // r
    rb1 = in_f // r if in_f % r == 0 else in_f // r + 1
    pad_size = r - in_f % r if in_f % r != 0 else 0

    if mora_type in (1, 4):
        if pad_size > 0:
            x = torch.cat([x, x[..., :pad_size]], dim=-1)  # wrap-around copy, not zeros
            sum_inter += 1
        in_x = x.reshape(*x.shape[:-1], sum_inter, r)
        in_x = in_x.sum(dim=-2)
    elif mora_type in (2, 3):
        mr, nr = in_f // r + 1, in_f // r
        m, n = in_f - r * nr, r * mr - in_f  # m groups of mr features, then n groups of nr
        mc = m * mr
        first = x[..., :mc].reshape(*x.shape[:-1], m, mr).sum(dim=-1)
        rest = x[..., mc:].reshape(*x.shape[:-1], n, nr).sum(dim=-1)
        in_x = torch.cat([first, rest], dim=-1)
    elif mora_type == 6:
        if pad_size > 0:
            x = torch.cat([x, x[..., :pad_size]], dim=-1)
        in_x = x.reshape(*x.shape[:-1], rb1, r)
        cos, sin = _rope_tables(r, rb1)
        cos, sin = cos.unsqueeze(0).to(x), sin.unsqueeze(0).to(x)  # fp32 tables, cast to x's dtype
        rh_in_x = torch.cat((-in_x[..., r // 2 :], in_x[..., : r // 2]), dim=-1)
        in_x = in_x * cos + rh_in_x * sin
    else:
        raise ValueError(mora_type)

    out_x = in_x @ M.t()  # nn.Linear(r, r, bias=False)

    if mora_type == 6:
        out_x = out_x.reshape(*x.shape[:-1], -1)[..., :out_f]
        if out_x.shape[-1] < out_f:
            repeat_time = out_f // out_x.shape[-1]
            if out_f % out_x.shape[-1] != 0:
                repeat_time += 1
            out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    elif mora_type in (1, 3):
        repeat_time = out_f // r
        if out_f % r != 0:
            repeat_time += 1
        out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    else:  # 2, 4: repeat_interleave
        mr, nr = out_f // r + 1, out_f // r
        m = out_f - r * nr
        out_x = torch.cat(
            [torch.repeat_interleave(out_x[..., :m], mr, dim=-1), torch.repeat_interleave(out_x[..., m:], nr, dim=-1)],
            dim=-1,
        )
    return out_x


def restated_delta_weight(M: torch.Tensor, in_f: int, out_f: int, mora_type: int) -> torch.Tensor:
    """get_delta_weight: the merge, built with Python loops; [out_f, in_f] in M's dtype."""
    r = M.shape[0]
    M = M.detach()
    pad_size = r - in_f % r if in_f % r != 0 else 0

    if mora_type in (1, 4):
        w = torch.zeros(r, in_f, dtype=M.dtype)
        for i in range(in_f + pad_size):
            w[:, i % in_f] += M[:, i % r]
    elif mora_type in (2, 3):
        w = torch.zeros(r, in_f, dtype=M.dtype)
        mr, nr = in_f // r + 1, in_f // r
        m = in_f - r * nr
        col = 0
        for g in range(r):
            for _ in range(mr if g < m else nr):
                w[:, col] += M[:, g]
                col += 1
        assert col == in_f
    elif mora_type == 6:
        rb1 = in_f // r if in_f % r == 0 else in_f // r + 1
        cos, sin = _rope_tables(r, rb1)
        cos, sin = cos.to(M), sin.to(M)
        rh_M = torch.cat((M[:, r // 2 :], -M[:, : r // 2]), dim=-1)
        new_w = torch.zeros(rb1 * r, in_f, dtype=M.dtype)
        for i in range(rb1):
            block = M * cos[i] + rh_M * sin[i]  # M . R_i (columns scaled)
            rows = slice(i * r, (i + 1) * r)
            if i == rb1 - 1 and pad_size > 0:
                keep = r - pad_size
                new_w[rows, i * r : in_f] += block[:, :keep]
                new_w[rows, :pad_size] += block[:, keep:]  # the wrapped columns
            else:
                new_w[rows, i * r : (i + 1) * r] += block
        if new_w.shape[0] >= out_f:
            return new_w[:out_f]
        repeat_time = out_f // new_w.shape[0]
        if out_f % new_w.shape[0] != 0:
            repeat_time += 1
        return torch.cat([new_w] * repeat_time, dim=0)[:out_f]
    else:
        raise ValueError(mora_type)

    if mora_type in (1, 3):
        repeat_time = out_f // r
        if out_f % r != 0:
            repeat_time += 1
        return torch.cat([w] * repeat_time, dim=0)[:out_f]
    mr, nr = out_f // r + 1, out_f // r
    m = out_f - r * nr
    return torch.cat([torch.repeat_interleave(w[:m], mr, dim=0), torch.repeat_interleave(w[m:], nr, dim=0)], dim=0)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

# (k, d, R) of mora.md §3 "Consistency", plus R > k with pad <= k (padding re-uses features)
EXPLICIT_CASES = [(12, 12, 4), (10, 14, 4), (14, 10, 4), (13, 29, 6), (30, 7, 6), (16, 40, 8), (5, 9, 8)]

# (k, d, r) for the layer: r_hat falls where it falls; covers k % r_hat == 0 and != 0, d > k, d < k, d == k.
LAYER_SHAPES = [(12, 12, 1), (10, 14, 1), (14, 10, 1), (13, 29, 1), (30, 7, 1), (16, 40, 2), (33, 65, 2)]


def _rand_M(R: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(R, R, dtype=dtype) / math.sqrt(R)


def _make_layer(k, d, r, mora_type, bias=True, dtype=torch.float64, **kw):
    base = nn.Linear(k, d, bias=bias).to(dtype)
    layer = fp.MoRALinear(base, r=r, mora_type=mora_type, **kw)
    M = _rand_M(layer.r_hat, dtype)
    with torch.no_grad():
        layer.M.copy_(M)
    return base, layer


def _close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


def _ref_tol(out):
    """fusedpeft.reference computes in fp64 for fp64 inputs (else fp32)."""
    return F64 if out.dtype == torch.float64 else F32


# float64 tolerances: the float64 computations agree to ~1e-14; a real bug is O(1), and fp64
# RoPE tables (instead of docs/contract.md §3's fp32 tables) would show up at ~1e-7.
F64 = dict(rtol=1e-10, atol=1e-10)
# fusedpeft.reference computes in fp32 whatever the input dtype.
F32 = dict(rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------
# r_hat
# --------------------------------------------------------------------------------------------

# mora.md §1 worked values: (k, d, r, mora_type, r_hat)
R_HAT_TABLE = [
    (4096, 4096, 8, 1, 256),
    (4096, 4096, 8, 6, 256),
    (4096, 4096, 128, 1, 1024),
    (4096, 4096, 256, 1, 1448),
    (4096, 11008, 8, 1, 348),
    (11008, 4096, 256, 1, 1966),
    (4096, 1024, 8, 1, 202),
    (4096, 1024, 256, 1, 1145),
    (4096, 1024, 256, 6, 1144),
    (768, 768, 8, 1, 111),  # round to nearest: floor would give 110
    (768, 768, 8, 6, 110),
    (768, 768, 128, 1, 443),
    (768, 768, 128, 6, 442),
    (768, 768, 256, 1, 627),
    (768, 768, 256, 6, 626),
]


@pytest.mark.parametrize("k,d,r,mora_type,expected", R_HAT_TABLE)
def test_r_hat_worked_values_reference(k, d, r, mora_type, expected):
    assert restated_r_hat(k, d, r, mora_type) == expected
    assert ref.mora_r_hat(k, d, r, mora_type) == expected


@pytest.mark.parametrize(
    "k,d,r,mora_type,expected",
    [(4096, 4096, 8, 1, 256), (4096, 4096, 256, 1, 1448), (4096, 1024, 256, 6, 1144), (4096, 1024, 256, 3, 1145),
     (768, 768, 8, 1, 111), (768, 768, 8, 6, 110)],
)
def test_r_hat_worked_values_layer(k, d, r, mora_type, expected):
    base = torch.nn.utils.skip_init(nn.Linear, k, d)
    layer = fp.MoRALinear(base, r=r, mora_type=mora_type)
    assert layer.r_hat == expected
    assert layer.mora_type == mora_type
    assert tuple(layer.M.shape) == (expected, expected)
    assert isinstance(layer.M, nn.Parameter)
    assert torch.count_nonzero(layer.M) == 0, "M must be zero-initialised"


# --------------------------------------------------------------------------------------------
# The re-statement against itself and against fusedpeft.reference, explicit R
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mora_type", ALL_TYPES)
@pytest.mark.parametrize("k,d,R", EXPLICIT_CASES)
def test_restated_forward_equals_restated_merge(k, d, R, mora_type):
    M = _rand_M(R)
    x = torch.randn(6, k, dtype=torch.float64)
    out = restated_apply_mora(x, M, k, d, mora_type)
    dW = restated_delta_weight(M, k, d, mora_type)
    assert out.shape == (6, d) and dW.shape == (d, k)
    _close(out, x @ dW.t(), **F64)


@pytest.mark.parametrize("mora_type", ALL_TYPES)
@pytest.mark.parametrize("k,d,R", EXPLICIT_CASES)
def test_reference_matches_restatement(k, d, R, mora_type):
    M = _rand_M(R)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    expected = restated_apply_mora(x, M, k, d, mora_type)
    out = ref.mora_adapter(x, M, d, mora_type)
    _close(out, expected, **_ref_tol(out))
    dW = ref.mora_delta_weight(M, k, d, mora_type)
    _close(dW, restated_delta_weight(M, k, d, mora_type), **_ref_tol(dW))


def test_restatement_wraps_not_zero_pads():
    """Guard on the oracle itself: type 1 at (k, R) = (10, 4): pad 2 re-uses features 0 and 1."""
    M = torch.eye(4, dtype=torch.float64)
    x = torch.arange(1.0, 11.0, dtype=torch.float64).unsqueeze(0)  # features 1..10
    out = restated_apply_mora(x, M, 10, 4, 1)
    # z[j] = sum_i x_ext[4 i + j], x_ext = [1..10, 1, 2]
    assert out.tolist() == [[1 + 5 + 9, 2 + 6 + 10, 3 + 7 + 1, 4 + 8 + 2]]
    # types 2/3 at (10, 4): groups of 3, 3, 2, 2 contiguous features
    out3 = restated_apply_mora(x, M, 10, 4, 3)
    assert out3.tolist() == [[1 + 2 + 3, 4 + 5 + 6, 7 + 8, 9 + 10]]
    # type 2 output side: d = 6, R = 4 -> y0, y0, y1, y1, y2, y3
    y = restated_apply_mora(x, M, 10, 6, 2)
    assert y.tolist() == [[6, 6, 15, 15, 15, 19]]


def test_restatement_type6_chunk0_unrotated_and_rotation_layout():
    """Guard on the oracle: chunk 0 passes unrotated; chunk 1 rotates pair (j, j + R/2) by 10000^(-2j/R)."""
    R = 4
    M = torch.eye(R, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    out = restated_apply_mora(x, M, 8, 8, 6)
    assert out[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0]
    th = torch.tensor([1.0, 0.01], dtype=torch.float32)  # angles 1 * 10000^(-2j/4) for j = 0, 1
    c, s = th.cos().double(), th.sin().double()
    a, b = torch.tensor([5.0, 6.0], dtype=torch.float64), torch.tensor([7.0, 8.0], dtype=torch.float64)
    expected = torch.cat([a * c - b * s, b * c + a * s])
    _close(out[0, 4:], expected, rtol=1e-12, atol=1e-12)


# mora.md §3 "Rank": types 1-4 vs type 6 at explicit R
RANK_EXAMPLES = [((12, 12, 4), 4, 12), ((10, 14, 4), 4, 10), ((13, 29, 6), 6, 13), ((30, 7, 6), 6, 7),
                 ((14, 10, 4), 4, 10), ((16, 40, 8), 8, 16)]


@pytest.mark.parametrize("case,rank_sharing,rank_rope", RANK_EXAMPLES)
def test_rank_of_delta_weight_explicit_R(case, rank_sharing, rank_rope):
    k, d, R = case
    M = _rand_M(R)
    for t in (1, 2, 3, 4):
        for dW in (restated_delta_weight(M, k, d, t), ref.mora_delta_weight(M, k, d, t).double()):
            assert torch.linalg.matrix_rank(dW).item() == rank_sharing, t
    for dW in (restated_delta_weight(M, k, d, 6), ref.mora_delta_weight(M, k, d, 6).double()):
        assert torch.linalg.matrix_rank(dW).item() == rank_rope == min(d, k)


def test_type6_d_less_than_k_only_first_columns_reach_output():
    """mora.md §3: 30 -> 7 with R = 6: only input columns 0..11 are non-zero."""
    dW = ref.mora_delta_weight(_rand_M(6), 30, 7, 6)
    assert torch.count_nonzero(dW[:, 12:]) == 0
    assert (dW[:, :12].abs().sum(0) > 0).all()


def test_reference_rejects_padding_larger_than_in_features():
    # k = 4, R = 10: pad = 6 > 4
    x = torch.randn(3, 4)
    for t in (1, 4, 6):
        with pytest.raises(ValueError, match=r"(?i)pad|in_features"):
            ref.mora_adapter(x, _rand_M(10, torch.float32), 5, t)


# --------------------------------------------------------------------------------------------
# fp.MoRALinear
# --------------------------------------------------------------------------------------------


def _shape_ids(shapes):
    return [f"k{k}-d{d}-r{r}" for k, d, r in shapes]


def test_layer_shapes_cover_the_cases():
    """The layer shapes reach padded and unpadded inputs, d > k, d < k and (type 6) tiled outputs."""
    seen = set()
    for k, d, r in LAYER_SHAPES:
        for t in (1, 6):
            R = restated_r_hat(k, d, r, t)
            seen.add("pad" if k % R else "nopad")
            seen.add("d>k" if d > k else "d<k" if d < k else "d=k")
            if t == 6:
                n = -(-k // R)
                seen.add("tile" if n * R < d else "truncate")
    assert seen >= {"pad", "nopad", "d>k", "d<k", "d=k", "tile", "truncate"}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mora_type", ALL_TYPES)
@pytest.mark.parametrize("k,d,r", LAYER_SHAPES, ids=_shape_ids(LAYER_SHAPES))
def test_layer_forward_and_grads_match_restatement(k, d, r, mora_type, bias):
    base, layer = _make_layer(k, d, r, mora_type, bias=bias)
    R = layer.r_hat
    assert R == restated_r_hat(k, d, r, mora_type)
    M = layer.M.detach().clone()

    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, d) and y.dtype == torch.float64

    with torch.no_grad():
        dW = layer.delta_weight()
    assert tuple(dW.shape) == (d, k)
    _close(dW, restated_delta_weight(M, k, d, mora_type), **F64)
    _close(y, base(x) + x @ dW.to(x.dtype).t(), **F64)

    # oracle: base + eager re-statement, autograd through it
    x_ref = x.detach().clone().requires_grad_(True)
    M_ref = M.clone().requires_grad_(True)
    y_ref = x_ref @ base.weight.detach().t() + restated_apply_mora(x_ref, M_ref, k, d, mora_type)
    if bias:
        y_ref = y_ref + base.bias.detach()
    _close(y, y_ref, **F64)

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    _close(x.grad, x_ref.grad, **F64)
    _close(layer.M.grad, M_ref.grad, **F64)
    assert base.weight.grad is None, "no gradient may reach the base weight"
    if bias:
        assert base.bias.grad is None, "no gradient may reach the base bias"


@pytest.mark.parametrize("mora_type", ALL_TYPES)
def test_layer_2d_input_and_rank(mora_type):
    k, d, r = 12, 12, 1  # r_hat 5 (type 6: 4)
    base, layer = _make_layer(k, d, r, mora_type)
    x = torch.randn(7, k, dtype=torch.float64)
    expected = base(x) + restated_apply_mora(x, layer.M.detach(), k, d, mora_type)
    _close(layer(x), expected, **F64)
    rank = torch.linalg.matrix_rank(layer.delta_weight().detach().double()).item()
    if mora_type == 6:
        assert rank == min(d, k) == 12
    else:
        assert rank == min(layer.r_hat, d, k) == 5


def test_layer_float32_matches_restatement():
    k, d, r = 33, 65, 2
    for t in ALL_TYPES:
        base, layer = _make_layer(k, d, r, t, dtype=torch.float32)
        x = torch.randn(4, k)
        y = layer(x)
        assert y.dtype == torch.float32
        expected = base.double()(x.double()) + restated_apply_mora(x.double(), layer.M.detach().double(), k, d, t)
        _close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mora_type", (1, 4, 6))
def test_layer_rejects_padding_larger_than_in_features(mora_type):
    # k = 4, d = 30, r = 3: r_hat = round(sqrt(102)) = 10 (even), pad = 10 - 4 = 6 > k = 4
    assert restated_r_hat(4, 30, 3, mora_type) == 10
    base = nn.Linear(4, 30)
    with pytest.raises(ValueError, match=r"(?i)pad|in_features"):
        layer = fp.MoRALinear(base, r=3, mora_type=mora_type)
        with torch.no_grad():
            layer.M.copy_(_rand_M(10, torch.float32))
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("mora_type", (2, 3))
def test_layer_types_2_3_have_no_padding_limit(mora_type):
    """Types 2/3 do not pad, so r_hat > 2k is legal for them (groups of 1 and 0 features)."""
    base, layer = _make_layer(4, 30, 3, mora_type)
    assert layer.r_hat == 10
    x = torch.randn(3, 4, dtype=torch.float64)
    _close(layer(x), base(x) + restated_apply_mora(x, layer.M.detach(), 4, 30, mora_type), **F64)


@pytest.mark.parametrize("bad_type", [5, 0, 7])
def test_layer_rejects_unknown_mora_type(bad_type):
    with pytest.raises(ValueError, match="mora_type"):
        fp.MoRALinear(nn.Linear(16, 16), r=2, mora_type=bad_type)


def test_layer_rejects_bad_r_and_dropout_and_input_width():
    with pytest.raises(ValueError, match=r"\br\b"):
        fp.MoRALinear(nn.Linear(16, 16), r=0, mora_type=6)
    with pytest.raises(ValueError, match="dropout"):
        fp.MoRALinear(nn.Linear(16, 16), r=2, mora_type=6, dropout=1.0)
    layer = fp.MoRALinear(nn.Linear(16, 16), r=2, mora_type=6)
    with pytest.raises(ValueError, match=r"in_features|x"):
        layer(torch.randn(3, 15))


MERGE_SHAPES = [(13, 29, 1), (30, 7, 1), (33, 65, 2)]


@pytest.mark.parametrize("mora_type", ALL_TYPES)
@pytest.mark.parametrize("k,d,r", MERGE_SHAPES, ids=_shape_ids(MERGE_SHAPES))
def test_layer_merge_unmerge(k, d, r, mora_type):
    base, layer = _make_layer(k, d, r, mora_type)
    W0 = base.weight.detach().clone()
    x = torch.randn(5, k, dtype=torch.float64)
    with torch.no_grad():
        y0 = layer(x)
        dW = restated_delta_weight(layer.M.detach(), k, d, mora_type)
        assert layer.merged is False
        layer.merge()
        assert layer.merged is True
        assert layer.base_layer is base, "the base layer is wrapped (shared), not copied"
        _close(layer.base_layer.weight, W0 + dW, **F64)
        _close(layer(x), y0, **F64)
        layer.unmerge()
        assert layer.merged is False
        _close(layer.base_layer.weight, W0, rtol=0, atol=1e-13)
        _close(layer(x), y0, **F64)


@pytest.mark.parametrize("mora_type,tokens", [(1, 5), (2, 5), (6, 5), (6, 1000)])
def test_layer_dropout_uses_spec_seed(mora_type, tokens):
    """docs/contract.md §3/§5: dropout on x before compression; mask from one seed drawn from the CPU generator.
    tokens = 1000: x[2000, 33] has more than 2**16 elements (block-wise mask generation)."""
    k, d, r, p = 33, 65, 2, 0.3
    base, layer = _make_layer(k, d, r, mora_type, dropout=p)
    layer.train()
    x = torch.randn(2, tokens, k, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    assert torch.equal(torch.get_rng_state(), after), "the forward must draw exactly one seed"
    keep = ref.dropout_keep_mask(seed, 2 * tokens, k, p).reshape(2, tokens, k)
    assert 0 < keep.float().mean() < 1

    x_ref = x.detach().clone().requires_grad_(True)
    M_ref = layer.M.detach().clone().requires_grad_(True)
    x_drop = x_ref * keep / (1 - p)
    y_ref = base(x_ref) + restated_apply_mora(x_drop, M_ref, k, d, mora_type)
    _close(y, y_ref, **F64)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    _close(x.grad, x_ref.grad, **F64)
    _close(layer.M.grad, M_ref.grad, **F64)

    layer.eval()
    with torch.no_grad():
        _close(layer(x), base(x) + restated_apply_mora(x, layer.M.detach(), k, d, mora_type), **F64)
