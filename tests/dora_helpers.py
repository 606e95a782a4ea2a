"""Shared by the DoRA tests: the adapter parameters of ours and PEFT's layer, and the comparison
of an output and every gradient (x, lora_A, lora_B, the magnitude) against PEFT's."""

from __future__ import annotations

import torch


def fused_params(fused):
    return fused.lora_A.weight, fused.lora_B.weight, fused.lora_magnitude_vector


def peft_params(layer):
    return (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight)


def check_output_and_grads(y_f, y_p, x_f, x_p, fused, layer, close) -> None:
    """Ours (y_f from x_f, layer ``fused``) vs PEFT's (y_p from x_p, ``layer``): close(actual,
    expected) on the output, then on grad x, A, B and the magnitude for one random grad_output."""
    close(y_f, y_p)
    g = torch.randn_like(y_p)
    y_p.backward(g)
    y_f.backward(g)
    close(x_f.grad, x_p.grad)
    for mine, theirs in zip(fused_params(fused), peft_params(layer)):
        close(mine.grad, theirs.grad)
