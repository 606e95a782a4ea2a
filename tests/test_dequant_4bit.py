"""The C++ 4-bit dequantization (fusedpeft_C::dequantize_4bit) against bitsandbytes, bit for bit."""

import pytest
import torch

from fusedpeft.backends import unavailable_reason
from fusedpeft.quantized import QuantizedWeight, dense_weight, quantized_weight
from qlora_helpers import linear4bit

needs_extension = pytest.mark.skipif(unavailable_reason("cpu", "lora", torch.device("cpu")) is not None,
                                     reason="the C++ extension is not built")


def _bnb_reference(layer) -> torch.Tensor:
    """bitsandbytes' reference layout (its default backend: flat blocks, what its CUDA kernel and
    its quantizer use), with the double-quantized scales decoded by bitsandbytes itself."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(layer.weight.data.view(torch.uint8).reshape(-1), absmax.float(),
                   _get_4bit_code(state.quant_type, absmax.device), state.blocksize, state.shape, state.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("k,d", [(128, 48), (4096, 3), (70, 33), (9, 7)])
@needs_extension
def test_bit_exact_with_bitsandbytes(quant_type, double_quant, dtype, blocksize, k, d):
    import bitsandbytes.functional as F
    from fusedpeft.cpp_backend.dequant import dequantize_4bit

    layer = linear4bit(k, d, dtype, quant_type, double_quant, blocksize)
    q = quantized_weight(layer)
    got = dequantize_4bit(q)
    assert got.dtype == dtype and got.shape == (d, k)
    want = _bnb_reference(layer)
    # FP4's zero code: +0 in bitsandbytes' code book, -0 from part of its CPU kernels; equal as values
    assert torch.equal(_bits(got), _bits(want)) or (quant_type == "fp4" and torch.equal(got, want))
    if k % blocksize == 0:  # where bitsandbytes' public CPU dequantize_4bit places the block scales right
        public = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(got, public)
        assert torch.equal(_bits(got), _bits(public)) or quant_type == "fp4"


def test_dense_weight_rule():
    """One rule for every backend: tensors pass through, 4-bit is dequantized in the asked dtype
    (by a backend's kernel when given), 8-bit has no dense weight (the layer adds its own output)."""
    w = torch.randn(4, 4)
    assert dense_weight(w, torch.float32) is w
    layer = linear4bit(64, 8, torch.bfloat16)
    q = quantized_weight(layer)
    assert isinstance(q, QuantizedWeight) and q.shape == (8, 64) and q.dtype == torch.bfloat16
    assert dense_weight(q, torch.float32).dtype == torch.float32
    calls = []
    assert dense_weight(q, torch.float32, lambda qw: calls.append(qw) or torch.zeros(8, 64)).dtype == torch.float32
    assert calls == [q]
    from qlora_helpers import linear8bit

    assert dense_weight(quantized_weight(linear8bit(64, 8)), torch.float32) is None


@needs_extension
def test_bad_arguments_are_rejected_before_the_kernel():
    import fusedpeft._C  # noqa: F401

    op = torch.ops.fusedpeft_C.dequantize_4bit
    packed, code, absmax = torch.zeros(32, dtype=torch.uint8), torch.zeros(16), torch.ones(1)
    with pytest.raises(RuntimeError, match="packed must hold"):
        op(packed, code, absmax, None, None, 0.0, 64, 0, 100, torch.float32)
    with pytest.raises(RuntimeError, match="absmax must hold one scale per block"):
        op(packed, code, torch.ones(2), None, None, 0.0, 64, 0, 64, torch.float32)
    with pytest.raises(RuntimeError, match="code must hold the 16 values"):
        op(packed, torch.zeros(8), absmax, None, None, 0.0, 64, 0, 64, torch.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize,k,d", [(64, 128, 48), (32, 70, 33), (256, 9, 7)])
def test_triton_kernel_bit_exact(quant_type, double_quant, dtype, blocksize, k, d):
    """The Triton dequantization (under the interpreter here) equals the C++ kernel and bitsandbytes'."""
    if unavailable_reason("triton", "lora", torch.device("cpu")) is not None:
        pytest.skip("triton cannot run here")
    from fusedpeft.kernels.dequant import dequantize_4bit

    layer = linear4bit(k, d, dtype, quant_type, double_quant, blocksize)
    got = dequantize_4bit(quantized_weight(layer))
    want = _bnb_reference(layer)
    assert got.dtype == dtype and got.shape == (d, k)
    assert torch.equal(_bits(got), _bits(want)) or (quant_type == "fp4" and torch.equal(got, want))
