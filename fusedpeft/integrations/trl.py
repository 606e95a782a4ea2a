"""TRL: SFTTrainer / DPOTrainer compute their LM head with fusedpeft's kernels (TRL 1.16).

TRL's trainers call ``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)`` in
their constructor and then ``model(..., labels=labels, fused_lm_head=True)``, which must return
trl's ``FusedCausalLMOutput`` (per-token ``log_probs`` [batch, seq - 1] or [batch, seq] with
``shift_labels``, and ``entropy`` / ``log_sum_sq_probs`` / ``mean_logits`` / ``is_top1`` when
asked, 0 where the label is -100, ``label_mask``, ``loss``). A ``patch_causal_lm`` model serves
that call itself (``fused_lm_head_forward``: the decoder, then fusedpeft.linear_log_probs on the
last hidden states and the lm_head, never the logits). TRL's own ``add_fused_lm_head`` would
replace the model's forward, so the trainers here are built with ``trl_fused_lm_head()`` active:
inside it TRL's trainer modules see ``add_fused_lm_head`` below, which for a patched model only
records temperature, cast_lm_head_to_fp32 and outputs (and defers to TRL's for any other model).

Prompt-loss weight (instruction tuning): give the batch ``instruction_mask`` (True on prompt
tokens, e.g. from fusedpeft.InstructionCollator) and/or ``token_weights`` with
``patch_causal_lm(model, instruction_weight=w)``. The returned ``log_probs`` are then
w_t log p_t (w_t = 0 on ignored labels, instruction_weight on prompt tokens, times token_weights),
so SFTTrainer's loss -sum_t log_probs_t / num_items_in_batch is sum_t w_t l_t / (labels != -100
of the accumulation window): exactly patch_causal_lm's loss under transformers.Trainer.
``label_mask`` is then (label != -100) & (w_t > 0); entropy and is_top1 stay unweighted.
Not for SFTConfig(loss_type="dft"), which reads exp(log_probs).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from fusedpeft.core.token_weights import token_loss_weights
from fusedpeft.fused.log_probs import check_head_options, linear_log_probs
from fusedpeft.integrations.causal_lm import _check_batch_tensor, _decoder, _head

# TRL versions whose fused_lm_head contract this module implements (tests/test_trl.py)
SUPPORTED_TRL = ">=1.16,<1.17"
_DEFAULT_HEAD = dict(temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",))


def _trl_add_fused_lm_head():
    from trl.trainer import utils

    return utils.add_fused_lm_head


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple = ("log_probs",)) -> None:
    """trl.trainer.utils.add_fused_lm_head's arguments. On a patch_causal_lm model, records them:
    its ``forward(..., fused_lm_head=True)`` then returns those outputs at that temperature
    (fusedpeft's kernels; the forward is not replaced). Any other model gets TRL's own head."""
    state = getattr(model, "_fusedpeft_patch", None)
    if state is None:
        return _trl_add_fused_lm_head()(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                        outputs=outputs)
    check_head_options("fusedpeft.integrations.trl.add_fused_lm_head", tuple(outputs), temperature, None)
    state["trl_head"] = dict(temperature=float(temperature), cast_lm_head_to_fp32=bool(cast_lm_head_to_fp32),
                             outputs=tuple(outputs))
    return None


@contextlib.contextmanager
def trl_fused_lm_head():
    """While active, every loaded ``trl.*`` module that imported TRL's add_fused_lm_head sees
    fusedpeft's (above) instead: build TRL trainers inside it so a patch_causal_lm model keeps
    fusedpeft's head. Restored on exit."""
    original = _trl_add_fused_lm_head()
    swapped = [module for name, module in list(sys.modules.items())
               if (name == "trl" or name.startswith("trl.")) and getattr(module, "add_fused_lm_head", None) is original]
    for module in swapped:
        module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        for module in swapped:
            module.add_fused_lm_head = original


def _trainer(base):
    class Trainer(base):
        __doc__ = (f"trl.{base.__name__} whose fused LM head is fusedpeft's for a patch_causal_lm model (built "
                   f"inside trl_fused_lm_head()); same arguments.")

        def __init__(self, *args, **kwargs):
            with trl_fused_lm_head():
                super().__init__(*args, **kwargs)

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer


def __getattr__(name: str):
    """SFTTrainer and DPOTrainer: TRL's, built with fusedpeft's head (imported on first use)."""
    if name in ("SFTTrainer", "DPOTrainer"):
        import trl

        value = _trainer(getattr(trl, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _shift_left(t: torch.Tensor) -> torch.Tensor:
    return t[:, 1:]


def fused_lm_head_forward(model, kwargs: dict, instruction_mask=None, token_weights=None):
    """The ``fused_lm_head=True`` call of a patch_causal_lm model (see the module docstring).

    kwargs: the forward's keywords (labels [B, T] or shift_labels [B, T] int, num_items_in_batch,
    and the decoder's: input_ids, attention_mask, position_ids, ...). instruction_mask /
    token_weights [B, T] aligned with labels (with shift_labels: already shifted) -> trl's
    FusedCausalLMOutput with per-token fields [B, T - 1] ([B, T] with shift_labels)."""
    from trl.trainer.utils import FusedCausalLMOutput

    where = "fusedpeft.patch_causal_lm(fused_lm_head=True)"
    state = model._fusedpeft_patch
    head_options = state.get("trl_head", _DEFAULT_HEAD)
    options = state["options"]
    labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    if labels is None and shift_labels is None:
        raise ValueError(f"{where}: needs labels (or shift_labels) [batch, seq]: the log-probabilities are of the "
                         f"next-token labels")
    if kwargs.get("output_router_logits"):
        raise ValueError(f"{where}: the MoE load-balancing loss (output_router_logits=True) is not computed by "
                         f"fusedpeft's head; set the config's output_router_logits=False")
    for name, value in (("instruction_mask", instruction_mask), ("token_weights", token_weights)):
        if value is not None:
            _check_batch_tensor(name, value, labels if shift_labels is None else shift_labels)
    for key in ("logits_to_keep", "return_dict"):
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    hidden = _decoder(model)(**kwargs)[0]
    head = _head(model)
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], _shift_left(labels)
        instruction_mask = None if instruction_mask is None else _shift_left(instruction_mask)
        token_weights = None if token_weights is None else _shift_left(token_weights)
    else:
        targets = shift_labels
    device = head.weight.device
    hidden, targets = hidden.to(device), targets.to(device)
    weight, bias = head.weight, head.bias
    if head_options["cast_lm_head_to_fp32"]:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    if state["scale"] != 1.0:
        hidden = hidden * state["scale"]
        bias = None if bias is None else bias * state["scale"]
    context = torch.autocast(device.type, enabled=False) if head_options["cast_lm_head_to_fp32"] else \
        contextlib.nullcontext()
    with context:
        per_token = linear_log_probs(hidden, weight, targets, bias, outputs=head_options["outputs"],
                                     temperature=head_options["temperature"], softcap=state["softcap"],
                                     ignore_index=options["ignore_index"],
                                     chunk_budget_bytes=options.get("chunk_budget_bytes"),
                                     backend=options.get("backend"))
    log_probs = per_token["log_probs"]
    label_mask = targets != options["ignore_index"]
    if instruction_mask is not None or token_weights is not None:
        w = token_loss_weights(targets, ignore_index=options["ignore_index"],
                               instruction_weight=options["instruction_weight"],
                               instruction_mask=None if instruction_mask is None else instruction_mask.to(device),
                               token_weights=None if token_weights is None else token_weights.to(device),
                               dtype=log_probs.dtype).to(log_probs.dtype)
        log_probs = log_probs * w
        label_mask = label_mask & (w > 0)
    denominator = label_mask.sum().clamp(min=1) if num_items is None else num_items
    return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=log_probs,
                               entropy=per_token.get("entropy"), log_sum_sq_probs=per_token.get("log_sum_sq_probs"),
                               mean_logits=per_token.get("mean_logits"), is_top1=per_token.get("is_top1"),
                               label_mask=label_mask)
