"""ReMoRA for transformers.Trainer: every N optimizer steps fold each MoRA update into its base weight,
re-zero M, switch the compression type and reset M's optimizer state (the MoRA reference's
ResetReloraCallback, docs/contract.md §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from fusedpeft.core.mora import MORA_TYPES
from fusedpeft.fused import check_positive_int
from fusedpeft.fused.mora import MoRALinear


def _mora_layers(model: nn.Module) -> list[MoRALinear]:
    return [m for m in model.modules() if isinstance(m, MoRALinear)]


def _base_optimizer(optimizer):
    """The torch optimizer under accelerate's AcceleratedOptimizer (or a similar wrapper)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class ReMoRACallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, restart every MoRALinear of the trained model.

    A restart calls ``layer.fold_and_reset(next_type)`` (W += ΔW, M zeroed in place, mora_type
    moved to the next entry of ``types``) and, with ``reset_optimizer=True``, drops the optimizer
    state of each M (Adam's step / exp_avg / exp_avg_sq ...), so its next step starts fresh as
    in ReLoRA. The rest of the optimizer state and the LR schedule are left alone.

    Args:
        every_n_steps: restart period, in optimizer steps (state.global_step), a positive int.
        types: the cycle of mora_type values; the default (1, 2, 3, 4) is the reference's
            remora_types=4, (1, 2) its other setting, and (6,) keeps type 6 (restarts without
            switching). Every MoRA layer's type must be in it when training starts.
        reset_optimizer: drop the optimizer state of every M at each restart.
    Attributes: ``restarts`` lists the global steps at which restarts happened.

    Folded updates live in the base weights: after training, save the model itself (e.g.
    merge_adapters then save_pretrained), not only the adapter files.
    """

    def __init__(self, every_n_steps: int, types: Sequence[int] = (1, 2, 3, 4), reset_optimizer: bool = True):
        where = "fusedpeft.ReMoRACallback"
        check_positive_int(where, "every_n_steps", every_n_steps)
        types = tuple(types)
        not_types = [t for t in types if isinstance(t, bool) or not isinstance(t, int) or t not in MORA_TYPES]
        if not types or not_types or len(set(types)) != len(types):
            raise ValueError(f"{where}: types must be a non-empty sequence of distinct values from {MORA_TYPES}, got "
                             f"{types!r}")
        self.every_n_steps = every_n_steps
        self.types = types
        self.reset_optimizer = bool(reset_optimizer)
        self.restarts: list[int] = []

    def _layers(self, model) -> list[MoRALinear]:
        where = "fusedpeft.ReMoRACallback"
        if model is None:
            raise ValueError(f"{where}: the Trainer passed no model to the callback")
        layers = _mora_layers(model)
        if not layers:
            raise ValueError(f"{where}: the model has no MoRALinear layer (apply fusedpeft.apply_mora first)")
        if any(isinstance(m.M, DTensor) or isinstance(m.base_layer.weight, DTensor) for m in layers):
            raise ValueError(f"{where}: the MoRA parameters are sharded DTensors (FSDP2 / tensor parallel); "
                             f"restarts fold M into local weights and are not supported on sharded parameters")
        wrong = sorted({m.mora_type for m in layers} - set(self.types))
        if wrong:
            raise ValueError(f"{where}: the model has MoRA layers of type {wrong}, which is not in the cycle "
                             f"types={self.types}; e.g. types=(6,) restarts type-6 layers without switching")
        return layers

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._layers(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 0 or state.global_step % self.every_n_steps != 0:
            return
        layers = self._layers(model)
        for layer in layers:
            layer.fold_and_reset(self.types[(self.types.index(layer.mora_type) + 1) % len(self.types)])
        if self.reset_optimizer:
            opt = _base_optimizer(optimizer)
            if opt is None:
                raise ValueError("fusedpeft.ReMoRACallback: reset_optimizer=True but the Trainer passed no optimizer")
            for layer in layers:
                opt.state.pop(layer.M, None)
        self.restarts.append(state.global_step)
