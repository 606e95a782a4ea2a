"""TRL (1.16): SFTTrainer / DPOTrainer compute the LM head with fusedpeft's kernels.

A patch_causal_lm model trained by fusedpeft.integrations.trl.SFTTrainer must give the loss and
gradients of TRL's own fused head (trl.SFTTrainer on the same unpatched model, float64), with
fusedpeft's chunk step counted and TRL's ChunkedLogProbFunction never run; completion-only,
assistant-only and a prompt-loss weight in (0, 1) (against a float64 full-logits reference).
"""

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import fusedpeft as fp  # noqa: E402
from fusedpeft import backends  # noqa: E402
from fusedpeft.integrations import trl as fp_trl  # noqa: E402
from fusedpeft.host import log_probs as host_log_probs  # noqa: E402
from helpers import runnable  # noqa: E402
from test_collator import word_tokenizer  # noqa: E402

from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402


def _tiny_llama(tok, seed=0):
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).double()


@pytest.fixture
def counts(monkeypatch):
    """Calls of TRL's head kernel, of fusedpeft's per-token chunk pass and of its CE backward."""
    seen = {"trl": 0, "fusedpeft_forward": 0, "fusedpeft_backward": 0}

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            seen[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ChunkedLogProbFunction, "forward",
                        staticmethod(counting("trl", ChunkedLogProbFunction.forward)))
    monkeypatch.setattr(host_log_probs, "linear_log_probs_forward",
                        counting("fusedpeft_forward", host_log_probs.linear_log_probs_forward))
    module = backends.implementation("cross_entropy", backends.resolve_backend("cross_entropy", None,
                                                                                torch.device("cpu")))
    monkeypatch.setattr(module, "linear_cross_entropy_backward",
                        counting("fusedpeft_backward", module.linear_cross_entropy_backward))
    return seen


def _sft_args(tmp_path, **kwargs):
    return trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, learning_rate=0.5, optim="sgd",
                         lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to=[],
                         use_cpu=True, bf16=False, disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
                         seed=0, **kwargs)


TOKENS = [[2, 7, 9, 10, 11, 12, 11, 13, 3], [2, 16, 14, 15, 3], [2, 7, 8, 9, 12, 17, 18, 3], [2, 13, 10, 3],
          [2, 6, 12, 11, 15, 14, 3], [2, 19, 3]]


def _pretokenized(kind):
    rows = []
    for i, ids in enumerate(TOKENS):
        prompt = 1 + i % (len(ids) - 2)
        row = {"input_ids": ids}
        if kind == "completion_only":
            row["completion_mask"] = [0] * prompt + [1] * (len(ids) - prompt)
        if kind == "assistant_only":
            row["assistant_masks"] = [1 if j % 3 != 1 else 0 for j in range(len(ids))]
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _first_step(trainer):
    """(loss, {name: grad}) of compute_loss on the first training batch."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    num_items = (batch["labels"][:, 1:] != -100).sum()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["completion_only", "assistant_only", "all_tokens"])
def test_sft_matches_trl_head_and_runs_fusedpeft(kind, tmp_path, counts):
    tok = word_tokenizer()
    extra = {"completion_only_loss": True} if kind == "completion_only" else {}
    theirs = trl.SFTTrainer(model=_tiny_llama(tok), args=_sft_args(tmp_path / "trl", **extra),
                            train_dataset=_pretokenized(kind), processing_class=tok)
    ours_model = fp.patch_causal_lm(_tiny_llama(tok))
    ours = fp_trl.SFTTrainer(model=ours_model, args=_sft_args(tmp_path / "fp", **extra),
                             train_dataset=_pretokenized(kind), processing_class=tok)
    assert ours_model._fusedpeft_patch["trl_head"]["outputs"] == ("log_probs", "entropy", "is_top1")
    assert "_fused_forward" not in ours_model.forward.__qualname__  # TRL's head was not installed
    loss_theirs, grads_theirs = _first_step(theirs)
    assert counts["trl"] == 1 and counts["fusedpeft_forward"] == 0
    loss_ours, grads_ours = _first_step(ours)
    assert counts["trl"] == 1 and counts["fusedpeft_forward"] == 1 and counts["fusedpeft_backward"] == 1
    # TRL's head keeps its statistics in float32 even for a float64 model: compare at float32 precision
    torch.testing.assert_close(loss_ours, loss_theirs.double(), rtol=1e-5, atol=1e-6)
    assert grads_ours.keys() == grads_theirs.keys() and "lm_head.weight" in grads_ours
    for name in grads_theirs:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    # ... and at float64 precision against the patched model's own loss (fusedpeft's linear CE)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    ours_model.zero_grad()
    ours_model(**batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum()).loss.backward()
    for name, p in ours_model.named_parameters():
        torch.testing.assert_close(grads_ours[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    # a few optimizer steps: the same losses, the same entropy / accuracy metrics, the same weights
    theirs.args.max_steps = ours.args.max_steps = 2
    theirs.train()
    ours.train()
    assert counts["trl"] == 1 + 2 and counts["fusedpeft_forward"] == 1 + 2
    logs_theirs = [h for h in theirs.state.log_history if "loss" in h]
    logs_ours = [h for h in ours.state.log_history if "loss" in h]
    for a, b in zip(logs_ours, logs_theirs, strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_sft_prompt_loss_weight(weight, tmp_path, counts):
    """InstructionCollator batches: loss = sum_t w_t l_t / (labels != -100), w_t = weight on prompt
    tokens; equal to patch_causal_lm's own loss (HF path) and to a float64 full-logits reference."""
    tok = word_tokenizer()
    data = [{"prompt": "what is two plus two", "completion": "four"},
            {"prompt": "and three plus three", "completion": "six thanks"},
            {"prompt": "be brief", "completion": "ok"}]
    model = fp.patch_causal_lm(_tiny_llama(tok), instruction_weight=weight)
    reference = copy.deepcopy(model._fusedpeft_patch["original"].__self__)
    trainer = fp_trl.SFTTrainer(model=model, args=_sft_args(tmp_path, remove_unused_columns=False,
                                                            dataset_kwargs={"skip_prepare_dataset": True}),
                                train_dataset=datasets.Dataset.from_list(data), processing_class=tok,
                                data_collator=fp.InstructionCollator(tok))
    loss, grads = _first_step(trainer)
    assert counts["fusedpeft_forward"] == 1 and counts["trl"] == 0
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels, prompt = batch["labels"][:, 1:], batch["instruction_mask"][:, 1:]
    assert prompt.any() and (~prompt & (labels != -100)).any()
    # the patched model's own fused linear cross-entropy on the same batch
    model.zero_grad()
    hf_loss = model(**batch, num_items_in_batch=(labels != -100).sum()).loss
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss.detach(), rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-11, msg=name)
    # float64 full-logits reference
    ref_batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = reference(**ref_batch).logits[:, :-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = (labels != -100).double() * torch.where(prompt, torch.tensor(weight, dtype=torch.float64), 1.0)
    expected = (w * nll).sum() / (labels != -100).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)
    ref_grads = dict(reference.named_parameters())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name].grad, rtol=1e-8, atol=1e-10, msg=name)


def test_dpo_matches_trl_head(tmp_path, counts):
    tok = word_tokenizer()
    data = datasets.Dataset.from_list([
        {"prompt": "what is two plus two", "chosen": "four", "rejected": "six thanks"},
        {"prompt": "and three plus three", "chosen": "six", "rejected": "four"}])

    def args(name):
        return trl.DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, learning_rate=0.5,
                             optim="sgd", max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True,
                             bf16=False, disable_tqdm=True, dataloader_num_workers=0, seed=0)

    theirs = trl.DPOTrainer(model=_tiny_llama(tok), ref_model=_tiny_llama(tok, seed=1), args=args("trl"),
                            train_dataset=data, processing_class=tok)
    ours = fp_trl.DPOTrainer(model=fp.patch_causal_lm(_tiny_llama(tok)),
                             ref_model=fp.patch_causal_lm(_tiny_llama(tok, seed=1)), args=args("fp"),
                             train_dataset=data, processing_class=tok)
    trl_calls = counts["trl"]
    loss_ours, grads_ours = _dpo_step(ours)
    assert counts["trl"] == trl_calls and counts["fusedpeft_forward"] == 1  # the policy; the reference: log p alone
    loss_theirs, grads_theirs = _dpo_step(theirs)
    assert counts["trl"] == trl_calls + 2
    torch.testing.assert_close(loss_ours, loss_theirs.to(loss_ours.dtype), rtol=1e-5, atol=1e-6)
    for name in grads_theirs:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def _dpo_step(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", runnable("cross_entropy"))
def test_fused_lm_head_call_on_every_backend(backend):
    """model(..., labels, fused_lm_head=True) against TRL's head on the same model: every field,
    gradients of log_probs and entropy; shift_labels; temperature through add_fused_lm_head."""
    tok = word_tokenizer()
    base = _tiny_llama(tok)
    theirs = copy.deepcopy(base)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    trl.trainer.utils.add_fused_lm_head(theirs, temperature=0.7, outputs=outputs)
    ours = fp.patch_causal_lm(base, backend=backend)
    fp_trl.add_fused_lm_head(ours, temperature=0.7, outputs=outputs)
    torch.manual_seed(1)
    input_ids = torch.randint(0, len(tok), (2, 7))
    labels = input_ids.masked_fill(torch.rand(2, 7) < 0.3, -100)
    for call in ({"labels": labels}, {"shift_labels": labels}):
        a = ours(input_ids=input_ids, fused_lm_head=True, **call)
        b = theirs(input_ids=input_ids, fused_lm_head=True, **call)
        assert isinstance(a, trl.trainer.utils.FusedCausalLMOutput)
        for key in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
            torch.testing.assert_close(a[key].double() if key != "is_top1" else a[key],
                                       b[key].double() if key != "is_top1" else b[key], rtol=1e-5, atol=1e-6, msg=key)
        g = torch.randn_like(a.log_probs, dtype=torch.float64)
        params = [ours.lm_head.weight, ours.model.norm.weight]
        ga = torch.autograd.grad((g * a.log_probs).sum() + (g * a.entropy).sum(), params)
        gb = torch.autograd.grad((g * b.log_probs.double()).sum() + (g * b.entropy.double()).sum(),
                                 [theirs.lm_head.weight, theirs.model.norm.weight])
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # log p alone at temperature 1: the backend's own cross-entropy kernels, forward and backward
    fp_trl.add_fused_lm_head(ours)
    a = ours(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert a.entropy is None and a.is_top1 is None
    g = torch.randn_like(a.log_probs)
    ga = torch.autograd.grad((g * a.log_probs).sum(), ours.lm_head.weight)[0]
    hidden = ours.model(input_ids=input_ids).last_hidden_state[:, :-1]
    logp = torch.log_softmax(ours.lm_head(hidden), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    logp = logp * (labels[:, 1:] != -100)
    torch.testing.assert_close(a.log_probs, logp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, torch.autograd.grad((g * logp).sum(), ours.lm_head.weight)[0], rtol=1e-10,
                               atol=1e-12)


def test_bad_calls_are_clear():
    tok = word_tokenizer()
    model = fp.patch_causal_lm(_tiny_llama(tok))
    ids = torch.randint(0, len(tok), (1, 5))
    with pytest.raises(ValueError, match=r"fused_lm_head=True\): needs labels"):
        model(input_ids=ids, fused_lm_head=True)
    with pytest.raises(ValueError, match="unknown output"):
        fp_trl.add_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fp_trl.add_fused_lm_head(model, temperature=0.0)
    with pytest.raises(ValueError, match="instruction_mask has shape"):
        model(input_ids=ids, labels=ids, instruction_mask=torch.ones(1, 4, dtype=torch.bool), fused_lm_head=True)
    with pytest.raises(ValueError, match="output_router_logits"):
        model(input_ids=ids, labels=ids, output_router_logits=True, fused_lm_head=True)


def test_context_restores_trl():
    original = trl.trainer.sft_trainer.add_fused_lm_head
    with fp_trl.trl_fused_lm_head():
        assert trl.trainer.sft_trainer.add_fused_lm_head is fp_trl.add_fused_lm_head
        assert trl.trainer.dpo_trainer.add_fused_lm_head is fp_trl.add_fused_lm_head
    assert trl.trainer.sft_trainer.add_fused_lm_head is original
