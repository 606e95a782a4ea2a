"""Regressions of issue 19 (fuzzing and bad-input probes): MoRA types 2 / 3 with r_hat larger than a
layer side, content checks under torch.compile, validation gaps, and the decisions on shared
modules, merged state_dicts, the collator's formats and float64 loss weights. load_adapter's
are in test_load_adapter_hardening.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref
from fusedpeft.fused._checks import content_checks_enabled
from helpers import runnable

# ---------------------------------------------------------------------------- item 1


def _delta_types_2_3(M: torch.Tensor, k: int, d: int, mora_type: int) -> torch.Tensor:
    """ΔW [d, k] of types 2 / 3 from the definition: contiguous input groups (the first k mod R hold
    k // R + 1 features); outputs in contiguous groups (type 2) or o mod R (type 3)."""
    R = M.shape[0]

    def group(n, i):
        q, m = divmod(n, R)
        return i // (q + 1) if i < m * (q + 1) else m + (i - m * (q + 1)) // max(q, 1)

    rows = [group(d, o) if mora_type == 2 else o % R for o in range(d)]
    cols = [group(k, i) for i in range(k)]
    return M[rows][:, cols]


@pytest.mark.parametrize("backend", runnable("mora"))
@pytest.mark.parametrize("mora_type", [2, 3])
@pytest.mark.parametrize("k,d,r", [(6, 20, 4), (20, 5, 4), (5, 6, 8)])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_r_hat_above_a_layer_side(backend, mora_type, k, d, r, dropout):
    layer = fp.MoRALinear(nn.Linear(k, d).double(), r=r, mora_type=mora_type, dropout=dropout, backend=backend)
    assert layer.r_hat > min(k, d)
    with torch.no_grad():
        layer.M.normal_()
    x = torch.randn(7, k, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(state)
    seed = int(ref.new_dropout_seed())
    keep = ref.dropout_keep_mask(seed, 7, k, dropout).double() / (1 - dropout) if dropout else 1.0
    M = layer.M.detach().clone().requires_grad_()
    x64 = x.detach().clone().requires_grad_()
    want = layer.base_layer(x64) + (x64 * keep) @ _delta_types_2_3(M, k, d, mora_type).t()
    g = torch.randn_like(want)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(y, (x, layer.M), g)
    expected = torch.autograd.grad(want, (x64, M), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fold_and_reset_into_type_2_keeps_training_on_the_default_backend():
    layer = fp.MoRALinear(nn.Linear(64, 64), r=40, mora_type=1)  # r_hat 72 > 64: valid for type 1
    assert layer.r_hat == 72
    with torch.no_grad():
        layer.M.normal_(0, 0.1)
    assert layer.fold_and_reset() == 2
    with torch.no_grad():
        layer.M.normal_(0, 0.1)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    twin = fp.MoRALinear(nn.Linear(64, 64), r=40, mora_type=2, backend="torch")
    twin.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    twin(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.M.grad, twin.M.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- item 3


def test_content_check_rule(monkeypatch):
    gpu_like = torch.empty(0, device="meta")
    monkeypatch.delenv("FUSEDPEFT_CHECKS", raising=False)
    assert content_checks_enabled(torch.empty(0)) and not content_checks_enabled(gpu_like)
    monkeypatch.setenv("FUSEDPEFT_CHECKS", "1")
    assert content_checks_enabled(gpu_like)


@pytest.mark.slow
@pytest.mark.parametrize("checks", ["0", "1"])
def test_bad_labels_raise_under_torch_compile(monkeypatch, checks):
    monkeypatch.setenv("FUSEDPEFT_CHECKS", checks)
    torch._dynamo.reset()
    logits, hidden, head = torch.randn(4, 7), torch.randn(4, 3), torch.randn(7, 3)

    def both(labels, weights, n):
        return (fp.masked_cross_entropy(logits, labels, token_weights=weights, num_items_in_batch=n)
                + fp.linear_cross_entropy(hidden, head, labels, token_weights=weights, num_items_in_batch=n))

    compiled = torch.compile(both, fullgraph=True)
    good, ones, n = torch.tensor([0, 6, -100, 2]), torch.ones(4), torch.tensor(3)
    torch.testing.assert_close(compiled(good, ones, n), both(good, ones, n))
    with pytest.raises(RuntimeError, match=r"a label is outside \[0, 7\)"):
        compiled(torch.tensor([0, 7, -100, 2]), ones, n)
    with pytest.raises(RuntimeError, match="token_weights has negative entries"):
        compiled(good, torch.tensor([1.0, -1.0, 1.0, 1.0]), n)
    with pytest.raises(RuntimeError, match="num_items_in_batch must be >= 0"):
        compiled(good, ones, torch.tensor(-3))


# ---------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("bad", [True, 1.0, "1", 5])
def test_mora_type_must_be_an_int(bad):
    with pytest.raises(ValueError, match=rf"mora_type must be one of \(1, 2, 3, 4, 6\), got {bad!r}"):
        fp.MoRALinear(nn.Linear(8, 8), r=2, mora_type=bad)
    layer = fp.MoRALinear(nn.Linear(8, 8), r=2, mora_type=1)
    with pytest.raises(ValueError, match="next_type must be one of"):
        layer.fold_and_reset(bad)
    assert layer.mora_type == 1
    with pytest.raises(ValueError, match="types must be a non-empty sequence"):
        fp.ReMoRACallback(every_n_steps=2, types=(bad, 2) if bad != 5 else (5,))


@pytest.mark.parametrize("n", [torch.tensor(-3), torch.tensor(float("nan")), torch.tensor(-0.5)])
def test_num_items_in_batch_tensor_must_be_non_negative(n):
    logits, labels = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0 and finite"):
        fp.masked_cross_entropy(logits, labels, num_items_in_batch=n)
    with pytest.raises(ValueError, match="one-element real tensor"):
        fp.masked_cross_entropy(logits, labels, num_items_in_batch=torch.tensor(True))


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
def test_float8_is_refused_on_every_backend(backend):
    labels = torch.tensor([0, 1, 2])
    f8 = torch.float8_e4m3fn
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor \(float16, bfloat16"):
        fp.masked_cross_entropy(torch.randn(3, 5).to(f8), labels, backend=backend)
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        fp.linear_cross_entropy(torch.randn(3, 4).to(f8), torch.randn(5, 4).to(f8), labels, backend=backend)


@pytest.mark.parametrize("cls", [fp.LoRALinear, fp.MoRALinear])
@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_zero_width_layers_are_refused(cls, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about initialising a zero-element weight
        base = nn.Linear(*shape)
    with pytest.raises(ValueError, match=rf"in_features >= 1 and out_features >= 1, got a {shape[0]} -> {shape[1]}"):
        cls(base, r=2)
    model = nn.ModuleDict({"q_proj": base, "v_proj": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"layer 'q_proj' \(\d->\d\).*in_features >= 1"):
        fp.apply_lora(model, ["q_proj", "v_proj"])
    assert type(model["v_proj"]) is nn.Linear and model["v_proj"].weight.requires_grad


def test_zero_hidden_size_is_refused():
    with pytest.raises(ValueError, match=r"V, H >= 1; got weight shape \(5, 0\)"):
        fp.linear_cross_entropy(torch.randn(3, 0), torch.randn(5, 0), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------- item 6


def test_one_linear_under_two_names_gets_one_shared_adapter():
    shared = nn.Linear(6, 6)
    model = nn.Module()
    model.a, model.b = nn.Module(), nn.Module()
    model.a.q_proj = model.b.q_proj = shared
    fp.apply_lora(model, ["q_proj"], r=2)
    assert isinstance(model.a.q_proj, fp.LoRALinear) and model.a.q_proj is model.b.q_proj
    fp.merge_adapters(model)
    assert model.a.q_proj is shared and model.b.q_proj is shared
    fp.apply_mora(model, ["q_proj"], r=2)
    assert isinstance(model.b.q_proj, fp.MoRALinear) and model.a.q_proj is model.b.q_proj


def test_state_dict_of_a_merged_layer_warns():
    layer = fp.LoRALinear(nn.Linear(4, 4), r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.state_dict()  # unmerged: silent
    layer.merge()
    with pytest.warns(UserWarning, match="ΔW would count twice"):
        state = layer.state_dict()
    fresh = fp.LoRALinear(nn.Linear(4, 4), r=2)
    fresh.load_state_dict(state)
    fresh.merged = True  # the documented way: load a merged state into a merged layer
    x = torch.randn(2, 4)
    torch.testing.assert_close(fresh(x), layer(x))


def test_collator_refuses_an_example_with_both_formats():
    from test_collator import word_tokenizer

    example = {"prompt": "two", "completion": "four", "messages": [{"role": "user", "content": "two"}]}
    with pytest.raises(ValueError, match="both 'messages' and 'prompt'/'completion'"):
        fp.InstructionCollator(word_tokenizer())([example])


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
def test_float64_loss_keeps_instruction_weight_in_float64(backend):
    logits = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mask = torch.tensor([True, True, False, False, True, False])
    w = torch.where(mask, torch.tensor(0.1, dtype=torch.float64), 1.0)
    nll = -torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    want = (w * nll).sum() / w.sum()
    got = fp.masked_cross_entropy(logits, labels, instruction_mask=mask, instruction_weight=0.1, backend=backend)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
