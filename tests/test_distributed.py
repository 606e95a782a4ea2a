"""LoRALinear / MoRALinear under DDP and FSDP2 (fully_shard): 2 CPU processes (gloo), each with half of
the global batch, must produce the adapter gradients of one process on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedpeft as fp

WORLD = 2
MODES = ("ddp", "fsdp2")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width + 3)
        self.down = nn.Linear(2 * width + 3, width)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Tiny(nn.Module):
    """Two residual blocks and a head; ``up`` layers get LoRA, ``down`` layers MoRA (types 6 and 1)."""

    def __init__(self, width: int = 13):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model() -> nn.Module:
    """Deterministic: every process builds the same weights (non-zero B and M so every gradient is non-trivial)."""
    torch.manual_seed(1234)
    model = Tiny().double()
    fp.apply_lora(model, ["up"], r=3, alpha=5.0)
    fp.apply_mora(model, ["blocks.0.down"], r=2, mora_type=6)
    fp.apply_mora(model, ["blocks.1.down"], r=2, mora_type=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def global_batch():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(2 * WORLD, 7, 13, generator=g, dtype=torch.float64)
    target = torch.randn(2 * WORLD, 7, 5, generator=g, dtype=torch.float64)
    return x, target


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = grad.detach().clone()
    return out


def step(model, x, target):
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP step, then one FSDP2 step on a fresh copy, each on this rank's half of the global batch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, target = global_batch()
        x, target = x.chunk(WORLD)[rank], target.chunk(WORLD)[rank]
        for mode in MODES:
            model = build_model()
            if mode == "ddp":
                wrapped = nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (WORLD,))
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            step(wrapped, x, target)
            grads = adapter_grads(model)
            if mode == "fsdp2":  # ReMoRA restarts would fold local shards: refused with a clear error
                with pytest.raises(ValueError, match="sharded DTensors"):
                    fp.ReMoRACallback(1, types=(6, 1)).on_train_begin(None, None, None, model=model)
            if rank == 0:
                torch.save(grads, os.path.join(out_dir, f"{mode}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_grads(tmp_path_factory):
    """{mode: adapter gradients of rank 0} from one 2-process run (spawning costs most of the time)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return {mode: torch.load(os.path.join(out_dir, f"{mode}.pt"), weights_only=True) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_adapter_grads_match_single_process(mode, distributed_grads):
    single = build_model()
    x, target = global_batch()
    step(single, x, target)
    expected = adapter_grads(single)
    assert any(".M" in n for n in expected) and any("lora_B" in n for n in expected)
    got = distributed_grads[mode]
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
