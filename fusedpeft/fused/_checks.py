"""Input checks of the public entry points (docs/contract.md §6), run before any kernel.

Messages name the argument, what it got (shape, dtype, device, value) and what it needs. Value
checks that read tensor contents (label range, token weight signs) run on CPU tensors always and
on GPU tensors only with FUSEDPEFT_CHECKS=1, because there they cost a host synchronisation.
Inside torch.compile (a data-dependent branch cannot be traced) the same checks become
``torch._assert_async`` nodes in the graph: RuntimeError on CPU, a device-side assert on GPU
(which ends the CUDA context), under the same rule. Unchecked (GPU without FUSEDPEFT_CHECKS=1),
an out-of-range label gets weight 0 and is never read out of bounds.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from fusedpeft.reference import MORA_TYPES


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def content_checks_enabled(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("FUSEDPEFT_CHECKS", "0") == "1"


def _fail_where(bad: torch.Tensor, message) -> None:
    """Raise ValueError(message()) if any element of the bool tensor ``bad`` is True; inside
    torch.compile, a traced assert (RuntimeError / device assert) with the generic message."""
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message(None))
    elif bool(bad.any()):
        raise ValueError(message(bad))


# the float dtypes every backend computes in (float8 and other exotic floats are rejected up front)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(where: str, name: str, value, *, floating: bool = False, integer: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got "
                        f"{_describe(value)}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{where}: {name} must be an integer tensor (torch.long), got {_describe(value)}")


def check_same_device(where: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{where}: {name} is on {value.device} but {ref_name} is on {ref.device}; "
                         f"move them to the same device")


def check_probability(where: str, name: str, value, *, high_inclusive: bool = False) -> None:
    bound = "]" if high_inclusive else ")"
    ok = isinstance(value, numbers.Real) and 0.0 <= value and (value <= 1.0 if high_inclusive else value < 1.0)
    if not ok:
        raise ValueError(f"{where}: {name} must be a float in [0, 1{bound}, got {value!r}")


def check_non_negative(where: str, name: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")


def check_positive_int(where: str, name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")


def check_mora_type(where: str, name: str, value) -> None:
    """A MoRA type: an int (not a bool, not a float) in (1, 2, 3, 4, 6)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value not in MORA_TYPES:
        raise ValueError(f"{where}: {name} must be one of {MORA_TYPES}, got {value!r} (an int, not a bool or float)")


def check_linear_input(where: str, x, weight, any_dtype: bool = False) -> None:
    """x [..., in_features] for a layer whose base weight is [out_features, in_features] (a tensor,
    or anything with .shape / .device / .dtype); any_dtype: x may have any float dtype (a quantized
    base casts it to its compute dtype, as bitsandbytes does)."""
    check_tensor(where, "x", x, floating=True)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: x has {_describe(x)}, but its last dimension must equal the layer's "
                         f"in_features={weight.shape[1]}")
    check_same_device(where, "x", x, "the layer's weight", weight)
    if not any_dtype and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{where}: x has dtype {x.dtype} but the base layer's weight is {weight.dtype}; cast x "
                        f"(or the layer) to one dtype, or run under torch.autocast")


def check_loss_options(where: str, *, reduction, label_smoothing, z_loss, softcap, instruction_weight,
                       num_items_in_batch, ignore_index) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{where}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_probability(where, "label_smoothing", label_smoothing, high_inclusive=True)
    check_non_negative(where, "z_loss", z_loss)
    if isinstance(instruction_weight, bool) or not (isinstance(instruction_weight, numbers.Real)
                                                    and 0.0 <= instruction_weight <= 1.0):
        raise ValueError(f"{where}: instruction_weight must be a number in [0, 1] (0: prompt tokens masked, 1: "
                         f"weighted like the answer), got {instruction_weight!r}; for other per-token weights "
                         f"pass token_weights")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"{where}: softcap must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"{where}: ignore_index must be an int, got {ignore_index!r}")
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"{where}: num_items_in_batch replaces the 'mean' denominator, but reduction="
                         f"{reduction!r}; use reduction='mean' with it, or drop it")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise ValueError(f"{where}: num_items_in_batch must be a number or a one-element real tensor, got "
                             f"{_describe(num_items_in_batch)}")
        if content_checks_enabled(num_items_in_batch):
            n = num_items_in_batch.reshape(())
            _fail_where(~(n.isfinite() & (n >= 0)), lambda bad: f"{where}: num_items_in_batch must be >= 0 and "
                                                                f"finite, got {'a tensor' if bad is None else n}")
    elif not isinstance(num_items_in_batch, numbers.Real) or isinstance(num_items_in_batch, bool) \
            or not math.isfinite(num_items_in_batch) or num_items_in_batch < 0:
        raise ValueError(f"{where}: num_items_in_batch must be a number >= 0 or a tensor, got {num_items_in_batch!r}")


def check_labels(where: str, labels, vocab: int, expected_shape: tuple, expected_from: str, ignore_index: int,
                 device: torch.device) -> None:
    check_tensor(where, "labels", labels, integer=True)
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"{where}: labels has shape {tuple(labels.shape)} but must equal {expected_from} = "
                         f"{tuple(expected_shape)} (labels are aligned with the rows; nothing is shifted inside)")
    check_same_device(where, "labels", labels, "the logits/hidden states", torch.empty(0, device=device))
    if content_checks_enabled(labels) and labels.numel():
        def message(bad):
            if bad is None:
                return f"{where}: a label is outside [0, {vocab}) and is not ignore_index={ignore_index}"
            position = tuple(int(i) for i in bad.nonzero()[0])
            return (f"{where}: labels{list(position)} = {int(labels[position])} is outside [0, {vocab}) and is "
                    f"not ignore_index={ignore_index}")
        _fail_where(((labels < 0) | (labels >= vocab)) & (labels != ignore_index), message)


def check_row_tensor(where: str, name: str, value, labels: torch.Tensor, *, weights: bool) -> None:
    """instruction_mask (bool or 0/1 integers) or token_weights (floating, >= 0, no NaN), shaped like labels."""
    if weights:
        check_tensor(where, name, value, floating=True)
    else:
        check_tensor(where, name, value)
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{where}: {name} must be a bool (or integer 0/1) tensor, got {_describe(value)}")
    if tuple(value.shape) != tuple(labels.shape):
        raise ValueError(f"{where}: {name} has shape {tuple(value.shape)} but must have labels' shape "
                         f"{tuple(labels.shape)}")
    check_same_device(where, name, value, "labels", labels)
    if weights and content_checks_enabled(value) and value.numel():
        _fail_where(~value.isfinite(), lambda bad: f"{where}: {name} contains NaN or infinite values; every token "
                                                   f"weight must be a finite number >= 0")
        _fail_where(value < 0, lambda bad: f"{where}: {name} has negative entries"
                                           f"{'' if bad is None else f' (min {float(value.min())})'}; token "
                                           f"weights must be >= 0")


def check_normalize(where: str, normalize, sequence_ids, labels: torch.Tensor) -> None:
    """normalize "token" | "sequence"; sequence_ids (only with "sequence"): integers shaped like
    labels, in [0, labels.numel()) (content checked as labels are)."""
    if normalize not in ("token", "sequence"):
        raise ValueError(f"{where}: normalize must be 'token' (sum w l / sum w) or 'sequence' (mean over "
                         f"sequences of their weighted means), got {normalize!r}")
    if sequence_ids is None:
        return
    if normalize != "sequence":
        raise ValueError(f"{where}: sequence_ids is only used with normalize='sequence', got normalize="
                         f"{normalize!r}; pass normalize='sequence' or drop sequence_ids")
    check_tensor(where, "sequence_ids", sequence_ids, integer=True)
    if tuple(sequence_ids.shape) != tuple(labels.shape):
        raise ValueError(f"{where}: sequence_ids has shape {tuple(sequence_ids.shape)} but must have labels' "
                         f"shape {tuple(labels.shape)} (one sequence id per token)")
    check_same_device(where, "sequence_ids", sequence_ids, "labels", labels)
    if content_checks_enabled(sequence_ids) and sequence_ids.numel():
        count = labels.numel()

        def message(bad):
            got = "" if bad is None else f", got values in [{int(sequence_ids.min())}, {int(sequence_ids.max())}]"
            return f"{where}: sequence_ids must lie in [0, {count}) (labels.numel()){got}"

        _fail_where((sequence_ids < 0) | (sequence_ids >= count), message)
