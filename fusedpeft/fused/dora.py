"""DoRA's layer state for LoRALinear(use_dora=True): the magnitude, the cached ||W_i||^2, merge.

Kept apart from LoRALinear so that the LoRA layer only dispatches here when use_dora is set.
Shapes: W [D, K] (the base weight), A [r, K], B [D, r], m = lora_magnitude_vector [D].
"""

from __future__ import annotations

import torch
from torch import nn

from fusedpeft.core.dtypes import accumulation_dtype
from fusedpeft.core.lora import lora_delta_weight
from fusedpeft.ops.dora import weight_norm, weight_sq_norm
from fusedpeft.quantized import dequantized_module_weight, is_quantized, quantized_weight


def check_dora_base(where: str, base) -> None:
    """DoRA wraps an nn.Linear (bitsandbytes' 4-bit and 8-bit layers included): embeddings,
    convolutions and GPT-2's Conv1D (fan_in_fan_out, a transposed weight) get a TypeError naming
    what they are."""
    kind = type(base).__name__
    if isinstance(base, nn.Linear):
        return
    if isinstance(base, nn.Embedding):
        what = "an embedding (PEFT's DoRA on embeddings is not implemented by fusedpeft)"
    elif isinstance(base, nn.modules.conv._ConvNd):
        what = "a convolution (PEFT's DoRA on Conv layers is not implemented by fusedpeft)"
    elif kind == "Conv1D":
        what = "GPT-2's Conv1D, whose weight is stored transposed (fan_in_fan_out=True is not supported)"
    else:
        what = f"a {kind}"
    raise TypeError(f"{where}: use_dora=True needs base to be a torch.nn.Linear, got {what}")


class WeightNormCache:
    """||W_i||^2 [D] of one base weight, recomputed when the weight changes.

    The key is the weight's identity, storage, version counter (bumped by every in-place change:
    merge, ReMoRA-style folding, load_state_dict / copy_), dtype, device and shape; for a
    quantized weight (fusedpeft.quantized.QuantizedWeight) those of its packed tensor and the
    identity of its scales (a re-quantization replaces both). Not part of the state_dict. Under
    torch.compile it is bypassed (the value is computed in the graph)."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling():
            return None
        t, scales = weight, None
        if not isinstance(weight, torch.Tensor):
            t = weight.module.weight
            scales = (id(weight.quant_state),) if weight.kind == "4bit" else (id(t.SCB), id(weight.module.state.SCB))
        key = (id(t), t.data_ptr(), t._version, weight.dtype, weight.device, tuple(weight.shape), scales)
        if key != self.key:
            self.value = weight_sq_norm(weight)
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


def norm_weight(layer):
    """The base weight n is computed from: base_layer.weight, or a quantized base's QuantizedWeight."""
    base = layer.base_layer
    q = quantized_weight(base)
    return base.weight if q is None else q


def magnitude_init(layer) -> torch.Tensor:
    """The row norms of W + s B A [D] in the adapter dtype: PEFT's initial magnitude (= ||W_i|| while B is 0)."""
    w = norm_weight(layer)
    return weight_norm(w, layer.lora_A.weight, layer.lora_B.weight, layer.scaling).to(layer.lora_A.weight.dtype)


def dora_scale(layer) -> torch.Tensor:
    """g = m / n [D] in fp32 (fp64 for fp64), detached, from the current (unmerged) weights."""
    w = norm_weight(layer)
    n = weight_norm(w, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, layer._dora_cache.get(w))
    return layer.lora_magnitude_vector.detach().to(n.dtype) / n


def dora_delta_weight(layer) -> torch.Tensor:
    """ΔW = g (W + s B A) - W [D, K] in the base weight's dtype (computed in fp32 / fp64), so that
    base(x) + x ΔW^T == forward(x) with dropout off (a quantized base: W dequantized, ΔW in
    layer.base_weight_dtype)."""
    base = layer.base_layer
    w = dequantized_module_weight(base) if is_quantized(base) else base.weight.detach()
    wide = accumulation_dtype(w.dtype)
    g = dora_scale(layer).to(wide)
    target = g[:, None] * (w.to(wide) + lora_delta_weight(layer.lora_A.weight, layer.lora_B.weight,
                                                          layer.scaling).to(wide))
    return (target - w.to(wide)).to(layer.base_weight_dtype)


@torch.no_grad()
def dora_merge(layer) -> None:
    """W <- g (W + s B A) in place (in W's dtype), remembering g for unmerge (as PEFT caches n). A
    quantized base is re-quantized with W + ΔW (AdapterLinear.add_to_base_weight_: rounded, warns)."""
    w = layer.base_layer.weight
    g = dora_scale(layer)
    if is_quantized(layer.base_layer):
        layer.add_to_base_weight_(dora_delta_weight(layer))
        layer._dora_merge_scale = g
        layer._dora_cache.clear()
        return
    delta = lora_delta_weight(layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    w.copy_(((w.to(delta.dtype) + delta) * g.to(delta.dtype)[:, None]).to(w.dtype))
    layer._dora_merge_scale = g
    layer._dora_cache.clear()


@torch.no_grad()
def dora_unmerge(layer) -> None:
    """W <- W / g - s B A with the g of the merge: reverses dora_merge up to rounding."""
    w = layer.base_layer.weight
    delta = lora_delta_weight(layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    g = layer._dora_merge_scale
    if g is None:  # merged elsewhere (e.g. loaded merged): n is that of the unmerged weight, unknown here
        raise RuntimeError("LoRALinear.unmerge(): this DoRA layer was not merged by merge(), so the norm of its "
                           "unmerged weight is unknown; reload the unmerged base weight instead")
    if is_quantized(layer.base_layer):  # W / g - s B A, re-quantized
        merged = dequantized_module_weight(layer.base_layer).to(delta.dtype)
        layer.add_to_base_weight_(merged / g.to(delta.dtype)[:, None] - delta - merged)
    else:
        w.copy_((w.to(delta.dtype) / g.to(delta.dtype)[:, None] - delta).to(w.dtype))
    layer._dora_merge_scale = None
    layer._dora_cache.clear()
