"""The torch backend's dropout: a torch.compile'd Philox formula fused with the dropped block (and,
in backward, with the gradient through the mask), bit for bit the reference for any seed, row
block, width, p and dtype; the eager formula when compiling fails (one warning) or
FUSEDPEFT_EAGER_DROPOUT=1."""

import pytest
import torch

from fusedpeft.reference import dropout_keep_mask, philox4x32
from fusedpeft.core.philox import philox_first_word
from fusedpeft.torch_backend import dropout as torch_dropout

CASES = [(123, 0, 7, 13, 0.1), (2**40 + 7, 64, 33, 100, 0.5), (-5, 1, 1, 5, 0.05), (-(2**62), 3, 17, 257, 0.9)]


def _multiplier(x, seed, p):
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p)
    return keep.to(x.dtype) * torch.tensor(1.0 / (1.0 - p), dtype=x.dtype)


def _run(x, seed, p, branch=None):
    """(dropout(x) assembled from the blocks, the gradient written through the mask or None)."""
    grad_x = torch.full_like(x, float("nan")) if branch is not None else None
    blocks = list(torch_dropout.dropped_blocks(x, p, torch.tensor(seed), grad_x,
                                               (lambda rows: branch[rows]) if branch is not None else None))
    assert [rows.start for rows, _ in blocks] == sorted({rows.start for rows, _ in blocks})
    return torch.cat([block for _, block in blocks]), grad_x


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 3, 2**32 + 5, 2**63 - 1, -(2**63), 0x5DEECE66D2F1A3B7])
def test_philox_first_word_is_the_reference(seed):
    counter = torch.cat([torch.arange(0, 300), torch.randint(0, 2**32, (300,)),
                         torch.tensor([2**31 - 1, 2**31, 2**32 - 1])])
    seed_t = torch.tensor(seed)
    got = philox_first_word(seed_t & 0xFFFFFFFF, (seed_t >> 32) & 0xFFFFFFFF, counter)
    assert torch.equal(got, philox4x32(seed, counter)[0])


# every case in fp32; bf16 and fp64 (one compile of each graph per dtype, ~10 s each) on one case
@pytest.mark.parametrize("seed, row_start, rows, cols, p, dtype",
                         [(*case, torch.float32) for case in CASES]
                         + [(*CASES[1], torch.bfloat16), (*CASES[3], torch.float64)])
def test_compiled_blocks_are_the_reference(seed, row_start, rows, cols, p, dtype, monkeypatch):
    monkeypatch.setitem(torch_dropout.BLOCK_ELEMENTS, "cpu", 4 * cols)  # several blocks: the row offsets matter
    x = torch.randn(row_start + rows, cols).to(dtype)
    branch = torch.randn_like(x)
    multiplier = _multiplier(x, seed, p)
    dropped, _ = _run(x, seed, p)
    assert torch.equal(dropped, x * multiplier)
    dropped, grad = _run(x, seed, p, branch)
    assert torch.equal(dropped, x * multiplier) and torch.equal(grad, branch * multiplier)
    assert all(torch_dropout._COMPILED.get((g, "cpu")) is not None for g in ("forward", "backward")), \
        "the compiled path did not run"


def test_eager_formula_when_forced_or_when_compiling_fails(monkeypatch):
    seed, p = 99, 0.3
    x, branch = torch.randn(12, 31), torch.randn(12, 31)
    multiplier = _multiplier(x, seed, p)
    monkeypatch.setenv("FUSEDPEFT_EAGER_DROPOUT", "1")
    dropped, grad = _run(x, seed, p, branch)
    assert torch.equal(dropped, x * multiplier) and torch.equal(grad, branch * multiplier)
    monkeypatch.delenv("FUSEDPEFT_EAGER_DROPOUT")

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    for graph in ("forward", "backward"):
        monkeypatch.setitem(torch_dropout._COMPILED, (graph, "cpu"), broken)
    with pytest.warns(RuntimeWarning, match="compiling the dropout mask for cpu failed .*no C\\+\\+ compiler"):
        dropped, grad = _run(x, seed, p, branch)
    assert torch.equal(dropped, x * multiplier) and torch.equal(grad, branch * multiplier)
    assert torch_dropout._COMPILED[("backward", "cpu")] is None
    assert len(list(torch_dropout.row_blocks(1 << 12, 64))) == 4  # eager: cache-sized blocks again
