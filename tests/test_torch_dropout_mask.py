"""The torch backend's dropout: a torch.compile'd copy of the reference Philox formula fused with
the multiplier and the dropped block, bit for bit the reference for any seed, row block, width, p
and dtype; the eager formula when compiling fails (one warning) or FUSEDPEFT_EAGER_DROPOUT=1."""

import pytest
import torch

from fusedpeft.reference import dropout_keep_mask
from fusedpeft.torch_backend import dropout as torch_dropout

CASES = [(123, 0, 7, 13, 0.1), (2**40 + 7, 64, 33, 100, 0.5), (-5, 1, 1, 5, 0.05), (-(2**62), 3, 17, 257, 0.9)]


def _expected(x, seed, rows, p):
    keep = dropout_keep_mask(seed, rows.stop - rows.start, x.shape[1], p, row_start=rows.start)
    multiplier = keep.to(x.dtype) * torch.tensor(1.0 / (1.0 - p), dtype=x.dtype)
    return multiplier, x[rows] * multiplier


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed, row_start, rows, cols, p", CASES)
def test_compiled_block_is_the_reference(seed, row_start, rows, cols, p, dtype):
    x = torch.randn(row_start + rows, cols).to(dtype)
    block = slice(row_start, row_start + rows)
    got = torch_dropout.dropout_multiplier_and_input(x, torch.tensor(seed), p, block)
    want = _expected(x, seed, block, p)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch_dropout._COMPILED.get("cpu") is not None, "the compiled path did not run"


def test_eager_formula_when_forced_or_when_compiling_fails(monkeypatch):
    seed, block, p = 99, slice(5, 12), 0.3
    x = torch.randn(12, 31)
    want = _expected(x, seed, block, p)
    monkeypatch.setenv("FUSEDPEFT_EAGER_DROPOUT", "1")
    assert torch.equal(torch_dropout.dropout_multiplier_and_input(x, torch.tensor(seed), p, block)[1], want[1])
    monkeypatch.delenv("FUSEDPEFT_EAGER_DROPOUT")

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(torch_dropout._COMPILED, "cpu", broken)
    with pytest.warns(RuntimeWarning, match="compiling the dropout mask for cpu failed .*no C\\+\\+ compiler"):
        got = torch_dropout.dropout_multiplier_and_input(x, torch.tensor(seed), p, block)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch_dropout._COMPILED["cpu"] is None
    assert len(list(torch_dropout.row_blocks(1 << 12, 64))) == 4  # eager: cache-sized blocks again
