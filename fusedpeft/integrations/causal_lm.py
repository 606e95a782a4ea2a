"""patch_causal_lm: an HF *ForCausalLM whose training loss comes from fusedpeft.linear_cross_entropy.

With labels, the patched forward runs the model's decoder, then computes the loss from the last
hidden states and the lm_head weight (and bias) chunk by chunk, so the [batch, seq, vocab] logits
never exist; ``logits`` in the output is then None. Without labels the original forward runs
unchanged (logits returned as before).

Shifting is HF's (``ForCausalLMLoss``): the target of position t is labels[t + 1] and the last
position has none. ``instruction_mask`` and ``token_weights`` are aligned with ``labels`` (one value
per input token, as InstructionCollator produces them) and shifted the same way. With
``shift_labels`` (HF's already-shifted targets), the masks are taken as already shifted too.

``num_items_in_batch`` (transformers.Trainer passes the number of supervised targets of the whole
gradient-accumulation window) replaces the mean's denominator, exactly as HF's loss does. With
instruction weighting the Trainer still counts every label != -100, so the loss is then
sum_t w_t l_t / (that count), a constant denominator over the window: gradient-accumulation
correct, but not sum_t w_t.

``normalize="sequence"`` (packing-aware): each sequence's weighted mean, then the mean over the
sequences. Sequences come from ``position_ids`` restarting at 0 (HF's DataCollatorWithFlattening
packs a batch into one row that way), and every batch row starts a new one; without position_ids
each batch row is one sequence. num_items_in_batch then replaces the NUMBER OF SEQUENCES: pass
the count of sequences with a supervised target over the whole accumulation window for an exact
mean over sequences. The Trainer's count is a token count, so under the Trainer the loss is
sum_s mean_s / (supervised tokens in the window): still gradient-accumulation exact (one constant
denominator for the window), but smaller than the mean over sequences by the tokens per sequence.
"""

from __future__ import annotations

import inspect
import numbers
import types

import torch
from torch import nn

from fusedpeft.fused import check_loss_options, check_normalize
from fusedpeft.fused.losses import linear_cross_entropy

# keywords of linear_cross_entropy that a patch may fix (the rest are per batch)
_LOSS_KEYWORDS = ("instruction_weight", "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap",
                  "normalize", "chunk_budget_bytes", "backend")
# forward keywords that belong to the loss, never to the decoder
_BATCH_KEYS = ("labels", "instruction_mask", "token_weights", "num_items_in_batch", "shift_labels")


def _head_transform(config) -> tuple[float | None, float]:
    """(softcap, logit multiplier) the model applies after its lm_head, read from its config.

    Gemma 2/3: logits = c * tanh(logits / c) with c = final_logit_softcapping. Cohere: logits *
    logit_scale. Granite: logits / logits_scaling."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    return softcap, scale


def _decoder(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise TypeError(f"fusedpeft.patch_causal_lm: {type(model).__name__} has no separate decoder module "
                        f"(get_decoder() / base_model); it needs the layout of an HF *ForCausalLM model")
    return decoder


def _head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        raise TypeError(f"fusedpeft.patch_causal_lm: the model's lm_head must be a plain nn.Linear (weight "
                        f"[vocab, hidden]), got {type(head).__name__}; merge or remove adapters on the head first")
    return head


def _shift(t: torch.Tensor, fill) -> torch.Tensor:
    """t[..., 1:] padded at the end with ``fill``: position i gets the value of position i + 1."""
    return torch.cat([t[..., 1:], t.new_full((*t.shape[:-1], 1), fill)], dim=-1)


def _check_batch_tensor(name: str, value, labels: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fusedpeft.patch_causal_lm: {name} must be a tensor shaped like labels "
                        f"{tuple(labels.shape)}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(labels.shape):
        raise ValueError(f"fusedpeft.patch_causal_lm: {name} has shape {tuple(value.shape)} but must have the "
                         f"shape of labels {tuple(labels.shape)} (one value per input token)")


def _check_position_ids(position_ids, labels) -> None:
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != labels.dim() or any(
            p not in (1, n) for p, n in zip(position_ids.shape, labels.shape)):
        got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else repr(position_ids)
        raise ValueError(f"fusedpeft.patch_causal_lm: normalize='sequence' reads sequences from position_ids, "
                         f"which must be a tensor broadcastable to labels {tuple(labels.shape)}, got {got}")


def _sequence_ids(position_ids, labels: torch.Tensor, device) -> torch.Tensor:
    """position_ids broadcastable to labels [B, T] -> sequence ids [B, T] in [0, B T) of the
    SHIFTED targets (target t is token t + 1): a sequence starts where position_ids is 0 and at
    every row start."""
    starts = position_ids.to(device).expand(labels.shape) == 0
    starts[..., 0] = True
    ids = starts.reshape(-1).long().cumsum(0).sub_(1).reshape(labels.shape)
    return torch.cat([ids[..., 1:], ids[..., -1:]], dim=-1)


def _fused_loss(model, hidden, batch: dict, options: dict, softcap, scale) -> torch.Tensor:
    labels = batch["labels"]
    mask, weights = batch.get("instruction_mask"), batch.get("token_weights")
    for name, value in (("instruction_mask", mask), ("token_weights", weights)):
        if value is not None:
            _check_batch_tensor(name, value, labels)
    device = hidden.device
    if batch.get("shift_labels") is not None:
        targets = batch["shift_labels"].to(device)
        mask = None if mask is None else mask.to(device, torch.bool)
        weights = None if weights is None else weights.to(device)
    else:
        targets = _shift(labels.to(device), options["ignore_index"])
        mask = None if mask is None else _shift(mask.to(device, torch.bool), False)
        weights = None if weights is None else _shift(weights.to(device), 0)
    head = _head(model)
    bias = head.bias
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    keywords = dict(options)
    if softcap is not None:
        keywords["softcap"] = softcap
    if batch.get("position_ids") is not None:
        keywords["sequence_ids"] = _sequence_ids(batch["position_ids"], targets, device)
    num_items = batch.get("num_items_in_batch")
    if keywords["reduction"] == "mean" and num_items is not None:
        keywords["num_items_in_batch"] = num_items.to(device) if isinstance(num_items, torch.Tensor) else num_items
    return linear_cross_entropy(hidden, head.weight, targets, bias, instruction_mask=mask, token_weights=weights,
                                **keywords)


def _output(decoder_out, loss):
    """The model's usual output class with loss set and logits None; other fields from the decoder."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {"loss": loss, "logits": None}
    for name in CausalLMOutputWithPast.__dataclass_fields__:
        if name not in fields and name in decoder_out:
            fields[name] = decoder_out[name]
    return CausalLMOutputWithPast(**fields)


def _patched_forward(self, *args, instruction_mask=None, token_weights=None, **kwargs):
    state = self._fusedpeft_patch
    if args:
        names = state["positional"]
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward takes at most {len(names)} positional arguments")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
    if kwargs.pop("fused_lm_head", False):  # TRL's call (fusedpeft/integrations/trl.py)
        from fusedpeft.integrations.trl import fused_lm_head_forward

        return fused_lm_head_forward(self, kwargs, instruction_mask, token_weights)
    labels = kwargs.get("labels")
    if labels is None:
        for key in ("labels", "num_items_in_batch", "shift_labels"):
            kwargs.pop(key, None)
        return state["original"](**kwargs)
    batch = {key: kwargs.pop(key, None) for key in _BATCH_KEYS}
    batch.update(instruction_mask=instruction_mask, token_weights=token_weights)
    if state["options"]["normalize"] == "sequence" and kwargs.get("position_ids") is not None:
        _check_position_ids(kwargs["position_ids"], labels)  # before the decoder runs
        batch["position_ids"] = kwargs["position_ids"]
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, numbers.Integral) and logits_to_keep == 0):
        raise ValueError(f"fusedpeft.patch_causal_lm: with labels the loss needs every position; got "
                         f"logits_to_keep={logits_to_keep!r} (use 0, or call without labels)")
    return_dict = kwargs.pop("return_dict", None)
    decoder_out = _decoder(self)(**kwargs)
    hidden = decoder_out[0]
    loss = _fused_loss(self, hidden, batch, state["options"], state["softcap"], state["scale"])
    out = _output(decoder_out, loss)
    return out.to_tuple() if return_dict is False else out


def patch_causal_lm(model: nn.Module, **loss_keywords) -> nn.Module:
    """Make ``model`` (an HF *ForCausalLM) compute its loss with fusedpeft.linear_cross_entropy.

    Args:
        model: Llama, Mistral, Qwen2, Gemma2 (final_logit_softcapping), Phi-3, ... or any model with a
            decoder (``get_decoder()`` / ``base_model``) whose first output is the last hidden states
            [batch, seq, hidden] and an nn.Linear lm_head (weight [vocab, hidden], optional bias [vocab]).
        **loss_keywords: fixed keywords of linear_cross_entropy: instruction_weight, ignore_index,
            reduction ("mean" or "sum"), label_smoothing, z_loss, softcap, normalize ("token" or
            "sequence": sequences from position_ids restarting at 0), chunk_budget_bytes, backend.
            softcap defaults to the config's final_logit_softcapping and may not contradict it.

    The patched ``forward(..., labels=None, instruction_mask=None, token_weights=None,
    num_items_in_batch=None, **model kwargs)`` takes labels [batch, seq] int64, instruction_mask
    [batch, seq] bool (True on prompt tokens, weighted by instruction_weight) and token_weights
    [batch, seq] float >= 0, all aligned with input_ids and shifted inside as HF shifts labels.
    With labels it returns CausalLMOutputWithPast(loss=float32 scalar, logits=None, ...); without,
    the original forward's output. With ``fused_lm_head=True`` (TRL's trainers) it returns trl's
    FusedCausalLMOutput of per-token log-probabilities instead (fusedpeft/integrations/trl.py).
    Patching again replaces the keywords. Returns ``model`` (patched
    in place: an instance-level forward; ``model.accepts_loss_kwargs`` is set so the Trainer passes
    num_items_in_batch). For a PEFT-wrapped model, patch the HF model inside it
    (``peft_model.get_base_model()``); PEFT's forward reaches the patched one.
    """
    where = "fusedpeft.patch_causal_lm"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module (an HF *ForCausalLM), got {type(model).__name__}")
    unknown = sorted(set(loss_keywords) - set(_LOSS_KEYWORDS))
    if unknown:
        raise TypeError(f"{where}: unknown loss keyword(s) {unknown}; allowed: {list(_LOSS_KEYWORDS)} "
                        f"(instruction_mask / token_weights / num_items_in_batch are forward arguments)")
    options = dict(instruction_weight=0.0, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                   softcap=None, normalize="token")
    options.update(loss_keywords)
    if options["reduction"] not in ("mean", "sum"):
        raise ValueError(f"{where}: reduction must be 'mean' or 'sum' (a model's loss is a scalar), got "
                         f"{options['reduction']!r}")
    check_loss_options(where, num_items_in_batch=None, **{k: options[k] for k in (
        "reduction", "label_smoothing", "z_loss", "softcap", "instruction_weight", "ignore_index")})
    check_normalize(where, options["normalize"], None, torch.empty(0))
    _decoder(model)
    _head(model)
    softcap, scale = _head_transform(getattr(model, "config", None))
    if softcap is not None and options["softcap"] is not None and float(options["softcap"]) != float(softcap):
        raise ValueError(f"{where}: softcap={options['softcap']!r} contradicts the model's "
                         f"final_logit_softcapping={softcap!r}; leave softcap unset")
    state = getattr(model, "_fusedpeft_patch", None)
    original = state["original"] if state is not None else model.forward
    params = [p for p in inspect.signature(original).parameters.values()]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    model._fusedpeft_patch = dict(original=original, options=options, softcap=softcap, scale=scale,
                                  positional=positional)
    # The Trainer keeps only dataset columns named in forward's signature: declare the two batch keys.
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("instruction_mask", "token_weights") if name not in {p.name for p in params}]
    var_kw = [p for p in params if p.kind == p.VAR_KEYWORD] or [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    ordered = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    ordered += [p for p in params if p.kind == p.KEYWORD_ONLY] + extra + var_kw

    def forward(self, *args, instruction_mask=None, token_weights=None, **kwargs):
        return _patched_forward(self, *args, instruction_mask=instruction_mask, token_weights=token_weights, **kwargs)

    forward.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                               *ordered])
    forward.__doc__ = patch_causal_lm.__doc__
    model.forward = types.MethodType(forward, model)
    model.accepts_loss_kwargs = True
    return model
