"""QLoRA end to end: merge / unmerge / merge_adapters on quantized bases, and a tiny Llama
loaded by transformers with BitsAndBytesConfig on CPU (4-bit and 8-bit): apply_lora / apply_mora,
Trainer steps, save_adapter, reloaded into PEFT with the same logits."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fusedpeft as fp
from qlora_helpers import bnb, linear4bit, linear8bit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _adapted(base, cls):
    layer = fp.LoRALinear(base, r=4) if cls == "lora" else fp.MoRALinear(base, r=4)
    with torch.no_grad():
        (layer.lora_B.weight if cls == "lora" else layer.M).normal_(std=0.05)
    return layer


@pytest.mark.parametrize("cls", ["lora", "mora"])
@pytest.mark.parametrize("quant_type,double_quant,dtype", [("nf4", True, torch.float32), ("fp4", False, torch.bfloat16)])
def test_merge_requantizes_with_the_layers_own_settings(cls, quant_type, double_quant, dtype):
    import bitsandbytes.functional as F

    base = linear4bit(128, 64, dtype, quant_type, double_quant, blocksize=128)
    layer = _adapted(base, cls)
    x = torch.randn(6, 128, dtype=dtype)
    with torch.no_grad():
        W = F.dequantize_4bit(base.weight.data, base.weight.quant_state)
        target = W + layer.delta_weight()
        with pytest.warns(UserWarning, match="re-quantizes its weight"):
            layer.merge()
        merged = layer.base_layer
        assert isinstance(merged, bnb.nn.Linear4bit) and layer.merged
        state = merged.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested, state.dtype) == (quant_type, 128, double_quant, dtype)
        q, qs = F.quantize_4bit(target, blocksize=128, quant_type=quant_type, compress_statistics=double_quant)
        torch.testing.assert_close(F.dequantize_4bit(merged.weight.data, state), F.dequantize_4bit(q, qs))
        assert torch.equal(layer(x), merged(x))  # a merged layer is the plain base layer
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.unmerge()
        assert not layer.merged and isinstance(layer.base_layer, bnb.nn.Linear4bit)


@pytest.mark.parametrize("cls", ["lora", "mora"])
@pytest.mark.parametrize("eight_bit", [False, True])
def test_merge_adapters_dequantize_returns_a_plain_linear(cls, eight_bit):
    base = linear8bit(128, 64) if eight_bit else linear4bit(128, 64, torch.bfloat16, "nf4", True)
    x = torch.randn(5, 128, dtype=torch.float16 if eight_bit else torch.bfloat16)
    model = nn.Sequential(_adapted(base, cls))
    with torch.no_grad():
        want = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no re-quantization, so no rounding warning
            merged = fp.merge_adapters(model, dequantize=True)
        linear = merged[0]
        assert type(linear) is nn.Linear and linear.weight.dtype == (torch.float16 if eight_bit else torch.bfloat16)
        assert not linear.weight.requires_grad
        got = linear(x)
    # the 8-bit layer's own output quantizes x to int8; the merged linear does not
    tol = 3e-2 if eight_bit else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


def test_merge_adapters_requantizes_by_default_and_8bit_merge():
    model = nn.Sequential(_adapted(linear4bit(128, 64), "lora"), _adapted(linear8bit(64, 32), "lora"))
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = fp.merge_adapters(model)
    assert isinstance(merged[0], bnb.nn.Linear4bit) and isinstance(merged[1], bnb.nn.Linear8bitLt)
    assert merged(torch.randn(3, 128)).shape == (3, 32)


# ------------------------------------------------------------------ tiny Llama through transformers


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(path, eight_bit=False):
    """transformers' own 4-bit / 8-bit loading, on CPU (bitsandbytes >= 0.46 quantizes there)."""
    q = (transformers.BitsAndBytesConfig(load_in_8bit=True) if eight_bit else
         transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32))
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                             dtype=torch.float32)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, length=12):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, 97, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_llama_4bit_trainer_save_and_reload_in_peft(llama_dir, tmp_path):
    model = load_quantized(llama_dir)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    fp.apply_lora(model, r=4, alpha=8.0)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, fp.LoRALinear) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)
    result = transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert layer.lora_B.weight.abs().sum() > 0  # trained away from its zero init
    fp.save_adapter(model, tmp_path / "adapter")
    # training mode (dropout is 0): in eval mode without grad, bitsandbytes' Linear4bit repacks its
    # weight for a different CPU kernel on AVX512-BF16 machines, which rounds differently
    reloaded = peft.PeftModel.from_pretrained(load_quantized(llama_dir), tmp_path / "adapter").train()
    model.train()
    ids = _Tokens(2, 10).ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits, rtol=1e-4, atol=1e-4)


def test_llama_8bit_apply_mora_trains(llama_dir):
    model = load_quantized(llama_dir, eight_bit=True)
    fp.apply_mora(model, r=4)
    assert isinstance(model.model.layers[1].mlp.down_proj.base_layer, bnb.nn.Linear8bitLt)
    ids = _Tokens(2, 10).ids
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith(".M")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_patch_causal_lm_on_a_4bit_model(llama_dir):
    """patch_causal_lm is unaffected by a quantized body (transformers keeps lm_head unquantized)."""
    model = fp.apply_lora(load_quantized(llama_dir), r=4)
    ids = _Tokens(2, 10).ids
    want = model(ids, labels=ids).loss
    fp.patch_causal_lm(model)
    got = model(ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.grad is not None
