"""patch_causal_lm on real transformers models (random weights from tiny configs, no downloads).

- the patched loss and every parameter gradient equal HF's own loss (float64 HF as the truth,
  float32 HF as the same-dtype baseline), with and without num_items_in_batch, for Llama,
  Mistral, Qwen2, Gemma2 (final_logit_softcapping), Phi-3, Phi (lm_head bias), Cohere
  (logit_scale) and Granite (logits_scaling);
- instruction_mask / token_weights against a hand-computed weighted loss on HF's logits;
- gradient-accumulation correctness; no labels -> the unpatched output; the Trainer with the
  collator, instruction weighting and num_items_in_batch; bad input;
- torch.compile(fullgraph=True) of a decoder layer holding LoRALinear layers;
- the memory target: peak extra memory of a training step at seq 1024, vocab 32000 <= 40% of HF's.
"""

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
import transformers

import fusedpeft as fp
from helpers import assert_within
from test_collator import word_tokenizer

V = 131  # odd vocabulary


def _config(name):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if name == "mistral":
        return transformers.MistralConfig(**common), transformers.MistralForCausalLM
    if name == "qwen2":
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    if name == "gemma2":
        return (transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.7,
                                          attn_implementation="eager"), transformers.Gemma2ForCausalLM)
    if name == "phi3":
        return transformers.Phi3Config(**common), transformers.Phi3ForCausalLM
    if name == "phi":
        return transformers.PhiConfig(**common), transformers.PhiForCausalLM
    if name == "cohere":
        return transformers.CohereConfig(**common, logit_scale=0.6), transformers.CohereForCausalLM
    if name == "granite":
        return transformers.GraniteConfig(**common, logits_scaling=1.7), transformers.GraniteForCausalLM
    raise KeyError(name)


FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "phi3", "phi", "cohere", "granite"]


def _model(name):
    config, cls = _config(name)
    torch.manual_seed(0)
    return cls(config).eval()


def _batch(b=3, t=11):
    ids = torch.randint(3, V, (b, t))
    attention = torch.ones(b, t, dtype=torch.long)
    attention[1, -3:] = 0
    labels = ids.clone()
    labels[1, -3:] = -100
    labels[0, :4] = -100
    return ids, attention, labels


def _loss_and_grads(model, **batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch).loss
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("family,num_items", [(f, n) for f in FAMILIES for n in (None, "tensor")] + [("llama", "int")])
def test_loss_and_grads_match_hf(family, num_items):
    model = _model(family)
    if family == "phi":
        assert model.lm_head.bias is not None
    ids, attention, labels = _batch()
    batch = dict(input_ids=ids, attention_mask=attention, labels=labels)
    if num_items is not None:
        count = int(labels[:, 1:].ne(-100).sum()) + 5  # a window larger than this micro-batch
        batch["num_items_in_batch"] = torch.tensor(count) if num_items == "tensor" else count
    expected = _loss_and_grads(copy.deepcopy(model).double(), **batch)
    baseline = _loss_and_grads(model, **batch)
    actual = _loss_and_grads(fp.patch_causal_lm(model), **batch)
    assert actual[0].dtype == torch.float32
    assert_within(actual[0], expected[0], baseline[0], 1e-5, "loss")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, g64, g32 in zip(names, actual[1], expected[1], baseline[1]):
        if g64 is None:
            assert g is None, name
            continue
        assert_within(g, g64, g32, 1e-5, name)


def test_logits_are_not_materialised_with_labels_and_unchanged_without():
    model = _model("gemma2")
    ids, attention, labels = _batch()
    before = model(input_ids=ids, attention_mask=attention)
    fp.patch_causal_lm(model, instruction_weight=0.5)
    after = model(input_ids=ids, attention_mask=attention, instruction_mask=torch.ones_like(ids, dtype=torch.bool))
    assert torch.equal(before.logits, after.logits)
    assert after.loss is None
    trained = model(input_ids=ids, attention_mask=attention, labels=labels)
    assert trained.logits is None and trained.loss.dim() == 0
    as_tuple = model(ids, attention, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], trained.loss)


def _hand_weighted_loss(logits, labels, weights, denominator=None):
    """HF's shift by hand: position t predicts labels[t + 1]; weights [B, T] aligned with labels."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target = labels[:, 1:]
    valid = target.ne(-100)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = weights[:, 1:].double() * valid
    return (w * nll).sum() / (w.sum() if denominator is None else denominator)


@pytest.mark.parametrize("instruction_weight", [0.0, 0.3, 1.0])
def test_instruction_mask_and_token_weights(instruction_weight):
    model = _model("llama").double()
    ids, attention, labels = _batch()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :6] = True
    token_weights = torch.rand(ids.shape, dtype=torch.float64) * 2
    logits = model(input_ids=ids, attention_mask=attention).logits.detach()
    fp.patch_causal_lm(model, instruction_weight=instruction_weight)
    # float64 weights: a float64 loss must not round instruction_weight to float32
    inst = torch.where(mask, torch.tensor(instruction_weight, dtype=torch.float64), 1.0)
    loss = model(input_ids=ids, attention_mask=attention, labels=labels, instruction_mask=mask).loss
    torch.testing.assert_close(loss, _hand_weighted_loss(logits, labels, inst), rtol=1e-10, atol=1e-12)
    loss = model(input_ids=ids, attention_mask=attention, labels=labels, instruction_mask=mask,
                 token_weights=token_weights).loss
    torch.testing.assert_close(loss, _hand_weighted_loss(logits, labels, inst * token_weights), rtol=1e-10,
                               atol=1e-12)
    loss = model(input_ids=ids, attention_mask=attention, labels=labels, instruction_mask=mask,
                 num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(loss, _hand_weighted_loss(logits, labels, inst, 40.0), rtol=1e-10, atol=1e-12)


def test_shift_labels_are_used_as_given():
    """HF's already-shifted targets (padding-free collators): masks are then taken as already shifted."""
    model = fp.patch_causal_lm(_model("llama").double(), instruction_weight=0.25)
    ids, attention, labels = _batch()
    mask = torch.rand(ids.shape) < 0.5
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    shifted_mask = torch.cat([mask[:, 1:], torch.zeros(3, 1, dtype=torch.bool)], 1)
    expected = model(input_ids=ids, attention_mask=attention, labels=labels, instruction_mask=mask).loss
    actual = model(input_ids=ids, attention_mask=attention, labels=labels, shift_labels=shifted,
                   instruction_mask=shifted_mask).loss
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


def test_gradient_accumulation_equals_full_batch():
    """Two micro-batches with num_items_in_batch = the window's target count sum to the full-batch mean."""
    model = fp.patch_causal_lm(_model("qwen2").double(), instruction_weight=1.0)
    ids, attention, labels = _batch(b=4)
    labels[2, :7] = -100
    total = labels[:, 1:].ne(-100).sum()
    params = list(model.parameters())
    full = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    full_grads = torch.autograd.grad(full, params)
    parts = [model(input_ids=ids[s], attention_mask=attention[s], labels=labels[s], num_items_in_batch=total).loss
             for s in (slice(0, 1), slice(1, 4))]
    part_grads = torch.autograd.grad(parts[0] + parts[1], params)
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-12, atol=0)
    for a, b in zip(part_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_signature_and_trainer_flags():
    model = fp.patch_causal_lm(_model("llama"))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "instruction_mask", "token_weights"} <= set(params)
    assert any(p.kind == p.VAR_KEYWORD for p in params.values())
    assert model.accepts_loss_kwargs is True
    fp.patch_causal_lm(model, instruction_weight=0.2)  # patching again replaces the keywords
    assert model._fusedpeft_patch["options"]["instruction_weight"] == 0.2
    assert list(inspect.signature(model.forward).parameters).count("instruction_mask") == 1


def _trainer(model, dataset, collator, tmp_path, remove_unused_columns):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1,
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                          remove_unused_columns=remove_unused_columns, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def _spy(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen


def test_trainer_with_collator_and_instruction_weighting(tmp_path):
    tok = word_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = fp.patch_causal_lm(transformers.LlamaForCausalLM(config), instruction_weight=0.1)
    seen = _spy(model)
    data = [{"prompt": "what is two plus two", "completion": "four"},
            {"prompt": "and three plus three", "completion": "six"},
            {"messages": [{"role": "user", "content": "be brief"}, {"role": "assistant", "content": "ok"}]},
            {"prompt": "two plus two", "completion": "four thanks"}] * 2
    trainer = _trainer(model, data, fp.InstructionCollator(tok, pad_to_multiple_of=4), tmp_path, False)
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert len(seen) == 8
    for kwargs in seen:
        assert kwargs["instruction_mask"].dtype == torch.bool and kwargs["instruction_mask"].any()
        assert torch.is_tensor(kwargs["num_items_in_batch"])


def test_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    """One SGD step: 2 micro-batches of 2 (num_items_in_batch from the Trainer) == one batch of 4."""
    tok = word_tokenizer()
    data = [{"prompt": "what is two plus two", "completion": "four"},
            {"prompt": "two", "completion": "four and six thanks"},
            {"messages": [{"role": "user", "content": "be brief"}, {"role": "assistant", "content": "ok"}]},
            {"prompt": "and three plus three plus three", "completion": "six"}]
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    after = []
    for batch_size, accumulation in ((2, 2), (4, 1)):
        torch.manual_seed(0)
        model = fp.patch_causal_lm(transformers.LlamaForCausalLM(config).double(), instruction_weight=0.3)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(batch_size)), max_steps=1,
                                              per_device_train_batch_size=batch_size,
                                              gradient_accumulation_steps=accumulation, learning_rate=1.0,
                                              optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                                              save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                              remove_unused_columns=False, dataloader_num_workers=0)
        transformers.Trainer(model=model, args=args, train_dataset=data,
                             data_collator=fp.InstructionCollator(tok)).train()
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(after[0], after[1], rtol=1e-10, atol=1e-12)


def test_trainer_keeps_pretokenized_mask_columns(tmp_path):
    """remove_unused_columns=True (the default) keeps instruction_mask / token_weights: forward declares them."""
    model = fp.patch_causal_lm(_model("llama"))
    seen = _spy(model)
    ids, attention, labels = _batch(b=4, t=8)
    rows = [dict(input_ids=ids[i], attention_mask=attention[i], labels=labels[i], text="dropped",
                 instruction_mask=torch.arange(8) < 3, token_weights=torch.full((8,), 0.5)) for i in range(4)]
    _trainer(model, rows, transformers.default_data_collator, tmp_path, True).train()
    assert "text" not in seen[0]
    assert seen[0]["instruction_mask"].shape == (2, 8) and seen[0]["token_weights"].shape == (2, 8)


def test_bad_input():
    model = _model("llama")
    with pytest.raises(TypeError, match="unknown loss keyword"):
        fp.patch_causal_lm(model, instruction_mask=True)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fp.patch_causal_lm(model, reduction="none")
    with pytest.raises(ValueError, match="instruction_weight"):
        fp.patch_causal_lm(model, instruction_weight=-1.0)
    with pytest.raises(ValueError, match="contradicts the model's final_logit_softcapping"):
        fp.patch_causal_lm(_model("gemma2"), softcap=30.0)
    with pytest.raises(TypeError, match="HF \\*ForCausalLM"):
        fp.patch_causal_lm(torch.nn.Linear(2, 2))
    fp.patch_causal_lm(model)
    ids, attention, labels = _batch()
    with pytest.raises(ValueError, match="instruction_mask has shape \\(3, 10\\) but must have the shape of labels"):
        model(input_ids=ids, labels=labels, instruction_mask=torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    with pytest.raises(ValueError, match="token_weights"):
        model(input_ids=ids, labels=labels, token_weights=-torch.ones(ids.shape))
    fp.apply_lora(model, target_modules=["lm_head"])
    with pytest.raises(TypeError, match="lm_head must be a plain nn.Linear"):
        model(input_ids=ids, labels=labels)


def test_compile_fullgraph_decoder_layer_with_lora():
    model = fp.apply_lora(_model("llama"), r=4)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, fp.LoRALinear) and isinstance(layer.mlp.down_proj, fp.LoRALinear)
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; give the adapters a non-trivial value
    hidden = torch.randn(2, 7, 32)
    position_ids = torch.arange(7).expand(2, 7)
    rope = model.model.rotary_emb(hidden, position_ids)

    def run(fn):
        x = hidden.clone().requires_grad_()
        out = fn(x, position_embeddings=rope, position_ids=position_ids)
        out = out[0] if isinstance(out, tuple) else out
        trainable = [p for p in layer.parameters() if p.requires_grad]
        return (out, *torch.autograd.grad(out.square().sum(), [x, *trainable]))

    eager = run(layer)
    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_memory_target_seq1024_vocab32000():
    """Peak extra memory of a full training step (forward + backward): patched <= 40% of HF's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.memory import cpu_peak_extra_bytes

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 32000, (1, 1024))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    step()
    hf = cpu_peak_extra_bytes(step)
    fp.patch_causal_lm(model)
    step()
    fused = cpu_peak_extra_bytes(step)
    logits_bytes = 1024 * 32000 * 4
    assert hf > 2 * logits_bytes, "the HF step must hold several logits-sized buffers"
    assert fused <= 0.4 * hf, f"patched peak {fused / 2**20:.1f} MiB > 40% of HF's {hf / 2**20:.1f} MiB"
