"""LoRALinear / MoRALinear over bitsandbytes 4-bit and 8-bit bases, on every backend
that takes them here, against fusedpeft.reference with the bitsandbytes-dequantized weight."""

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft.fused.lora_grouped import lora_group_forward
from fusedpeft import reference as ref
from helpers import assert_within, grads, runnable
from qlora_helpers import bnb, dequantized, linear4bit, linear8bit

BACKENDS = runnable("lora")  # torch, cpu and triton (under the interpreter: tests/conftest.py)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def run_with_seed(layer, x):
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    return y, int(ref.new_dropout_seed())


def adapter_params(layer):
    if isinstance(layer, fp.LoRALinear):
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        return [layer.lora_A.weight, layer.lora_B.weight]
    with torch.no_grad():
        layer.M.normal_(std=0.3)
    return [layer.M]


def reference(layer, x, W, params, p, seed):
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.to(x.dtype)
    if isinstance(layer, fp.LoRALinear):
        return ref.lora_linear(x, W, bias, *params, layer.scaling, p, seed)
    return ref.mora_linear(x, W, bias, *params, layer.mora_type, p, seed)


def check_against_reference(layer, x, p):
    """Forward and every gradient vs float64 with bitsandbytes' W, within 2x the same-dtype error."""
    dtype = x.dtype
    params = adapter_params(layer)
    W = dequantized(layer.base_layer)
    y, seed = run_with_seed(layer, x)
    assert y.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    p64 = [t.detach().double().requires_grad_() for t in params]
    y64 = reference(layer, x64, W.double(), p64, p, seed)
    base = reference(layer, x, W, [t.to(dtype) for t in params], p, seed)
    assert_within(y, y64, base, ATOL[dtype], "y")
    g = torch.randn_like(y64)
    for name, got, want, b in zip(["x"] + [f"param{i}" for i in range(len(params))],
                                  grads(y, [x] + params, g.to(dtype)), grads(y64, [x64] + p64, g),
                                  grads(base, [x] + params, g.to(dtype))):
        assert_within(got, want, b, ATOL[dtype], f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
# in_features a multiple of the blocksize: bitsandbytes 0.50.2's CPU dequantize_4bit misplaces the
# block scales otherwise (see test_dequant_4bit.py), and it is the reference here
@pytest.mark.parametrize("lead,k,d,r,blocksize", [((7,), 128, 33, 4, 64), ((2, 3), 128, 96, 8, 128)])
def test_lora_4bit_matches_reference(backend, quant_type, double_quant, dtype, dropout, lead, k, d, r, blocksize):
    base = linear4bit(k, d, dtype, quant_type, double_quant, blocksize)
    layer = fp.LoRALinear(base, r=r, alpha=2 * r, dropout=dropout, backend=backend)
    assert layer.lora_A.weight.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    check_against_reference(layer, torch.randn(*lead, k, dtype=dtype, requires_grad=True), dropout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_4bit_matches_reference(backend, quant_type, double_quant, dtype, dropout, mora_type):
    base = linear4bit(192, 33, dtype, quant_type, double_quant)
    layer = fp.MoRALinear(base, r=4, mora_type=mora_type, dropout=dropout, backend=backend)
    # 80 rows: above the torch path's "merged" threshold, which a quantized base must not take
    check_against_reference(layer, torch.randn(80, 192, dtype=dtype, requires_grad=True), dropout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["lora", "mora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fp16_compute_dtype(backend, cls, dropout):
    """float16 compute (under the Triton interpreter bf16 runs in fp32, fp16 does not)."""
    base = linear4bit(128, 40, torch.float16, "nf4", True)
    layer = fp.LoRALinear(base, r=4, dropout=dropout, backend=backend) if cls == "lora" else \
        fp.MoRALinear(base, r=4, mora_type=6, dropout=dropout, backend=backend)
    check_against_reference(layer, torch.randn(3, 7, 128, dtype=torch.float16, requires_grad=True), dropout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtype_other_than_compute_dtype(backend):
    """As bitsandbytes: x cast to the compute dtype, the output cast back to x's dtype."""
    base = linear4bit(64, 32, torch.bfloat16)
    layer = fp.LoRALinear(base, r=4, backend=backend)
    adapter_params(layer)
    x = torch.randn(5, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    xb = x.to(torch.bfloat16)
    want = base(xb).float() + layer.scaling * (xb.float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["lora", "mora"])
def test_dequantized_weight_is_not_saved_for_backward(backend, cls):
    """Nothing of the base weight's size is kept between forward and backward."""
    base = linear4bit(64, 48)
    layer = fp.LoRALinear(base, r=4, backend=backend) if cls == "lora" else fp.MoRALinear(base, r=4, backend=backend)
    adapter_params(layer)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(80, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved and (48, 64) not in saved and all(s[0] * (s[1] if len(s) > 1 else 1) < 48 * 64 for s in saved
                                                   if s != (80, 64))
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["lora", "mora"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_8bit_base_output_is_bitsandbytes_own(backend, cls, dropout):
    base = linear8bit(64, 40)
    layer = fp.LoRALinear(base, r=4, dropout=dropout, backend=backend) if cls == "lora" else \
        fp.MoRALinear(base, r=4, mora_type=6, dropout=dropout, backend=backend)
    params = adapter_params(layer)
    assert all(t.dtype == torch.float32 for t in params)
    x = torch.randn(9, 64, dtype=torch.float16, requires_grad=True)
    if backend == "triton" and cls == "mora":  # its GEMMs fuse the branch into the base product
        with pytest.raises(TypeError, match="8-bit .* not supported by the Triton MoRA kernels"):
            layer(x)
        return
    y, seed = run_with_seed(layer, x)
    assert y.dtype == torch.float16
    x_ref = x.detach().clone().requires_grad_()
    base_out = base(x_ref)
    x32 = x_ref.float().reshape(-1, 64)
    adapter = (ref.lora_linear(x32, torch.zeros(40, 64), None, *params, layer.scaling, dropout, seed)
               if cls == "lora" else ref.mora_linear(x32, torch.zeros(40, 64), None, *params, 6, dropout, seed))
    want = base_out + adapter.to(base_out.dtype)
    torch.testing.assert_close(y, want, rtol=2e-3, atol=2e-3)
    g = torch.randn_like(y)
    for got, exp in zip(grads(y, [x] + params, g), grads(want, [x_ref] + params, g)):
        torch.testing.assert_close(got.float(), exp.float(), rtol=2e-3, atol=2e-3)


def test_never_quantized_4bit_base_is_an_error():
    base = bnb.nn.Linear4bit(64, 32)  # weight still float, not moved to a device
    with pytest.raises(ValueError, match="never quantized.*to\\('cuda'\\)"):
        fp.LoRALinear(base)
    with pytest.raises(ValueError, match="never quantized"):
        fp.MoRALinear(base)


class _GPTQLike(nn.Module):
    """Stand-in for GPTQ / AWQ layers (packed int32 qweight, scales, qzeros)."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 64, 32
        self.register_buffer("qweight", torch.zeros(8, 32, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, 32))


class _HQQLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.W_q = torch.zeros(32, 32, dtype=torch.uint8)


@pytest.mark.parametrize("make,what", [
    (_GPTQLike, "quantized tensor 'qweight'"),
    (_HQQLike, "quantized tensor 'W_q'"),
    (lambda: _int_linear(), "weight has dtype torch.int8"),
])
def test_unsupported_quantized_layer_is_a_type_error(make, what):
    with pytest.raises(TypeError, match=f"looks like a quantized layer \\(.*{what}\\).*Linear4bit"):
        fp.LoRALinear(make())


def _int_linear():
    """An nn.Linear whose weight was replaced by an int8 tensor (torchao-style weight-only int8)."""
    layer = nn.Linear(64, 32)
    layer.weight = nn.Parameter(torch.zeros(32, 64, dtype=torch.int8), requires_grad=False)
    return layer


def test_wrong_input_width_on_quantized_base():
    layer = fp.LoRALinear(linear4bit(64, 32), r=4)
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(3, 63))


def test_quantized_layers_are_not_grouped():
    layers = [fp.LoRALinear(linear4bit(64, 32), r=4) for _ in range(2)]
    with pytest.raises(ValueError, match="quantized base.*on its own"):
        lora_group_forward(layers, torch.randn(3, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_repacked_by_bitsandbytes_cpu_inference(backend):
    """bitsandbytes' eval-mode forward may repack the weight for its AVX512-BF16 CPU kernel; the
    layer restores the standard layout and computes with the same W."""
    base = linear4bit(128, 64, torch.bfloat16, "nf4", True)
    W = dequantized(base)
    base.eval()
    with torch.no_grad():
        base(torch.randn(2, 128, dtype=torch.bfloat16))  # may repack (depends on the CPU)
    layer = fp.LoRALinear(base, r=4, backend=backend)
    adapter_params(layer)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = layer(x)
    want = ref.lora_linear(x.double(), W.double(), base.bias.double(), layer.lora_A.weight.double(),
                           layer.lora_B.weight.double(), layer.scaling)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dequantized(base), W)


def test_torch_compile_of_a_4bit_layer():
    """torch.compile traces around the quantized path (it runs the op's eager autograd.Function)."""
    layer = fp.LoRALinear(linear4bit(128, 32), r=4, backend="cpu")
    adapter_params(layer)
    x = torch.randn(5, 128, requires_grad=True)
    y = torch.compile(layer)(x)
    y.sum().backward()
    x2 = x.detach().requires_grad_()
    want = layer(x2)
    want.sum().backward()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(x.grad, x2.grad)


def test_automatic_backend_skips_triton_mora_for_an_8bit_base(monkeypatch):
    """Where Triton would be the automatic choice (a GPU), MoRA over an 8-bit base takes the next
    backend instead of the TypeError a forced backend='triton' gives."""
    from fusedpeft import backends

    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    monkeypatch.delenv("FUSEDPEFT_BACKEND", raising=False)
    layer = fp.MoRALinear(linear8bit(64, 40), r=4)
    adapter_params(layer)
    x = torch.randn(9, 64, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert x.grad is not None and layer.M.grad is not None


class _TorchaoLike(torch.Tensor):
    """Stand-in for a torchao quantized tensor subclass (NF4Tensor, AffineQuantizedTensor)."""

    __module__ = "torchao.dtypes.fake"


def test_tensor_subclass_weight_is_a_type_error_but_dtensor_is_not():
    layer = nn.Linear(64, 32)
    layer.weight = nn.Parameter(torch.randn(32, 64).as_subclass(_TorchaoLike), requires_grad=False)
    with pytest.raises(TypeError, match="_TorchaoLike tensor subclass.*Linear4bit"):
        fp.LoRALinear(layer)
    import torch.distributed as dist

    if not dist.is_available():
        return
    from torch.distributed.tensor import DTensor

    assert DTensor.__module__.startswith("torch.")  # what the exemption relies on
