"""QLoRA under DDP and FSDP2 (fully_shard) on 2 CPU processes (gloo): LoRALinear / MoRALinear over
bitsandbytes Linear4bit must produce the adapter gradients of one process on the whole batch.
FSDP2 replaces bitsandbytes' Params4bit by a plain (sharded, then gathered) Parameter, dropping
its quant_state; the layers read the copy bitsandbytes keeps on the module. The packed storage is
the compute dtype (bnb_4bit_quant_storage = torch.float32 here), what accelerate needs for FSDP2;
uint8 storage works the same way in this path."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedpeft as fp
from qlora_helpers import bnb, linear4bit
from test_distributed import free_port

WORLD = 2
MODES = ("ddp", "fsdp2", "fsdp2_mixed_precision")


def quantized(k, d, storage):
    layer = bnb.nn.Linear4bit(k, d, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
                              quant_storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return layer.to("cpu")


class Block(nn.Module):
    def __init__(self, storage):
        super().__init__()
        self.up, self.down = quantized(64, 96, storage), quantized(96, 64, storage)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


def build_model(storage=torch.float32) -> nn.Module:
    """Deterministic: bitsandbytes quantizes the same weights to the same codes on every process."""
    torch.manual_seed(1234)
    model = nn.Sequential(Block(storage), Block(storage))
    fp.apply_lora(model, ["up"], r=4, alpha=8.0)
    fp.apply_mora(model, ["down"], r=4, mora_type=6)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def global_batch():
    g = torch.Generator().manual_seed(99)
    return torch.randn(2 * WORLD, 5, 64, generator=g), torch.randn(2 * WORLD, 5, 64, generator=g)


def step(model, x, target):
    ((model(x) - target) ** 2).mean().backward()


def adapter_grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = grad.detach().clone()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        x, target = (t.chunk(WORLD)[rank] for t in global_batch())
        for mode in MODES:
            model = build_model()
            if mode == "ddp":
                wrapped = nn.parallel.DistributedDataParallel(model)
            else:
                mesh = init_device_mesh("cpu", (WORLD,))
                # param_dtype equal to the storage dtype: the cast leaves the packed codes alone
                kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32)} if "mixed" in mode else {}
                for block in model:
                    fully_shard(block, mesh=mesh, **kw)
                wrapped = fully_shard(model, mesh=mesh, **kw)
                assert not isinstance(model[0].up.base_layer.weight, bnb.nn.Params4bit)  # FSDP2 replaced it
            step(wrapped, x, target)
            grads = adapter_grads(model)  # full_tensor() is a collective: every rank calls it
            if rank == 0:
                torch.save(grads, os.path.join(out_dir, f"{mode}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_grads(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(tmp_path_factory.mktemp("qdist"))
    mp.spawn(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return {mode: torch.load(os.path.join(out_dir, f"{mode}.pt"), weights_only=True) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_adapter_grads_match_single_process(mode, distributed_grads):
    single = build_model()
    step(single, *global_batch())
    expected = adapter_grads(single)
    assert any(n.endswith(".M") for n in expected) and any("lora_B" in n for n in expected)
    got = distributed_grads[mode]
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_cast_packed_storage_is_a_clear_error():
    """A cast of the packed codes (e.g. a mixed-precision policy casting uint8 storage) is refused,
    naming the cause and bnb_4bit_quant_storage as the way out."""
    layer = fp.LoRALinear(linear4bit(64, 32), r=4)
    layer.base_layer.weight.data = layer.base_layer.weight.data.to(torch.bfloat16)
    with pytest.raises(TypeError, match="cast the packed 4-bit codes.*bnb_4bit_quant_storage=torch.bfloat16"):
        layer(torch.randn(3, 64))
