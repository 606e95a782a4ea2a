"""Quantized base layers: which ones fusedpeft adapts, and how their weight W is obtained.

The one place that knows quantized formats; every backend and the layers use it.

Supported bases (bitsandbytes):
- ``bnb.nn.Linear4bit`` (NF4 or FP4, with or without double quantization of the block scales,
  any blocksize bitsandbytes supports): W [out, in] is exactly what
  ``bitsandbytes.functional.dequantize_4bit(weight, quant_state)`` returns (in quant_state.dtype),
  cast to the compute dtype, as bitsandbytes' own ``matmul_4bit`` does. It is dequantized for the
  forward and again for the backward (never kept in between): at most one dequantized weight
  exists per layer call, transiently.
- ``bnb.nn.Linear8bitLt`` (LLM.int8): the base output is bitsandbytes' own layer output (outlier
  threshold included), computed by the layer; the fused op computes the adapter path only.

Storage of a 4-bit weight (what a backend's dequantization kernel reads): ``packed`` uint8, two
codes per byte, element 2i in the high nibble, element 2i + 1 in the low nibble, in row-major
order of W; ``absmax`` one fp32 scale per ``blocksize`` consecutive elements, or, with double
quantization (``nested``), one uint8 code per block, decoded as
``code2[absmax[b]] * absmax2[b // blocksize2] + offset`` (fp32, that order of operations);
W[e] = round_to(storage_dtype, CODE[quant_type][code(e)] * absmax[e // blocksize]).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

SUPPORTED = ("torch.nn.Linear, bitsandbytes.nn.Linear4bit (NF4/FP4, double quantization on or off) and "
             "bitsandbytes.nn.Linear8bitLt")
# The 16-entry 4-bit code books (bitsandbytes.functional.get_4bit_type / backends.utils._get_4bit_code)
QUANT_TYPES = ("nf4", "fp4")


def _bnb():
    """The bitsandbytes module when it has been imported (a bitsandbytes layer cannot exist
    otherwise), else None: fusedpeft never imports bitsandbytes itself just to check."""
    return sys.modules.get("bitsandbytes")


def is_bnb_4bit(module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_8bit(module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized(module) -> bool:
    """True for a supported quantized base layer (bitsandbytes 4-bit or 8-bit)."""
    return is_bnb_4bit(module) or is_bnb_8bit(module)


def _looks_quantized(module) -> str | None:
    """Why ``module`` looks like a quantized linear layer fusedpeft does not support (None if it does not)."""
    for attr in ("qweight", "W_q", "qzeros", "scales"):
        if isinstance(getattr(module, attr, None), torch.Tensor):
            return f"it holds a quantized tensor {attr!r}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        data = weight.data if isinstance(weight, nn.Parameter) else weight
        # torch's own subclasses (DTensor shards, fake tensors) are not quantized formats
        if type(data) is not torch.Tensor and not type(data).__module__.startswith("torch."):
            return f"its weight is a {type(data).__name__} tensor subclass"
        if not weight.is_floating_point():
            return f"its weight has dtype {weight.dtype}"
    return None


def check_base(where: str, base) -> None:
    """TypeError unless ``base`` is a plain nn.Linear with a floating weight or a supported,
    quantized bitsandbytes layer; ValueError for a bitsandbytes 4-bit layer never quantized."""
    if is_bnb_4bit(base):
        _check_4bit_ready(where, base)
        return
    if is_bnb_8bit(base):
        return
    reason = _looks_quantized(base)
    if reason is not None:
        raise TypeError(f"{where}: base {type(base).__name__} looks like a quantized layer ({reason}), which "
                        f"fusedpeft does not support; supported bases: {SUPPORTED}. Dequantize it to an nn.Linear "
                        f"first, or quantize with bitsandbytes")
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{where}: base must be a torch.nn.Linear, got {type(base).__name__} (supported bases: "
                        f"{SUPPORTED})")


def quant_state_of(module: nn.Module):
    """A Linear4bit's QuantState: its weight's, else the copy the layer keeps (FSDP2 hands the layer a
    plain Parameter in place of bitsandbytes' Params4bit, which bitsandbytes itself reads it from)."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _check_4bit_ready(where: str, base) -> None:
    weight = base.weight
    quantized = getattr(weight, "bnb_quantized", False) or not weight.is_floating_point() \
        or getattr(base, "quant_state", None) is not None
    if weight.device.type == "meta" or not quantized or quant_state_of(base) is None:
        raise ValueError(f"{where}: the bitsandbytes Linear4bit's weight was never quantized (dtype {weight.dtype}, "
                         f"device {weight.device}); bitsandbytes quantizes it when the layer is moved to a device: "
                         f"call base.to('cuda') or base.to('cpu') (or load the model with BitsAndBytesConfig) first")
    storage = getattr(base, "quant_storage", None)
    if storage is not None and weight.dtype != storage:
        raise TypeError(f"{where}: the bitsandbytes Linear4bit's packed weight has dtype {weight.dtype} but was stored "
                        f"as {storage}: something cast the packed 4-bit codes (typically FSDP2's MixedPrecisionPolicy("
                        f"param_dtype={weight.dtype}) casting every parameter), which destroys them. Load the model with "
                        f"BitsAndBytesConfig(bnb_4bit_quant_storage={weight.dtype}) (the storage dtype equal to the "
                        f"parameter dtype), so that the cast changes nothing")


@dataclass(frozen=True)
class QuantizedWeight:
    """The frozen weight [out, in] of a quantized base layer, seen in the compute dtype ``dtype``.

    ``kind`` is "4bit" (W = dequantize(), see the module docstring) or "8bit" (the base product is
    the layer's own output). ``shape``, ``device`` and ``dtype`` stand in for a dense weight's.
    """

    module: nn.Module
    kind: str
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.module.out_features, self.module.in_features))

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def to(self, dtype: torch.dtype) -> QuantizedWeight:
        """The same weight seen in another compute dtype (used under torch.autocast)."""
        return self if dtype == self.dtype else replace(self, dtype=dtype)

    @property
    def quant_state(self):
        return quant_state_of(self.module)

    @property
    def packed(self) -> torch.Tensor:
        """uint8 [(out * in + 1) // 2]: two 4-bit codes per byte (4-bit only)."""
        data = self.module.weight.data
        return (data if data.dtype == torch.uint8 else data.view(torch.uint8)).reshape(-1)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] in ``dtype`` (default the compute dtype) by bitsandbytes' own dequantization."""
        if self.kind != "4bit":
            raise TypeError("QuantizedWeight.dequantize: an 8-bit base's output is the layer's own; it has no "
                            "dequantized weight in fusedpeft's path")
        from bitsandbytes.functional import dequantize_4bit

        w = dequantize_4bit(self.packed, self.quant_state)
        return w.to(dtype or self.dtype)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized base computes in: Linear4bit's compute_dtype (else the dtype it was
    quantized from); float32 for Linear8bitLt (its int8 kernels take any float input)."""
    if is_bnb_4bit(module):
        return module.compute_dtype or quant_state_of(module).dtype
    return torch.float32


def quantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> QuantizedWeight | None:
    """The QuantizedWeight of a supported quantized layer (None for a plain nn.Linear), in ``dtype``
    (default: the layer's compute dtype)."""
    if is_bnb_4bit(module):
        _standard_layout_(module)
        return QuantizedWeight(module, "4bit", dtype or compute_dtype(module))
    if is_bnb_8bit(module):
        return QuantizedWeight(module, "8bit", dtype or compute_dtype(module))
    return None


def _standard_layout_(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight (done by its own eval-mode forward on
    AVX512-BF16 CPUs, a different byte order and scale layout), as bitsandbytes itself does before
    moving or saving the weight, so the weight is in the layout of the module docstring again."""
    weight = module.weight
    if not getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def dense_weight(weight, dtype: torch.dtype, dequantize_4bit=None) -> torch.Tensor | None:
    """The matrix a backend multiplies by, [out, in] in ``dtype``.

    A plain tensor is returned as is. A 4-bit QuantizedWeight is dequantized by
    ``dequantize_4bit(weight) -> W in quant_state.dtype`` when given (a backend's own kernel, which
    must equal bitsandbytes' bit for bit), else by bitsandbytes. None for an 8-bit weight: its base
    product is the layer's own output, added by the layer.
    """
    if isinstance(weight, torch.Tensor):
        return weight
    if weight.kind == "8bit":
        return None
    if dequantize_4bit is None:
        return weight.dequantize(dtype)
    return dequantize_4bit(weight).to(dtype)


def nested_absmax(q: QuantizedWeight) -> tuple[torch.Tensor | None, torch.Tensor | None, int, float]:
    """(code2 [256] fp32, absmax2 [blocks2] fp32, blocksize2, offset) of a double-quantized 4-bit
    weight; (None, None, 0, 0.0) without double quantization."""
    state = q.quant_state
    if not state.nested:
        return None, None, 0, 0.0
    return state.state2.code, state.state2.absmax, int(state.state2.blocksize), float(state.offset)


def row_blocks(weight, dtype: torch.dtype, max_elements: int = 1 << 20):
    """Yields (rows, W[rows]) for consecutive row slices of a base weight [out, in], each block
    [len(rows), in] in ``dtype`` and of about ``max_elements`` elements, so that no full-size copy
    of W in ``dtype`` ever exists. ``weight`` is a tensor or a QuantizedWeight: a 4-bit block is
    bitsandbytes' own dequantization (in quant_state.dtype, then cast; whole rows of whole
    quantization blocks, so each equals the same rows of the whole dequantized W bit for bit); an
    8-bit block is int8 rows times their scales, in fp32 (bitsandbytes' int8_vectorwise_dequant,
    what PEFT's DoRA norm reads), then cast."""
    out_features, in_features = weight.shape
    step = 1
    if isinstance(weight, QuantizedWeight) and weight.kind == "4bit":
        state = weight.quant_state
        # whole rows of whole blocks; when blocks span rows, one block of all rows (bitsandbytes' CPU
        # kernels for 16-bit output give other values for a part of such a weight than for the whole)
        step = 1 if in_features % int(state.blocksize) == 0 else out_features
        absmax = state.absmax
        if state.nested:  # as bitsandbytes.functional.dequantize_4bit decodes them
            from bitsandbytes.functional import dequantize_blockwise

            absmax = dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        absmax = absmax.float()
        packed = weight.packed
    elif isinstance(weight, QuantizedWeight):
        module = weight.module
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    step *= max(1, max_elements // max(1, step * in_features))
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        if isinstance(weight, torch.Tensor):
            block = weight[rows].detach()
        elif weight.kind == "4bit":
            first, count = start * in_features, (rows.stop - start) * in_features
            block = torch.ops.bitsandbytes.dequantize_4bit.default(
                packed[first // 2: (first + count + 1) // 2],
                absmax[first // int(state.blocksize): -(-(first + count) // int(state.blocksize))],
                int(state.blocksize), state.quant_type, (rows.stop - start, in_features), state.dtype)
        else:
            from bitsandbytes.functional import int8_vectorwise_dequant

            block = int8_vectorwise_dequant(module.weight.data[rows], scales[rows])
        yield rows, block.to(dtype)


# ----------------------------------------------------------------------------- merging


def float_weight_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a quantized weight is merged in: the dtype a 4-bit weight was quantized
    from (quant_state.dtype), float16 for 8-bit (bitsandbytes' own int8 dtype pairing)."""
    return quant_state_of(module).dtype if is_bnb_4bit(module) else torch.float16


@torch.no_grad()
def dequantized_module_weight(module: nn.Module) -> torch.Tensor:
    """W [out, in] of a quantized layer in float_weight_dtype(module): bitsandbytes' dequantize_4bit,
    or for 8-bit the int8 rows times their scales / 127 (bitsandbytes' int8_vectorwise_dequant)."""
    if is_bnb_4bit(module):
        return quantized_weight(module).dequantize(float_weight_dtype(module))
    from bitsandbytes.functional import int8_vectorwise_dequant

    # bitsandbytes moves the row scales from the weight to the layer's state on its first forward
    scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return int8_vectorwise_dequant(module.weight.data, scales).to(float_weight_dtype(module))


@torch.no_grad()
def requantize_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace a quantized layer's weight by ``weight`` [out, in] quantized with the layer's own
    settings (4-bit: quant_type, blocksize, double quantization, storage dtype; 8-bit: int8 rows).
    Rounds to the quantization grid: the result is not exactly ``weight``."""
    bnb = _bnb()
    device = module.weight.device
    if is_bnb_4bit(module):
        old = module.weight
        module.weight = bnb.nn.Params4bit(
            weight.to("cpu"), requires_grad=False, quant_type=old.quant_type, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_storage=old.quant_storage, module=module).to(device)
    else:
        module.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        module.state.CB, module.state.SCB = None, None


@torch.no_grad()
def dense_linear(module: nn.Module, delta: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear holding a quantized layer's dequantized weight (+ delta) in float_weight_dtype
    and its bias; nothing is re-quantized, so no rounding beyond the weight's quantization."""
    weight = dequantized_module_weight(module)
    if delta is not None:
        weight += delta.to(weight.dtype)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear
