"""The triton row kernel of linear_log_probs' forward (fusedpeft/kernels/log_probs_jit.py) under the
interpreter (BLOCK_V 32): every per-token output against float64 full logits on odd vocabularies
(one partial tile, exact tiles, several tiles), temperature, softcap, ignored rows, a few rows per
chunk; fp32 / bf16 within twice the torch backend's error (the PyTorch chunk step it replaces);
is_top1 on exact ties across tiles (the first maximum wins, as torch.argmax and TRL)."""

import pytest
import torch

import fusedpeft as fp
from fusedpeft.kernels.log_probs import INTERPRETER_CONFIG
from helpers import assert_within
from test_log_probs import ALL, reference

BLOCK_V = INTERPRETER_CONFIG[0]
CASES = [(1.0, None), (0.7, 3.0), (1.3, None)]


def _inputs(n, h, v, dtype, seed, integer=False):
    torch.manual_seed(seed)
    make = (lambda *s: torch.randint(-1, 2, s).to(dtype)) if integer else (lambda *s: torch.randn(*s, dtype=dtype))
    hidden, weight, bias = make(n, h), make(v, h), (None if integer else make(v))
    labels = torch.randint(0, v, (n,))
    labels[[1, n - 2]] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("vocab,temperature,softcap", [(5, 1.0, None), (2 * BLOCK_V, 0.7, 3.0),
                                                       (3 * BLOCK_V + 13, 1.3, None), (3 * BLOCK_V + 13, 0.7, 3.0)])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-5)])
def test_outputs_match_float64_reference(vocab, temperature, softcap, dtype, atol):
    hidden, weight, bias, labels = _inputs(9, 8, vocab, dtype, seed=vocab)
    kwargs = dict(outputs=ALL, temperature=temperature, softcap=softcap, chunk_budget_bytes=4 * vocab * 8)
    out = fp.linear_log_probs(hidden, weight, labels, bias, backend="triton", **kwargs)
    twin = fp.linear_log_probs(hidden, weight, labels, bias, backend="torch", **kwargs)
    ref = reference(hidden, weight, bias, labels, temperature, softcap)
    for key in ALL[:4]:
        assert out[key].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_within(out[key], ref[key], twin[key], atol, key)
    if dtype != torch.bfloat16:  # bf16 logits round apart from float64 ones: near-ties may flip
        assert torch.equal(out["is_top1"], ref["is_top1"])
    assert not torch.stack([out[key][labels == -100].float() for key in ALL]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,softcap", CASES[:2])
def test_is_top1_first_maximum_wins_ties(dtype, temperature, softcap):
    """Logits are small integers (exact in every dtype), so many rows have several maxima, in
    different tiles; targets are picked among the first maximum, a later maximum and the rest."""
    n, vocab = 24, 3 * BLOCK_V + 5
    hidden, weight, _, _ = _inputs(n, 3, vocab, dtype, seed=3, integer=True)
    z = hidden.double() @ weight.double().t()
    maxima = [torch.nonzero(row == row.max()).flatten() for row in z]
    labels = torch.tensor([m[0] if t % 3 == 0 else (m[-1] if t % 3 == 1 else (m[-1] + 1) % vocab)
                           for t, m in enumerate(maxima)])
    out = fp.linear_log_probs(hidden, weight, labels, outputs=("is_top1",), temperature=temperature, softcap=softcap,
                              chunk_budget_bytes=5 * vocab * 8, backend="triton")
    want = reference(hidden, weight, None, labels, temperature, softcap)["is_top1"]
    assert torch.equal(out["is_top1"], want)
    later_tied = [t for t, m in enumerate(maxima) if t % 3 == 1 and len(m) > 1]
    across_tiles = [t for t in later_tied if maxima[t][0] // BLOCK_V != maxima[t][-1] // BLOCK_V]
    assert later_tied and across_tiles and not out["is_top1"][later_tied].any() and out["is_top1"][::3].all()


def test_only_asked_outputs_are_computed_and_lse_is_kept():
    """The op's raw result: outputs not asked for are 0 (the kernel's constexpr flags skip them),
    lse (saved for the backward) matches float64."""
    from fusedpeft.ops.log_probs import _linear_log_probs

    hidden, weight, _, labels = _inputs(7, 4, 41, torch.float64, seed=5)
    labels[::2] = (hidden @ weight.t()).argmax(-1)[::2]
    valid = labels != -100
    got = _linear_log_probs(hidden, weight, None, labels.clamp(min=0), valid.double(), 1 | 2 | 16, 1.0, None,
                            4096, "triton")
    assert got[1].any() and got[4].any() and not got[2].any() and not got[3].any()
    lse = torch.logsumexp(hidden @ weight.t(), -1) * valid
    torch.testing.assert_close(got[5], lse, rtol=1e-12, atol=1e-12)
