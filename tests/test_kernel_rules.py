"""The launch rules every Triton kernel family shares (fusedpeft/kernels/_common.py) and the
accumulation dtype every backend shares (fusedpeft/core/dtypes.py), on fake capabilities and
dtypes: no GPU or kernel launch needed."""

import pytest
import torch
import triton.language as tl

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.kernels import _common


@pytest.mark.parametrize("cap,expected", [
    ((8, 0), 80), ((8, 6), 80), ((8, 9), 80),    # A100, RTX 30xx, L4 / RTX 40xx
    ((9, 0), 90),                                # H100 / H200
    ((10, 0), 90), ((10, 3), 90),                # B200 / B300
    ((12, 0), 80), ((12, 1), 80),                # RTX 50xx, DGX Spark: ~99 KB shared memory, no wgmma
    ((7, 5), 80), ((0, 0), 80),                  # older GPUs; CPU tensors under the interpreter
])
def test_arch_class_of_fake_capabilities(cap, expected):
    assert _common.arch_class_of(cap) == expected


def test_arch_class_reads_the_tensors_device(monkeypatch):
    monkeypatch.setattr(_common, "device_capability", lambda t: (12, 0))
    assert _common.arch_class(torch.zeros(1)) == 80
    monkeypatch.setattr(_common, "device_capability", lambda t: (10, 0))
    assert _common.arch_class(torch.zeros(1)) == 90


@pytest.mark.parametrize("dtype,acc,tl_acc,precision", [
    (torch.float16, torch.float32, tl.float32, "tf32"),
    (torch.bfloat16, torch.float32, tl.float32, "tf32"),
    (torch.float32, torch.float32, tl.float32, "ieee"),
    (torch.float64, torch.float64, tl.float64, "ieee"),
])
def test_accumulation_dtype_and_dot_precision(dtype, acc, tl_acc, precision):
    assert accumulation_dtype(dtype) == acc
    assert _common.tl_accumulation_dtype(dtype) == tl_acc
    assert _common.dot_precision(dtype) == precision


def test_unavailable_reason_names_the_device():
    assert "need CUDA tensors (got meta)" in _common.unavailable_reason(torch.device("meta"))
