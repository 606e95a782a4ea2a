"""Masked / weighted cross-entropy (docs/contract.md §4): functionals and their nn.Module forms.

Labels are aligned with the rows (no shifting inside). The loss is float32 whatever the input
dtype. w_t = 0 on ignore_index, else 1 x instruction_weight where instruction_mask is True x
token_weights[t]; "mean" divides by sum_t w_t (or num_items_in_batch) and is 0.0 when that is 0.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fusedpeft.backends import check_backend_name
from fusedpeft.fused._checks import (
    check_labels,
    check_loss_options,
    check_normalize,
    check_positive_int,
    check_row_tensor,
    check_same_device,
    check_tensor,
)
from fusedpeft.ops._common import autocast_dtype, cast_for_autocast
from fusedpeft.ops.cross_entropy import cross_entropy
from fusedpeft.ops.cross_entropy import linear_cross_entropy as linear_cross_entropy_op


def _check_weighting(where, labels, instruction_mask, token_weights, options, normalize, sequence_ids) -> None:
    check_loss_options(where, **options)
    check_normalize(where, normalize, sequence_ids, labels)
    if instruction_mask is None and options["instruction_weight"] != 0.0:
        warnings.warn(f"{where}: instruction_weight={options['instruction_weight']!r} has no effect without an "
                      f"instruction_mask (True on prompt tokens); pass instruction_mask, e.g. from "
                      f"fusedpeft.InstructionCollator", UserWarning, stacklevel=3)
    if instruction_mask is not None:
        check_row_tensor(where, "instruction_mask", instruction_mask, labels, weights=False)
    if token_weights is not None:
        check_row_tensor(where, "token_weights", token_weights, labels, weights=True)


def masked_cross_entropy(logits, labels, *, instruction_mask=None, instruction_weight=0.0, token_weights=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         num_items_in_batch=None, normalize="token", sequence_ids=None,
                         backend=None) -> torch.Tensor:
    """Cross-entropy from logits [..., V] (any float dtype) and labels [...] (int).

    instruction_mask [...] bool, token_weights [...] float >= 0, num_items_in_batch int or 0-dim
    tensor (never read on the host). normalize "token" (sum w l / sum w) or "sequence" (each
    sequence's weighted mean, then the mean over sequences with sum w > 0; num_items_in_batch is
    then a number of sequences); sequence_ids [...] ints in [0, labels.numel()) name the sequences
    (default: each row of labels [..., T]). Returns a float32 scalar, or float32 [...] for "none".
    """
    where = "fusedpeft.masked_cross_entropy"
    check_tensor(where, "logits", logits, floating=True)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{where}: logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                   instruction_weight=instruction_weight, num_items_in_batch=num_items_in_batch,
                   ignore_index=ignore_index)
    check_labels(where, labels, logits.shape[-1], logits.shape[:-1], "logits.shape[:-1]", ignore_index, logits.device)
    _check_weighting(where, labels, instruction_mask, token_weights, options, normalize, sequence_ids)
    check_backend_name(backend)
    return cross_entropy(logits, labels, instruction_mask=instruction_mask, instruction_weight=instruction_weight,
                         token_weights=token_weights, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                         num_items_in_batch=num_items_in_batch, normalize=normalize, sequence_ids=sequence_ids,
                         backend=backend)


def check_linear_head(where: str, hidden, weight, bias) -> None:
    """hidden [..., H], weight [V, H] and bias [V] | None: float tensors on one device, one dtype
    (or any under torch.autocast, which casts them to its dtype)."""
    check_tensor(where, "hidden", hidden, floating=True)
    check_tensor(where, "weight", weight, floating=True)
    if weight.dim() != 2 or hidden.dim() == 0 or weight.shape[1] != hidden.shape[-1] or 0 in weight.shape:
        raise ValueError(f"{where}: weight must be [V, H] with H = hidden.shape[-1] and V, H >= 1; got weight shape "
                         f"{tuple(weight.shape)} and hidden shape {tuple(hidden.shape)}")
    check_same_device(where, "weight", weight, "hidden", hidden)
    cast = autocast_dtype(hidden.device.type)
    if cast is None and weight.dtype != hidden.dtype:
        raise TypeError(f"{where}: hidden has dtype {hidden.dtype} but weight has dtype {weight.dtype}; they must "
                        f"match (or run under torch.autocast)")
    if bias is not None:
        check_tensor(where, "bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{where}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_same_device(where, "bias", bias, "hidden", hidden)
        if cast is None and bias.dtype != hidden.dtype:
            raise TypeError(f"{where}: bias has dtype {bias.dtype} but hidden has dtype {hidden.dtype}")


def linear_cross_entropy(hidden, weight, labels, bias=None, *, instruction_mask=None, instruction_weight=0.0,
                         token_weights=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None, num_items_in_batch=None, normalize="token", sequence_ids=None,
                         chunk_budget_bytes=None, backend=None) -> torch.Tensor:
    """masked_cross_entropy(hidden @ weight^T + bias, labels) without materialising the logits.

    hidden [..., H], weight [V, H] and bias [V] share one float dtype and device (under autocast
    all three are cast to the autocast dtype, as an nn.Linear head would be); labels [...].
    At most ``chunk_budget_bytes`` of chunk logits (and their fp32 temporaries) are alive at once
    (None: ops.cross_entropy.auto_chunk_budget, torch's aspect-ratio chunk less this op's row
    vectors, which keeps the peak at or below torch's chunked F.linear_cross_entropy); rows with
    weight 0 cost no matmul. normalize / sequence_ids as in masked_cross_entropy. Returns a
    float32 scalar, or float32 [...] for "none".
    """
    where = "fusedpeft.linear_cross_entropy"
    check_linear_head(where, hidden, weight, bias)
    if chunk_budget_bytes is not None:
        check_positive_int(where, "chunk_budget_bytes", chunk_budget_bytes)
    options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                   instruction_weight=instruction_weight, num_items_in_batch=num_items_in_batch,
                   ignore_index=ignore_index)
    check_labels(where, labels, weight.shape[0], hidden.shape[:-1], "hidden.shape[:-1]", ignore_index, hidden.device)
    _check_weighting(where, labels, instruction_mask, token_weights, options, normalize, sequence_ids)
    check_backend_name(backend)
    hidden, weight, bias = cast_for_autocast(hidden, weight, bias)
    return linear_cross_entropy_op(hidden, weight, labels, bias, instruction_mask=instruction_mask,
                                   instruction_weight=instruction_weight, token_weights=token_weights,
                                   ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                   z_loss=z_loss, softcap=softcap, num_items_in_batch=num_items_in_batch,
                                   normalize=normalize, sequence_ids=sequence_ids,
                                   chunk_budget_bytes=chunk_budget_bytes, backend=backend)


class MaskedCrossEntropyLoss(nn.Module):
    """nn.Module form of masked_cross_entropy; the keywords are attributes.

    forward(logits [..., V], labels [...], instruction_mask=None, token_weights=None,
    num_items_in_batch=None, sequence_ids=None) -> float32 loss.
    """

    def __init__(self, *, instruction_weight=0.0, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, normalize="token", backend=None):
        super().__init__()
        where = f"fusedpeft.{type(self).__name__}"
        check_loss_options(where, reduction=reduction, label_smoothing=label_smoothing,
                           z_loss=z_loss, softcap=softcap, instruction_weight=instruction_weight,
                           num_items_in_batch=None, ignore_index=ignore_index)
        check_normalize(where, normalize, None, torch.empty(0))
        check_backend_name(backend)
        self.instruction_weight, self.ignore_index, self.reduction = instruction_weight, ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap, self.backend = label_smoothing, z_loss, softcap, backend
        self.normalize = normalize

    def _keywords(self) -> dict:
        return dict(instruction_weight=self.instruction_weight, ignore_index=self.ignore_index,
                    reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                    softcap=self.softcap, normalize=self.normalize, backend=self.backend)

    def forward(self, logits, labels, instruction_mask=None, token_weights=None, num_items_in_batch=None,
                sequence_ids=None):
        return masked_cross_entropy(logits, labels, instruction_mask=instruction_mask, token_weights=token_weights,
                                    num_items_in_batch=num_items_in_batch, sequence_ids=sequence_ids,
                                    **self._keywords())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._keywords().items())


class LinearCrossEntropyLoss(MaskedCrossEntropyLoss):
    """nn.Module form of linear_cross_entropy (an LM head fused with the loss).

    forward(hidden [..., H], weight [V, H], labels [...], bias=None, instruction_mask=None,
    token_weights=None, num_items_in_batch=None, sequence_ids=None) -> float32 loss.
    """

    def __init__(self, *, chunk_budget_bytes=None, **keywords):
        super().__init__(**keywords)
        if chunk_budget_bytes is not None:
            check_positive_int(f"fusedpeft.{type(self).__name__}", "chunk_budget_bytes", chunk_budget_bytes)
        self.chunk_budget_bytes = chunk_budget_bytes

    def _keywords(self) -> dict:
        return {**super()._keywords(), "chunk_budget_bytes": self.chunk_budget_bytes}

    def forward(self, hidden, weight, labels, bias=None, instruction_mask=None, token_weights=None,
                num_items_in_batch=None, sequence_ids=None):
        return linear_cross_entropy(hidden, weight, labels, bias, instruction_mask=instruction_mask,
                                    token_weights=token_weights, num_items_in_batch=num_items_in_batch,
                                    sequence_ids=sequence_ids, **self._keywords())
