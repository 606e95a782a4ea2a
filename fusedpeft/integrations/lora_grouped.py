"""group_lora_projections: run the LoRALinear projections that read the same input (attention
q/k/v, MLP gate/up) through one grouped op (lora_group_forward) inside an unchanged model forward.

How it works, per grouped parent module (e.g. a LlamaAttention holding q_proj, k_proj, v_proj):
  * a forward pre-hook on the parent arms the group (and drops anything left over);
  * each member's ``forward`` is an instance attribute (a _MemberForward) that, while the group is
    armed, lets the FIRST member call compute every member's output from its input x through
    lora_group_forward, returns its own and stashes the others keyed by that very tensor;
  * a later member called with the same tensor object (identity, plus a shape check and, in eager
    mode, no in-place change since) returns its stashed output; one called with another tensor,
    or after the stash was used, runs its normal per-layer forward;
  * a forward post-hook on the parent (always called, also when the forward raises) disarms the
    group and drops what was not consumed, so no output outlives the parent call that made it.
The fused layers themselves are not changed; ungroup_lora_projections removes the hooks and the
instance ``forward`` attributes.

The group computes only when it is safe to equal separate calls (up to rounding of the grouped
shrink): every member in training mode, unmerged and compatible (check_group), and grad enabled
(or dropout > 0, see the pre-hook). Otherwise, including eval mode, torch.no_grad() with dropout 0
and merged layers, each member runs exactly its own forward. torch.compile(fullgraph=True) traces
through the hooks: the compiled graph holds one fusedpeft::lora_linear_grouped per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusedpeft.fused.lora import LoRALinear
from fusedpeft.fused.lora_grouped import check_group, lora_group_forward

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_WHERE = "fusedpeft.group_lora_projections"


class _MemberForward:
    """Instance ``forward`` of one grouped member: the stash lookup, else the class's own forward."""

    def __init__(self, group: _Group, index: int):
        self.group, self.index = group, index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member_call(self.index, x)


class _Group:
    """State of one grouped parent: its members, whether it is armed, and the stashed outputs."""

    def __init__(self, names: tuple[str, ...], members: list[LoRALinear]):
        self.names, self.members = names, members
        self.armed = False
        self.key: torch.Tensor | None = None  # the x the stash was computed from
        self.key_version = -1
        self.stash: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self.armed, self.key, self.key_version, self.stash = False, None, -1, {}

    def pre_hook(self, parent: nn.Module, args) -> None:
        self.clear()
        if any(getattr(parent, n, None) is not m for n, m in zip(self.names, self.members)):
            return  # a member was swapped out (merge_adapters, a new adapter): leave it alone
        if not all(m.training for m in self.members):
            return
        try:
            check_group(self.members)
        except (TypeError, ValueError):  # merged since grouping, mixed modes, ...
            return
        # Without grad the per-layer path runs, except with a shared dropout mask: a reentrant
        # activation checkpoint runs its forward without grad and recomputes with grad, and both
        # must draw the same seeds.
        self.armed = torch.is_grad_enabled() or self.members[0].dropout > 0.0

    def post_hook(self, parent: nn.Module, args, output) -> None:
        self.clear()

    def member_call(self, index: int, x: torch.Tensor) -> torch.Tensor:
        member = self.members[index]
        if self.armed:
            if self.key is None and isinstance(x, torch.Tensor):
                outputs = lora_group_forward(self.members, x)
                self.key = x
                if not torch.compiler.is_compiling():  # _version is opaque to torch.compile
                    self.key_version = x._version
                self.stash = {i: y for i, y in enumerate(outputs) if i != index}
                return outputs[index]
            if (x is self.key and index in self.stash and x.shape == self.key.shape
                    and (torch.compiler.is_compiling() or x._version == self.key_version)):  # not changed in place
                return self.stash.pop(index)
        return type(member).forward(member, x)


def _check_groups(groups) -> tuple[tuple[str, ...], ...]:
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError(f"{_WHERE}: groups must be a sequence of name tuples such as "
                        f"(('q_proj', 'k_proj', 'v_proj'), ('gate_proj', 'up_proj')), got {groups!r}")
    out, seen = [], set()
    for group in groups:
        if isinstance(group, str) or not isinstance(group, Sequence):
            raise TypeError(f"{_WHERE}: each group must be a tuple of child module names, got {group!r}")
        names = tuple(group)
        if len(names) < 2 or any(not isinstance(n, str) or not n or "." in n for n in names):
            raise ValueError(f"{_WHERE}: each group needs at least two child names without dots (the "
                             f"attribute names under one parent, e.g. 'q_proj'), got {group!r}")
        if len(set(names)) != len(names) or seen & set(names):
            raise ValueError(f"{_WHERE}: a name may appear once across all groups, got {groups!r}")
        seen |= set(names)
        out.append(names)
    if not out:
        raise ValueError(f"{_WHERE}: groups is empty; give at least one group of names")
    return tuple(out)


def _groups_of(parent: nn.Module) -> list[_Group]:
    """The _Group objects whose hooks sit on ``parent`` (found from the hooks themselves, so a
    copy.deepcopy of a grouped model finds its own copies)."""
    hooks = list(parent._forward_pre_hooks.values())
    return [h.__self__ for h in hooks if isinstance(getattr(h, "__self__", None), _Group)]


def group_lora_projections(model: nn.Module, groups=DEFAULT_GROUPS,
                           allow_shared_dropout_mask: bool = False) -> nn.Module:
    """Make every set of LoRALinear siblings named by a group share one grouped LoRA op.

    Args:
        model: any nn.Module holding LoRALinear layers (after fusedpeft.apply_lora); modified in
            place (hooks on the parents, an instance ``forward`` on each grouped layer).
        groups: tuples of child names under one parent module whose layers the parent calls on the
            same input tensor; the default fits Llama / Mistral / Qwen2 / Gemma attention (q/k/v)
            and gated MLPs (gate/up).
        allow_shared_dropout_mask: members with dropout p > 0 are grouped only when True. A group
            draws ONE dropout seed, so its members see the same mask of x where separate layers
            draw independent masks (each is still a correct mask; the joint statistics differ).
    Returns the same model. A parent is grouped when all its children named by a group exist, are
    distinct unmerged LoRALinear layers and pass fusedpeft.fused.lora_grouped.check_group (same
    in_features, dropout, mode, weight dtype/device and backend); others are left as they are.
    Outputs and gradients equal the ungrouped model's up to rounding (dropout 0); a member that
    the parent leaves unused in a grouped step gets zero gradients instead of none.
    Raises TypeError / ValueError for a bad model or groups, ValueError if a parent is already grouped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(allow_shared_dropout_mask, bool):
        raise TypeError(f"{_WHERE}: allow_shared_dropout_mask must be a bool, got {allow_shared_dropout_mask!r}")
    groups = _check_groups(groups)
    plan = []
    for parent_name, parent in model.named_modules():
        if _groups_of(parent):
            raise ValueError(f"{_WHERE}: module {parent_name or type(parent).__name__!r} is already grouped; call "
                             f"fusedpeft.ungroup_lora_projections(model) first")
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if (not all(isinstance(m, LoRALinear) for m in members) or len({id(m) for m in members}) < len(members)
                    or any("forward" in m.__dict__ for m in members)):
                continue
            try:
                check_group(members)
            except (TypeError, ValueError):
                continue
            if members[0].dropout > 0.0 and not allow_shared_dropout_mask:
                continue
            plan.append((parent, names, members))
    for parent, names, members in plan:
        group = _Group(names, members)
        parent.register_forward_pre_hook(group.pre_hook)
        parent.register_forward_hook(group.post_hook, always_call=True)
        for i, member in enumerate(members):
            member.forward = _MemberForward(group, i)
    return model


def grouped_projections(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """(qualified parent name, member names) of every group group_lora_projections installed."""
    return [(name, g.names) for name, parent in model.named_modules() for g in _groups_of(parent)]


def ungroup_lora_projections(model: nn.Module) -> nn.Module:
    """Undo group_lora_projections: remove its hooks and the members' instance ``forward``; every
    layer then runs its own forward again. Returns the same model; a model never grouped is unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedpeft.ungroup_lora_projections: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    for parent in model.modules():
        for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
            for hook_id, hook in list(hooks.items()):
                if isinstance(getattr(hook, "__self__", None), _Group):
                    group = hook.__self__
                    group.clear()
                    del hooks[hook_id]
                    parent._forward_hooks_always_called.pop(hook_id, None)
                    for member in group.members:
                        if isinstance(member.__dict__.get("forward"), _MemberForward):
                            del member.__dict__["forward"]
    return model
