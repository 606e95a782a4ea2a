"""group_lora_projections / ungroup_lora_projections on tiny Llama / Qwen2 decoders and toy parents:
equality with the ungrouped model (float64), the grouped op actually used, fallbacks, no stale
outputs, eval / no_grad / merged, dropout policy, deepcopy, torch.compile, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import fusedpeft as fp
from fusedpeft.fused.lora_grouped import lora_group_forward
from fusedpeft.integrations import lora_grouped as grouping
from fusedpeft.integrations.lora_grouped import group_lora_projections, grouped_projections, ungroup_lora_projections

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def randomise_b_(model: nn.Module) -> nn.Module:
    """B starts at zero, which would hide every error on the adapter path."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fp.LoRALinear):
                m.lora_B.weight.normal_(0.0, 0.2)
    return model


def tiny(arch: str = "llama", dropout: float = 0.0, **kw) -> nn.Module:
    """A float64 decoder with LoRA on every projection, in training mode."""
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES))
    else:  # q/k/v carry a bias
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES))
    return randomise_b_(fp.apply_lora(model.double(), r=4, alpha=8.0, dropout=dropout, **kw)).train()


@pytest.fixture
def calls(monkeypatch):
    """Counts the grouped computations run through the hooks."""
    count = [0]

    def counting(layers, x):
        count[0] += 1
        return lora_group_forward(layers, x)

    monkeypatch.setattr(grouping, "lora_group_forward", counting)
    return count


def adapter_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def run(model, ids):
    out = model(ids).logits
    out.square().mean().backward()
    return out


class Toy(nn.Module):
    """q/k/v under one parent; ``mode`` picks which tensor each projection reads."""

    def __init__(self, d=8, dropout=0.0):
        super().__init__()
        for name, out in (("q_proj", 8), ("k_proj", 4), ("v_proj", 5)):
            setattr(self, name, randomise_b_(fp.LoRALinear(nn.Linear(d, out).double(), r=2, dropout=dropout)))
        self.mode = "same"

    def forward(self, x, other=None):
        if self.mode == "q_only":
            return self.q_proj(x)
        if self.mode == "raise":
            self.q_proj(x)
            raise RuntimeError("boom")
        k_in = x if self.mode == "same" else other
        return torch.cat([self.q_proj(x), self.k_proj(k_in), self.v_proj(x)], dim=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_equals_ungrouped_outputs_and_every_adapter_gradient(arch, calls):
    torch.manual_seed(0)
    ref = tiny(arch)
    model = group_lora_projections(copy.deepcopy(ref))
    per_layer = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
    assert grouped_projections(model) == [(f"model.layers.{i}.{p}", names) for i in range(2) for p, names in per_layer]
    ids = torch.randint(0, SIZES["vocab_size"], (2, 7))
    torch.testing.assert_close(run(model, ids), run(ref, ids))
    assert calls[0] == 4  # 2 layers x (q/k/v + gate/up), once each
    got, want = adapter_grads(model), adapter_grads(ref)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")
    for g in grouping._groups_of(model.model.layers[0].self_attn):
        assert not g.armed and g.key is None and not g.stash


def test_members_called_on_different_tensors_fall_back(calls):
    torch.manual_seed(0)
    ref = Toy()
    ref.mode = "other"
    model = group_lora_projections(copy.deepcopy(ref))
    x, other = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    y = model(x, other)
    torch.testing.assert_close(y, ref(x, other))
    assert calls[0] == 1  # q computed the group; k read `other` and ran alone; v used the stash
    y.sum().backward()
    ref(x, other).sum().backward()
    for name, g in adapter_grads(ref).items():
        torch.testing.assert_close(adapter_grads(model)[name], g)
    # an equal but distinct tensor is not the same input: k falls back again
    torch.testing.assert_close(model(x, x.clone()), ref(x, x.clone()))
    assert calls[0] == 2


def test_input_changed_in_place_between_members_falls_back(calls):
    torch.manual_seed(0)
    ref = Toy()
    model = group_lora_projections(copy.deepcopy(ref))
    (group,) = grouping._groups_of(model)

    def forward(x, other=None):  # q reads x, then x is scaled in place before k and v read it
        q = model.q_proj(x)
        with torch.no_grad():
            x.mul_(2.0)
        return torch.cat([q, model.k_proj(x), model.v_proj(x)], dim=-1)

    model.forward = forward
    x = torch.randn(3, 8, dtype=torch.float64)
    y = model(x.clone())
    want = torch.cat([ref.q_proj(x), ref.k_proj(2.0 * x), ref.v_proj(2.0 * x)], dim=-1)
    torch.testing.assert_close(y, want)
    assert calls[0] == 1 and not group.stash


def test_no_stale_outputs_across_calls(calls):
    torch.manual_seed(0)
    ref = Toy()
    model = group_lora_projections(copy.deepcopy(ref))
    (group,) = grouping._groups_of(model)
    model.mode = "q_only"  # k and v outputs stashed, never consumed
    x1 = torch.randn(3, 8, dtype=torch.float64)
    model(x1)
    assert calls[0] == 1 and not group.armed and group.key is None and not group.stash
    # outside the parent's forward the members are plain layers, even on the very same tensor
    torch.testing.assert_close(model.k_proj(x1), ref.k_proj(x1))
    assert calls[0] == 1
    model.mode = "raise"  # the post-hook runs even when the forward raises
    with pytest.raises(RuntimeError, match="boom"):
        model(x1)
    assert not group.armed and not group.stash
    model.mode = "same"
    for _ in range(2):  # two steps, different inputs: each uses its own group computation
        x = torch.randn(3, 8, dtype=torch.float64)
        torch.testing.assert_close(model(x), ref(x))
    assert calls[0] == 4


@pytest.mark.parametrize("how", ["eval", "no_grad", "inference_mode", "merged"])
def test_eval_no_grad_and_merged_run_exactly_per_layer(how, calls):
    torch.manual_seed(0)
    ref = tiny("qwen2")
    model = group_lora_projections(copy.deepcopy(ref))
    ids = torch.randint(0, SIZES["vocab_size"], (2, 7))
    if how == "eval":
        model.eval(), ref.eval()
    if how == "merged":
        for m in (model, ref):
            m.model.layers[1].mlp.up_proj.merge()
            m.model.layers[1].self_attn.k_proj.merge()
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(how, torch.enable_grad)
    with ctx():
        y, y_ref = model(ids).logits, ref(ids).logits
    if how == "merged":  # layer 0 still groups; layer 1's groups each hold a merged member
        assert calls[0] == 2
        torch.testing.assert_close(y, y_ref)
    else:
        assert calls[0] == 0
        assert torch.equal(y, y_ref)


def test_ungroup_restores_and_regrouping_needs_ungroup(calls):
    torch.manual_seed(0)
    model = group_lora_projections(tiny())
    with pytest.raises(ValueError, match="already grouped; call fusedpeft.ungroup_lora_projections"):
        group_lora_projections(model)
    assert ungroup_lora_projections(model) is model
    assert grouped_projections(model) == []
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_pre_hooks and not m._forward_hooks and not m._forward_hooks_always_called
    run(model, torch.randint(0, SIZES["vocab_size"], (2, 7)))
    assert calls[0] == 0
    assert len(grouped_projections(group_lora_projections(model))) == 4


def test_deepcopy_of_a_grouped_model_is_grouped_on_its_own(calls):
    torch.manual_seed(0)
    model = group_lora_projections(tiny())
    clone = copy.deepcopy(model)
    (group,) = grouping._groups_of(clone.model.layers[0].mlp)
    assert group.members[0] is clone.model.layers[0].mlp.gate_proj
    ids = torch.randint(0, SIZES["vocab_size"], (2, 7))
    torch.testing.assert_close(run(clone, ids), run(model, ids))
    assert calls[0] == 8
    ungroup_lora_projections(clone)
    assert len(grouped_projections(model)) == 4 and grouped_projections(clone) == []


def test_only_complete_compatible_groups_are_grouped():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).double()
    fp.apply_lora(model, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj"])  # v_proj stays nn.Linear
    layer1 = model.model.layers[1].mlp
    layer1.up_proj = fp.LoRALinear(layer1.up_proj.base_layer, r=4, backend="torch")  # gate_proj: backend None
    group_lora_projections(model)
    assert grouped_projections(model) == [("model.layers.0.mlp", ("gate_proj", "up_proj"))]


def test_dropout_is_grouped_only_when_a_shared_mask_is_allowed(calls):
    torch.manual_seed(0)
    model = tiny(dropout=0.1)
    assert grouped_projections(group_lora_projections(model)) == []
    toy = group_lora_projections(Toy(dropout=0.25), allow_shared_dropout_mask=True)
    assert grouped_projections(toy) == [("", ("q_proj", "k_proj", "v_proj"))]
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.manual_seed(5)
    y = toy(x)
    torch.manual_seed(5)  # the same seed draw: one shared mask for q, k and v
    want = torch.cat(lora_group_forward([toy.q_proj, toy.k_proj, toy.v_proj], x), dim=-1)
    torch.testing.assert_close(y, want)
    assert calls[0] == 1


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_with_a_shared_mask(use_reentrant, calls):
    """The checkpointed forward and its recomputation draw the same masks: outputs and gradients
    equal the grouped model without checkpointing under the same seed (a reentrant checkpoint runs
    its forward without grad, so the shared-mask group must group there too)."""
    torch.manual_seed(0)
    plain = group_lora_projections(tiny(dropout=0.1), allow_shared_dropout_mask=True)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ckpt.config.use_cache = False
    ids = torch.randint(0, SIZES["vocab_size"], (2, 7))
    torch.manual_seed(3)
    y = run(ckpt, ids)
    torch.manual_seed(3)
    torch.testing.assert_close(y, run(plain, ids))
    assert calls[0] == 4 + 4 + 4  # checkpointed forward, its recomputation, the plain model
    want = adapter_grads(plain)
    for name, g in adapter_grads(ckpt).items():
        torch.testing.assert_close(g, want[name], msg=lambda m, n=name: f"{n}: {m}")


def test_compile_fullgraph_of_a_grouped_decoder_layer():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    ref = tiny()
    model = group_lora_projections(copy.deepcopy(ref))
    x = torch.randn(2, 7, SIZES["hidden_size"], dtype=torch.float64, requires_grad=True)
    pos = ref.model.rotary_emb(x, torch.arange(7)[None].expand(2, 7))
    backend = CompileCounterWithBackend("aot_eager")
    layer = torch.compile(model.model.layers[0], fullgraph=True, backend=backend)

    def step(fn):
        out = fn(x, position_embeddings=pos)
        out = out[0] if isinstance(out, tuple) else out
        (dx,) = torch.autograd.grad(out.square().sum(), x)
        return out, dx

    (y, dx), (y_ref, dx_ref) = step(layer), step(ref.model.layers[0])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    assert backend.frame_count == 1
    targets = [str(n.target) for n in backend.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("fusedpeft.lora_linear_grouped.default") == 2  # q/k/v and gate/up
    assert targets.count("fusedpeft.lora_linear.default") == 2  # o_proj and down_proj alone


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        group_lora_projections("model")
    with pytest.raises(TypeError, match="groups must be a sequence of name tuples"):
        group_lora_projections(Toy(), groups="q_proj")
    with pytest.raises(TypeError, match="each group must be a tuple of child module names"):
        group_lora_projections(Toy(), groups=("q_proj", "k_proj"))
    with pytest.raises(ValueError, match="at least two child names without dots"):
        group_lora_projections(Toy(), groups=(("self_attn.q_proj", "self_attn.k_proj"),))
    with pytest.raises(ValueError, match="at least two child names"):
        group_lora_projections(Toy(), groups=(("q_proj",),))
    with pytest.raises(ValueError, match="a name may appear once across all groups"):
        group_lora_projections(Toy(), groups=(("q_proj", "k_proj"), ("k_proj", "v_proj")))
    with pytest.raises(ValueError, match="groups is empty"):
        group_lora_projections(Toy(), groups=())
    with pytest.raises(TypeError, match="allow_shared_dropout_mask must be a bool"):
        group_lora_projections(Toy(), allow_shared_dropout_mask=1)
    with pytest.raises(TypeError, match="ungroup_lora_projections: model must be a torch.nn.Module"):
        ungroup_lora_projections(None)
