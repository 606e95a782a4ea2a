"""The ce suite's TRL case: the LM head of TRL's SFTTrainer (per-token log p, entropy and top-1 of
hidden @ W^T, loss -sum log p / count) by TRL's own add_fused_lm_head kernel
(trl.kernels.ChunkedLogProbFunction, called as add_fused_lm_head calls it on this device) and by
fusedpeft.linear_log_probs (what a patch_causal_lm model gives fusedpeft.integrations.trl.SFTTrainer).

hidden [N, H] (requires grad), head weight [V, H] frozen (LoRA / QLoRA SFT), labels [N] with a
quarter of the rows ignored (completion-only). Floor: full logits, log_softmax, gather.
"""

from __future__ import annotations

import torch

from bench.common import Case, Provider, Skip, Step, Work
from bench.providers import fusedpeft_attr, fusedpeft_providers

OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks add_fused_lm_head for
CPU_TRL = [(2048, 1024, 32000)]
GPU_TRL = [(8192, 4096, 128256)]
SMOKE_TRL = [(64, 40, 1003)]


def _trl_kernel():
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"trl (>= 1.16) not importable ({type(exc).__name__}: {exc})") from exc
    return ChunkedLogProbFunction, _use_triton, _CHUNKED_LOGPROB_CHUNK_SIZE


def trl_head_case(settings, n: int, h: int, v: int, name: str) -> Case:
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    hidden = torch.randn(n, h, device=dev, dtype=dt, requires_grad=True)
    weight = torch.randn(v, h, device=dev, dtype=dt) / h**0.5
    labels = torch.randint(0, v, (n,), device=dev)
    labels[torch.randperm(n, device=dev)[: n // 4]] = -100
    mask = labels != -100
    count = mask.sum()

    def floor():
        def run():
            logp = torch.log_softmax((hidden @ weight.t()).float(), -1)
            token = logp.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) * mask
            entropy = -(logp.exp() * logp).sum(1).detach()
            top1 = logp.argmax(1) == labels
            return -token.sum() / count + 0 * (entropy.sum() + top1.sum())
        return Step(run, [hidden])

    def trl_head():
        function, use_triton, chunk = _trl_kernel()
        compact = use_triton(dev)  # add_fused_lm_head scores only the labelled rows on Triton devices

        def run():
            rows = hidden[mask] if compact else hidden
            targets = labels[mask] if compact else labels.clamp(min=0)
            log_probs, *_ = function.apply(rows, weight, None, targets, 1.0, chunk, None, 1.0, OUTPUTS)
            return -(log_probs if compact else log_probs.masked_fill(~mask, 0)).sum() / count
        return Step(run, [hidden])

    def fused(backend):
        fn = fusedpeft_attr("linear_log_probs")
        return Step(lambda: -fn(hidden, weight, labels, outputs=OUTPUTS, backend=backend)["log_probs"].sum() / count,
                    [hidden])

    providers = [Provider("full logits + log_softmax (floor)", floor),
                 Provider("TRL add_fused_lm_head (ChunkedLogProbFunction)", trl_head)]
    providers += fusedpeft_providers("cross_entropy", dev, fused)

    def expected():
        from fusedpeft import reference

        return reference.masked_cross_entropy(hidden.float() @ weight.float().t(), labels)

    work = Work(2 * n * h * v, 4 * n * h * v, (n * h + v * h) * elt, (2 * n * h + v * h) * elt,
                "N = all rows; flops fwd 2NHV (logits), fwd+bwd 4NHV (+ grad_hidden; recomputing the logits in "
                "backward is not counted); bytes fwd (NH + VH)*elt, fwd+bwd (2NH + VH)*elt")
    params = {"N": n, "H": h, "V": v, "outputs": ",".join(OUTPUTS), "head_trainable": False,
              "rows_with_weight": int(count), "dtype": str(dt)}
    notes = [f"TRL SFTTrainer's head: log_probs, entropy, is_top1 of {int(count)}/{n} labelled rows; logits would "
             f"be {n * v * elt / 2**20:.0f} MiB"]
    return Case("ce", name, params, work, providers, expected, notes)


def cases(settings):
    """[(case name, builder, priority)] of the TRL head case for the device."""
    import functools

    cuda = settings.device.type == "cuda"
    shapes = SMOKE_TRL if settings.smoke else GPU_TRL if cuda else CPU_TRL
    return [(f"trl_head_N{n}_H{h}_V{v}", functools.partial(trl_head_case, settings, n, h, v, f"trl_head_N{n}_H{h}_V{v}"),
             1 if cuda else 0) for n, h, v in shapes]
