"""Cross-entropy suite: masked / weighted CE from logits, and linear CE from hidden states.

masked_ce cases: logits [N, V] (requires grad), labels [N]; variants: plain, half the rows
instruction-masked with instruction_weight=0, per-token weights [N] in [0, 2). Floor:
F.cross_entropy(ignore_index=-100, mean) (prompt rows set to -100 beforehand; per-token weights
as reduction="none", weighted sum / weight sum).
linear_ce cases: hidden [N, H] (requires grad), head weight [V, H] (frozen, or trainable), labels
[N] with a quarter of the rows ignored. Floor: F.cross_entropy(hidden @ W^T) on full logits.
PyTorch's own chunked F.linear_cross_entropy (options=LinearCrossEntropyOptions(), torch >= 2.13)
is the baseline every user has; Liger and Cut Cross-Entropy join when importable (they need CUDA).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench import ce_trl
from bench.common import Case, Provider, Settings, Skip, Step, Work
from bench.providers import fusedpeft_attr, fusedpeft_providers

IGNORE = -100
CPU_MASKED = [(2048, 32000)]
GPU_MASKED = [(8192, 32000), (8192, 128256)]
MASKED_VARIANTS = ("plain", "instr_half_w0", "token_weights")
# (rows, hidden, vocab, head trainable, half the rows instruction-masked)
CPU_LINEAR = [(8192, 512, 32000, False, False), (1024, 512, 32000, True, False)]
GPU_LINEAR = [(8192, 4096, v, trainable, instr) for v in (32000, 128256)
              for trainable, instr in ((False, False), (False, True), (True, False))]
SMOKE_MASKED, SMOKE_LINEAR = [(64, 1003)], [(64, 40, 1003, True, True)]
GPU_HEADLINE_VOCAB = 128256  # the issues' GPU targets (Llama-3 vocabulary): measured first


def _loss_only(out) -> torch.Tensor:
    """Liger/CCE return a loss, a tuple (loss, extras...) or an object with .loss, by version."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "loss", out)


def _liger(name: str, device: torch.device):
    if device.type != "cuda":
        raise Skip("Liger's Triton kernels need CUDA tensors")
    try:
        from liger_kernel.transformers import functional
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"liger_kernel not importable ({type(exc).__name__}: {exc})") from exc
    return getattr(functional, name)


def _cce(device: torch.device):
    if device.type != "cuda":
        raise Skip("Cut Cross-Entropy's Triton kernels need CUDA tensors")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"cut_cross_entropy not importable ({type(exc).__name__}: {exc})") from exc
    return linear_cross_entropy


def _torch_chunked():
    """PyTorch's chunked linear CE: (F.linear_cross_entropy, LinearCrossEntropyOptions); torch >= 2.13."""
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no chunked F.linear_cross_entropy (added in 2.13)")
    return F.linear_cross_entropy, options


def _labels(n: int, v: int, device, ignored_fraction: float) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.randperm(n, device=device)[: int(n * ignored_fraction)]] = IGNORE
    return labels


def masked_case(settings: Settings, n: int, v: int, variant: str, name: str) -> Case:
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    logits = torch.randn(n, v, device=dev, dtype=dt, requires_grad=True)
    labels = _labels(n, v, dev, 0.0)
    instruction_mask = (torch.arange(n, device=dev) < n // 2) if variant == "instr_half_w0" else None
    token_weights = torch.rand(n, device=dev) * 2 if variant == "token_weights" else None
    labels_masked = labels if instruction_mask is None else torch.where(instruction_mask, IGNORE, labels)
    keywords = {"instruction_mask": instruction_mask, "instruction_weight": 0.0, "token_weights": token_weights}

    def torch_loss(loss_fn):
        """Per-token weights through reduction='none' (what F.cross_entropy / Liger users write)."""
        if token_weights is None:
            return lambda: loss_fn(logits, labels_masked, ignore_index=IGNORE)
        return lambda: (loss_fn(logits, labels, ignore_index=IGNORE, reduction="none") * token_weights).sum() / \
            token_weights.sum()

    def floor():
        return Step(torch_loss(F.cross_entropy), [logits])

    def liger():
        fn = _liger("liger_cross_entropy", dev)
        return Step(torch_loss(lambda *a, **k: _loss_only(fn(*a, **k))), [logits])

    providers = [Provider("F.cross_entropy (floor)", floor), Provider("liger CE", liger)]

    def fused(backend):
        fn = fusedpeft_attr("masked_cross_entropy")
        return Step(lambda: fn(logits, labels, **keywords, backend=backend), [logits])

    providers += fusedpeft_providers("cross_entropy", dev, fused)

    def expected():
        from fusedpeft import reference

        return reference.masked_cross_entropy(logits, labels, **keywords)

    work = Work(3 * n * v, 6 * n * v, n * v * elt, 2 * n * v * elt,
                "flops ~3NV fwd (max, exp, sum), ~6NV fwd+bwd; bytes NV*elt fwd (read logits once), "
                "2NV*elt fwd+bwd (+ write the gradient once)")
    params = {"N": n, "V": v, "variant": variant, "dtype": str(dt)}
    return Case("ce", name, params, work, providers, expected)


def linear_case(settings: Settings, n: int, h: int, v: int, trainable: bool, instr: bool, name: str) -> Case:
    dev, dt = settings.device, settings.dtype
    torch.manual_seed(0)
    elt = torch.finfo(dt).bits // 8
    hidden = torch.randn(n, h, device=dev, dtype=dt, requires_grad=True)
    weight = (torch.randn(v, h, device=dev, dtype=dt) / h**0.5).requires_grad_(trainable)
    labels = _labels(n, v, dev, 0.25)
    instruction_mask = (torch.arange(n, device=dev) < n // 2) if instr else None
    labels_masked = labels if instruction_mask is None else torch.where(instruction_mask, IGNORE, labels)
    leaves = [hidden, weight] if trainable else [hidden]

    def floor():
        return Step(lambda: F.cross_entropy(hidden @ weight.t(), labels_masked, ignore_index=IGNORE), leaves)

    def hf_upcast():
        if dt == torch.float32:
            raise Skip("same as the floor in float32")
        return Step(lambda: F.cross_entropy((hidden @ weight.t()).float(), labels_masked, ignore_index=IGNORE), leaves)

    def torch_chunked():
        fn, options = _torch_chunked()
        return Step(lambda: fn(hidden, weight, labels_masked, ignore_index=IGNORE, options=options()), leaves)

    def liger():
        fn = _liger("liger_fused_linear_cross_entropy", dev)
        return Step(lambda: _loss_only(fn(hidden, weight, labels_masked, ignore_index=IGNORE)), leaves)

    def cce():
        fn = _cce(dev)
        return Step(lambda: _loss_only(fn(hidden, weight, labels_masked, ignore_index=IGNORE, reduction="mean")),
                    leaves)

    providers = [Provider("F.ce(hidden @ W^T) (floor)", floor), Provider("HF-style logits.float() + F.ce", hf_upcast),
                 Provider("torch F.linear_cross_entropy (chunked)", torch_chunked),
                 Provider("liger fused linear CE", liger), Provider("cut cross-entropy", cce)]

    def fused(backend):
        fn = fusedpeft_attr("linear_cross_entropy")
        return Step(lambda: fn(hidden, weight, labels, instruction_mask=instruction_mask, instruction_weight=0.0,
                               backend=backend), leaves)

    providers += fusedpeft_providers("cross_entropy", dev, fused)

    def expected():
        from fusedpeft import reference

        return reference.masked_cross_entropy(hidden.float() @ weight.float().t(), labels,
                                              instruction_mask=instruction_mask)

    grad_w = 2 * n * h * v if trainable else 0
    work = Work(2 * n * h * v, 4 * n * h * v + grad_w, (n * h + v * h) * elt,
                (2 * n * h + v * h + (2 * v * h if trainable else 0)) * elt,
                "N = all rows (ignored ones included); flops fwd 2NHV, fwd+bwd 4NHV (+2NHV for a trainable "
                "head); bytes fwd (NH + VH)*elt, fwd+bwd (2NH + VH (+2VH trainable))*elt")
    weighted = int((labels_masked != IGNORE).sum())
    params = {"N": n, "H": h, "V": v, "head_trainable": trainable, "instruction_half_masked": instr,
              "rows_with_weight": weighted, "dtype": str(dt), "chunk_budget_bytes": "fusedpeft default"}
    notes = [f"{weighted}/{n} rows carry loss weight ({1 - weighted / n:.0%} weight-0 rows); "
             f"head {'trainable' if trainable else 'frozen'}; logits would be {n * v * elt / 2**20:.0f} MiB"]
    return Case("ce", name, params, work, providers, expected, notes)


def cases(settings: Settings):
    """[(case name, builder, priority)] for the device."""
    cuda = settings.device.type == "cuda"
    masked = SMOKE_MASKED if settings.smoke else GPU_MASKED if cuda else CPU_MASKED
    linear = SMOKE_LINEAR if settings.smoke else GPU_LINEAR if cuda else CPU_LINEAR
    out = []
    for n, v in masked:
        for variant in MASKED_VARIANTS[:1] if settings.smoke else MASKED_VARIANTS:
            name = f"masked_ce_N{n}_V{v}_{variant}"
            priority = 1 if cuda and (v != GPU_HEADLINE_VOCAB or variant != "plain") else 0
            out.append((name, functools.partial(masked_case, settings, n, v, variant, name), priority))
    for n, h, v, trainable, instr in linear:
        head = "trainable" if trainable else "frozen"
        name = f"linear_ce_N{n}_H{h}_V{v}_{head}{'_instr_half' if instr else ''}"
        priority = 1 if cuda and (v != GPU_HEADLINE_VOCAB or instr) else 0
        out.append((name, functools.partial(linear_case, settings, n, h, v, trainable, instr, name), priority))
    return out + ce_trl.cases(settings)  # TRL's SFTTrainer head: TRL's kernel vs fusedpeft.linear_log_probs
