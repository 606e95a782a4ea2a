"""Checkpoints of an adapted model round-trip: Trainer checkpoints and save_pretrained write the
base weights under their own names plus a PEFT-format adapter, so a plain from_pretrained restores
the adapted model exactly (never a silently re-initialised one), fp.load_adapter and
peft.PeftModel.from_pretrained load the adapter alone, and resuming gives the uninterrupted loss
curve."""

from __future__ import annotations

import os

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import fusedpeft as fp

CONFIG = dict(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def _base(path) -> str:
    """A random tiny Llama saved at ``path`` (the "pretrained" base model)."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
    return str(path)


def _adapted(base: str, dropout: float = 0.0, kind: str = "lora"):
    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    if kind == "lora":
        model = fp.apply_lora(model, r=4, lora_alpha=8, lora_dropout=dropout)
    else:
        model = fp.apply_mora(model, target_modules=["q_proj", "v_proj"], r=4)
    with torch.no_grad():  # non-zero B / M, or a lost adapter would go unnoticed
        for module in model.modules():
            if isinstance(module, fp.LoRALinear):
                module.lora_B.weight.normal_(0.0, 0.2)
            elif isinstance(module, fp.MoRALinear):
                module.M.normal_(0.0, 0.2)
    return model


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))


def test_save_pretrained_restores_exactly_through_every_loading_path(tmp_path):
    base = _base(tmp_path / "base")
    model = _adapted(base)
    want = _logits(model, IDS)
    model.save_pretrained(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= files
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("base_layer" in k for k in keys)

    plain = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")  # base weights + the adapter, via PEFT
    assert torch.allclose(_logits(plain, IDS), want, atol=1e-6, rtol=0)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.allclose(_logits(auto, IDS), want, atol=1e-6, rtol=0)
    ours = fp.load_adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "ckpt")
    assert torch.equal(_logits(ours, IDS), want)
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "ckpt")
    assert torch.allclose(_logits(theirs, IDS), want, atol=1e-6, rtol=0)


def test_a_checkpoint_loads_back_into_the_adapted_model_with_every_key_matched(tmp_path):
    model = _adapted(_base(tmp_path / "base"))
    want = _logits(model, IDS)
    model.save_pretrained(tmp_path / "ckpt")
    from safetensors.torch import load_file

    fresh = fp.apply_lora(LlamaForCausalLM(LlamaConfig(**CONFIG)), r=4, alpha=8.0)  # other random weights
    result = fresh.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(_logits(fresh, IDS), want)


def test_merged_layers_refuse_to_save_and_merge_adapters_saves_a_plain_model(tmp_path):
    model = _adapted(_base(tmp_path / "base"))
    want = _logits(model, IDS)
    layer = next(m for m in model.modules() if isinstance(m, fp.LoRALinear))
    layer.merge()
    with pytest.raises(ValueError, match="are merged .* apply it twice"):
        model.save_pretrained(tmp_path / "bad")
    layer.unmerge()
    fp.merge_adapters(model).save_pretrained(tmp_path / "merged")
    assert "adapter_config.json" not in os.listdir(tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(_logits(plain, IDS), want, atol=1e-5, rtol=0)


def test_a_mora_checkpoint_never_loads_silently_wrong(tmp_path):
    """PEFT has no MoRA: from_pretrained of a MoRA checkpoint must fail, or give the adapted outputs."""
    base = _base(tmp_path / "base")
    model = _adapted(base, kind="mora")
    want = _logits(model, IDS)
    model.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(_logits(fp.load_adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "ckpt"), IDS), want)
    try:
        loaded = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    except Exception:  # noqa: BLE001 - failing loudly is allowed
        return
    assert torch.allclose(_logits(loaded, IDS), want, atol=1e-6, rtol=0)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, length=10):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 61, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(base: str, out, resume=None, max_steps=6) -> tuple[list[float], object]:
    model = fp.patch_causal_lm(_adapted(base, dropout=0.1))
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, save_steps=3, report_to=[], use_cpu=True,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return losses, model


@pytest.mark.slow
def test_trainer_checkpoints_restore_and_resume_gives_the_same_loss_curve(tmp_path):
    base = _base(tmp_path / "base")
    full, trained = _train(base, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= set(os.listdir(checkpoint))
    resumed, _ = _train(base, tmp_path / "run", resume=str(checkpoint))
    assert max(resumed) == 6  # the log history of the first 3 steps comes back from the checkpoint
    for step in (4, 5, 6):  # dropout on: the Philox seeds come from the restored torch RNG state
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, resumed, full)
    final = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-6")
    assert torch.allclose(_logits(final, IDS), _logits(trained, IDS), atol=1e-5, rtol=0)
