"""ReMoRA: MoRALinear.fold_and_reset (fold ΔW into W, re-zero M in place, switch type) and
ReMoRACallback, alone with a torch optimizer and inside a real transformers.Trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fusedpeft as fp
from fusedpeft import reference as ref


def mora_layer(k, d, r, mora_type, dtype=torch.float64):
    layer = fp.MoRALinear(nn.Linear(k, d).to(dtype), r=r, mora_type=mora_type)
    with torch.no_grad():
        layer.M.normal_(0.0, 0.3)
    return layer


@pytest.mark.parametrize("k,d,r", [(33, 65, 2), (65, 33, 3), (24, 24, 2)])
def test_fold_and_reset_cycles_and_keeps_the_output(k, d, r):
    layer = mora_layer(k, d, r, 1)
    M, W = layer.M, layer.base_layer.weight
    x = torch.randn(5, k, dtype=torch.float64)
    for expected_type in (2, 3, 4, 1, 2):
        with torch.no_grad():
            before = layer(x)
            W0, delta = W.clone(), ref.mora_delta_weight(M.detach(), k, d, layer.mora_type)
        assert layer.fold_and_reset() == expected_type
        assert layer.mora_type == expected_type and not layer.merged
        assert layer.M is M and torch.count_nonzero(M) == 0 and M.requires_grad
        assert layer.base_layer.weight is W
        torch.testing.assert_close(W, W0 + delta, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
            M.normal_(0.0, 0.3)  # as if training moved M again


def test_fold_and_reset_type_6():
    layer = mora_layer(33, 65, 2, 6)  # r_hat = round(sqrt(98 * 2)) = 14, even: the same for every type
    x = torch.randn(4, 33, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
    with pytest.raises(ValueError, match="pass next_type"):
        layer.fold_and_reset()
    assert layer.fold_and_reset(6) == 6
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
        layer.M.normal_()
    assert layer.fold_and_reset(1) == 1 and layer.r_hat == 14


def test_fold_and_reset_rejects_and_changes_nothing():
    # 30 -> 31 at r = 2: r_hat = round(sqrt(122)) = 11 for types 1-4, floored to 10 for type 6
    layer = mora_layer(30, 31, 2, 1)
    assert layer.r_hat == 11
    W0, M0 = layer.base_layer.weight.clone(), layer.M.detach().clone()
    with pytest.raises(ValueError, match="changes r_hat from 11 to 10"):
        layer.fold_and_reset(6)
    with pytest.raises(ValueError, match="next_type must be one of"):
        layer.fold_and_reset(5)
    # 3 -> 100 at r = 8: r_hat = 29 > 2 * in_features; fine for types 2 and 3 (no padding), not for 4
    narrow = mora_layer(3, 100, 8, 3)
    with pytest.raises(ValueError, match="wrap padding"):
        narrow.fold_and_reset()
    assert narrow.mora_type == 3 and torch.count_nonzero(narrow.M) > 0
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer.fold_and_reset()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-12)
    assert torch.equal(layer.M, M0) and layer.mora_type == 1


# --------------------------------------------------------------------------------------------
# the callback with a plain torch optimizer
# --------------------------------------------------------------------------------------------


def test_callback_folds_switches_and_resets_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 4)).double()
    fp.apply_mora(model, ["0", "2"], r=2, mora_type=1)
    fp.apply_lora(model, ["4"], r=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, 20, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    callback = fp.ReMoRACallback(every_n_steps=3, types=(1, 2))
    callback.on_train_begin(None, None, None, model=model)
    Ms = [model[0].M, model[2].M]
    for step in range(1, 5):
        opt.zero_grad()
        ((model(x) - target) ** 2).mean().backward()
        opt.step()
        with torch.no_grad():
            before = model(x)
        state = SimpleNamespace(global_step=step)
        callback.on_step_end(None, state, None, model=model, optimizer=SimpleNamespace(optimizer=opt))
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
        if step == 3:
            assert callback.restarts == [3]
            assert [m.mora_type for m in (model[0], model[2])] == [2, 2]
            assert all(torch.count_nonzero(M) == 0 for M in Ms)
            assert all(M not in opt.state for M in Ms), "M's optimizer state is dropped"
            assert opt.state[model[4].lora_A.weight]["step"] == 3, "other parameters keep theirs"
    assert opt.param_groups[0]["params"][0] is Ms[0]
    assert opt.state[Ms[0]]["step"] == 1 and opt.state[model[4].lora_B.weight]["step"] == 4
    assert torch.count_nonzero(Ms[0]) > 0, "M trains again after the restart"


def test_callback_rejects():
    with pytest.raises(ValueError, match="every_n_steps"):
        fp.ReMoRACallback(0)
    with pytest.raises(ValueError, match="types"):
        fp.ReMoRACallback(5, types=(1, 5))
    with pytest.raises(ValueError, match="types"):
        fp.ReMoRACallback(5, types=())
    six = fp.apply_mora(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2, mora_type=6)
    with pytest.raises(ValueError, match=r"type \[6\].*types=\(6,\)"):
        fp.ReMoRACallback(5).on_train_begin(None, None, None, model=six)
    fp.ReMoRACallback(5, types=(6,)).on_train_begin(None, None, None, model=six)
    with pytest.raises(ValueError, match="no MoRALinear"):
        fp.ReMoRACallback(5).on_train_begin(None, None, None, model=nn.Linear(3, 3))


# --------------------------------------------------------------------------------------------
# inside transformers.Trainer
# --------------------------------------------------------------------------------------------


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_remora_callback(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = fp.apply_mora(LlamaForCausalLM(config), r=4, mora_type=1)
    W0 = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    head0 = model.lm_head.weight.detach().clone()
    callback = fp.ReMoRACallback(every_n_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(20, 12, 61), callbacks=[callback])
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert callback.restarts == [2, 4]
    layers = [m for m in model.modules() if isinstance(m, fp.MoRALinear)]
    assert len(layers) == 14 and {m.mora_type for m in layers} == {3}
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, W0), "updates were folded"
    assert torch.equal(model.lm_head.weight, head0), "frozen weights stay frozen"
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert all(opt.state[m.M]["step"] == 1 for m in layers), "one Adam step since the restart at step 4"
    assert all(torch.count_nonzero(m.M) > 0 for m in layers)
