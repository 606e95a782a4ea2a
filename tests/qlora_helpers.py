"""Quantized bitsandbytes base layers for the QLoRA tests (bitsandbytes quantizes on .to("cpu"))."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")


def linear4bit(k: int, d: int, dtype=torch.float32, quant_type="nf4", double_quant=False, blocksize=64,
               bias=True, storage_dtype=None) -> "bnb.nn.Linear4bit":
    """A Linear4bit k -> d quantized on CPU from a random weight in storage_dtype (default: dtype)."""
    layer = bnb.nn.Linear4bit(k, d, bias=bias, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=double_quant)
    layer.weight.data = layer.weight.data.to(storage_dtype or dtype)
    layer.weight.blocksize = blocksize
    if bias:
        layer.bias.data = layer.bias.data.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer.to("cpu")


def linear8bit(k: int, d: int, bias=True, threshold=6.0) -> "bnb.nn.Linear8bitLt":
    layer = bnb.nn.Linear8bitLt(k, d, bias=bias, has_fp16_weights=False, threshold=threshold)
    return layer.to("cpu")


def dequantized(layer) -> torch.Tensor:
    """W [out, in] as bitsandbytes dequantizes it, in the layer's compute dtype."""
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.compute_dtype)


class Tiny(nn.Module):
    """Two adapted projections of one input: q_proj's output plus v_proj's summed over features."""

    def __init__(self, q_proj, v_proj):
        super().__init__()
        self.q_proj, self.v_proj = q_proj, v_proj

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x).sum(-1, keepdim=True)
