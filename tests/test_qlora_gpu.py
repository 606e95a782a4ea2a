"""QLoRA on a GPU at Llama shapes (run by bench/gpu_check.sh): the CUDA and Triton 4-bit
dequantization kernels bit-exact with bitsandbytes' CUDA kernel, and LoRALinear / MoRALinear over
bitsandbytes Linear4bit on every GPU backend against the reference with bitsandbytes' W."""

import warnings

import pytest
import torch

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.backends import unavailable_reason
from fusedpeft.quantized import quantized_weight
from helpers import assert_within, grads

pytestmark = pytest.mark.gpu
bnb = pytest.importorskip("bitsandbytes")
LLAMA = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)


def cuda_linear4bit(k, d, dtype, quant_type="nf4", double_quant=True):
    layer = bnb.nn.Linear4bit(k, d, bias=False, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=double_quant)
    layer.weight.data = (torch.randn(d, k) / k**0.5).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer.to("cuda")


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _dequantizers():
    out = []
    if unavailable_reason("cuda", "lora", torch.device("cuda")) is None:
        from fusedpeft.cpp_backend.dequant import dequantize_4bit as cuda_dequant

        out.append(("cuda", cuda_dequant))
    if unavailable_reason("triton", "lora", torch.device("cuda")) is None:
        from fusedpeft.kernels.dequant import dequantize_4bit as triton_dequant

        out.append(("triton", triton_dequant))
    return out


@pytest.mark.parametrize("k,d", LLAMA)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequant_kernels_bit_exact_with_bitsandbytes_cuda(k, d, quant_type, double_quant, dtype):
    from bitsandbytes.functional import dequantize_4bit

    kernels = _dequantizers()
    if not kernels:
        pytest.skip("neither the cuda nor the triton backend can run here")
    layer = cuda_linear4bit(k, d, dtype, quant_type, double_quant)
    want = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    q = quantized_weight(layer)
    for name, kernel in kernels:
        got = kernel(q)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(_bits(got), _bits(want)) or (quant_type == "fp4" and torch.equal(got, want)), name


def _backends(family):
    return [b for b in ("triton", "cuda", "torch") if unavailable_reason(b, family, torch.device("cuda")) is None]


@pytest.mark.parametrize("k,d", LLAMA)
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_lora_over_nf4_at_llama_shapes(k, d, dropout):
    layer4 = cuda_linear4bit(k, d, torch.bfloat16)
    from bitsandbytes.functional import dequantize_4bit

    W = dequantize_4bit(layer4.weight.data, layer4.weight.quant_state).to(torch.bfloat16)
    for backend in _backends("lora"):
        layer = fp.LoRALinear(layer4, r=16, alpha=32, dropout=dropout, backend=backend)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.02)
        x = torch.randn(512, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        state = torch.get_rng_state()
        y = layer(x)
        torch.set_rng_state(state)
        seed = int(ref.new_dropout_seed())
        params = [x, layer.lora_A.weight, layer.lora_B.weight]
        p32 = [t.detach().float().requires_grad_() for t in params]
        y32 = ref.lora_linear(p32[0], W.float(), None, p32[1], p32[2], layer.scaling, dropout, seed)
        base = ref.lora_linear(x, W, None, layer.lora_A.weight.to(torch.bfloat16), layer.lora_B.weight.to(
            torch.bfloat16), layer.scaling, dropout, seed)
        assert_within(y, y32, base, 1e-2, f"{backend} y")
        g = torch.randn_like(y32)
        for name, got, want, b in zip("xAB", grads(y, params, g.bfloat16()), grads(y32, p32, g),
                                      grads(base, params, g.bfloat16())):
            assert_within(got, want, b, 1e-2, f"{backend} grad {name}")


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_over_nf4_at_a_llama_shape(mora_type):
    layer4 = cuda_linear4bit(4096, 4096, torch.bfloat16)
    from bitsandbytes.functional import dequantize_4bit

    W = dequantize_4bit(layer4.weight.data, layer4.weight.quant_state).to(torch.bfloat16)
    for backend in _backends("mora"):
        layer = fp.MoRALinear(layer4, r=16, mora_type=mora_type, backend=backend)
        with torch.no_grad():
            layer.M.normal_(std=0.02)
        x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        p32 = [t.detach().float().requires_grad_() for t in (x, layer.M)]
        y32 = ref.mora_linear(p32[0], W.float(), None, p32[1], mora_type)
        base = ref.mora_linear(x, W, None, layer.M.to(torch.bfloat16), mora_type)
        assert_within(y, y32, base, 1e-2, f"{backend} y")
        g = torch.randn_like(y32)
        for name, got, want, b in zip(("x", "M"), grads(y, [x, layer.M], g.bfloat16()), grads(y32, p32, g),
                                      grads(base, [x, layer.M], g.bfloat16())):
            assert_within(got, want, b, 1e-2, f"{backend} grad {name}")
