"""pytest-benchmark versions of the headline CPU cases, one per suite, plus the memory checks.

    pytest bench/test_bench_cpu.py                 # all, ~2 minutes on 2 cores
    pytest bench/test_bench_cpu.py -k lora         # one suite

Each test times one implementation's forward+backward with the ``benchmark`` fixture; tests of
one case share a benchmark group, so pytest-benchmark's table puts the implementations side by
side. Peak extra memory goes into ``extra_info``. Not collected by ``pytest tests`` (testpaths).
The only assertions are ratios measured in the same run (peak memory), never times.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import ce, lora, mora  # noqa: E402
from bench.common import Settings, Skip  # noqa: E402
from bench.memory import cpu_peak_extra_bytes, validate_cpu_method  # noqa: E402

CPU = torch.device("cpu")
SETTINGS = Settings.make(CPU, torch.float32, quick=False)
FUSED = ["fusedpeft[cpu]", "fusedpeft[torch]"]


@pytest.fixture(scope="module")
def lora_case():
    """The issue's headline: 2048 tokens, 1024 -> 1024, fp32, r=16, no dropout."""
    return lora.build_case(SETTINGS, 2048, 1024, 1024, 16, 0.0, "N2048_K1024_D1024_r16_p0")


@pytest.fixture(scope="module")
def mora_case():
    return mora.build_case(SETTINGS, 2048, 1024, 1024, 6, 8, "N2048_K1024_D1024_type6_r8")


@pytest.fixture(scope="module")
def masked_ce_case():
    return ce.masked_case(SETTINGS, 2048, 32000, "instr_half_w0", "masked_ce_N2048_V32000_instr_half_w0")


@pytest.fixture(scope="module")
def linear_ce_case():
    return ce.linear_case(SETTINGS, 1024, 512, 32000, True, False, "linear_ce_N1024_H512_V32000_trainable")


def _step(case, impl):
    provider = next((p for p in case.providers if p.name == impl), None)
    if provider is None:
        pytest.skip(f"{impl} is not a provider of {case.name} on this machine")
    try:
        return provider.make()
    except Skip as reason:
        pytest.skip(str(reason))


def _bench_fwd_bwd(benchmark, case, impl, rounds=None):
    """Warm up, record peak extra memory, then time forward+backward with the fixture."""
    step = _step(case, impl)
    step.run_forward_backward()
    step.clear_grads()
    benchmark.group = f"{case.suite}/{case.name} fwd+bwd"
    benchmark.extra_info["peak_extra_MiB"] = round(cpu_peak_extra_bytes(step.run_forward_backward) / 2**20, 2)
    if rounds is None:
        benchmark(step.run_forward_backward)
    else:
        benchmark.pedantic(step.run_forward_backward, rounds=rounds, warmup_rounds=0)


def test_cpu_peak_memory_method():
    """The CPU method reports 0 for a no-op and exactly N*V*4 bytes for one [N, V] fp32 tensor."""
    for name, (measured, expected) in validate_cpu_method().items():
        assert abs(measured - expected) <= 64 * 1024, (name, measured, expected)


@pytest.mark.parametrize("impl", ["base nn.Linear (floor)", "peft LoRA", "unsloth-style addmm_", *FUSED])
def test_lora_headline(benchmark, lora_case, impl):
    _bench_fwd_bwd(benchmark, lora_case, impl)


@pytest.mark.parametrize("impl", ["base nn.Linear (floor)", "eager MoRA (reference-style)", *FUSED])
def test_mora_headline(benchmark, mora_case, impl):
    _bench_fwd_bwd(benchmark, mora_case, impl)


@pytest.mark.parametrize("impl", ["F.cross_entropy (floor)", *FUSED])
def test_masked_ce_headline(benchmark, masked_ce_case, impl):
    _bench_fwd_bwd(benchmark, masked_ce_case, impl)


@pytest.mark.parametrize("impl", ["F.ce(hidden @ W^T) (floor)", *FUSED])
def test_linear_ce_trainable_head(benchmark, linear_ce_case, impl):
    _bench_fwd_bwd(benchmark, linear_ce_case, impl, rounds=3)


@pytest.mark.parametrize("impl", FUSED)
def test_linear_ce_peak_memory_at_most_quarter_of_full_logits(impl):
    """Issue target: 8192 rows, H=512, V=32000, a quarter of the rows ignored, frozen head:
    linear_cross_entropy's peak extra memory <= 25% of F.cross_entropy(hidden @ W^T)'s, same run."""
    case = ce.linear_case(SETTINGS, 8192, 512, 32000, False, False, "linear_ce_N8192_H512_V32000_frozen")
    peaks = {}
    for name in (case.providers[0].name, impl):
        step = _step(case, name)
        step.run_forward_backward()
        step.clear_grads()
        peaks[name] = cpu_peak_extra_bytes(step.run_forward_backward)
        del step
    floor, fused = peaks[case.providers[0].name], peaks[impl]
    assert fused <= 0.25 * floor, f"{impl}: {fused / 2**20:.0f} MiB vs floor {floor / 2**20:.0f} MiB"
