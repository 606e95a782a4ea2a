"""Shared pieces of the benchmark: settings, cases, timing and the measuring loop.

A Case holds fixed inputs and a list of Providers (implementations); the first provider is the
case's floor, the baseline every ratio is taken against. A provider's ``make()`` returns a Step
(a forward closure plus the tensors that receive gradients) or raises Skip with the reason.
Everything of one case is measured in the same process (warm-up, output check and peak memory one
provider at a time, then the timings; on the CPU forward and forward+backward of every provider
interleaved in one loop), so the ratios cancel machine-to-machine noise. Numbers that contradict
each other (bench/timing.py's checks) are measured again, then flagged in the table and the JSON.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from bench.memory import peak_extra_bytes
from bench.report import format_case
from bench.timing import case_flags, cpu_interleaved, cuda_do_bench


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


@dataclass
class Settings:
    """How to measure. CPU: wall clock, interleaved rounds, about ``cpu_budget_s`` of runs per
    implementation (at least ``cpu_min_reps``). CUDA: CUDA events, about ``cuda_rep_ms`` of runs
    after ``cuda_warmup_ms`` of warm-up, L2 flushed before each run. Medians throughout."""

    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    smoke: bool = False            # one tiny case per suite (GPU_CHECK_DRY_RUN): checks the plumbing only
    cpu_budget_s: float = 2.0
    cpu_min_reps: int = 3
    cpu_min_reps_slow: int = 2     # for steps slower than a second
    cpu_max_reps: int = 200
    cuda_warmup_ms: float = 5.0
    cuda_rep_ms: float = 30.0
    cuda_min_reps: int = 3
    cuda_max_reps: int = 100
    cpu_median_ci: float = 0.03    # CPU: more runs until the median's 95% CI is within 3% of it ...
    cpu_max_budgets: float = 3.0   # ... or the fn has spent this many cpu_budget_s
    max_rel_iqr: float = 0.25      # consistency checks (bench/timing.py): flag an IQR above 25% of the median,
    fwd_tolerance: float = 0.05    # a forward median 5% above the forward+backward one,
    ratio_tolerance: float = 0.2   # a paired ratio 20% away from the ratio of the medians
    remeasure: int = 1             # a case failing the checks is measured again this many times, then flagged

    @classmethod
    def make(cls, device: torch.device, dtype: torch.dtype, quick: bool, smoke: bool = False) -> "Settings":
        if quick or smoke:
            return cls(device, dtype, True, smoke, cpu_budget_s=0.15, cpu_min_reps=2, cpu_min_reps_slow=1,
                       cpu_max_reps=10, cuda_warmup_ms=2.0, cuda_rep_ms=8.0, cuda_min_reps=2,
                       cpu_max_budgets=1.5, remeasure=0 if smoke else 1)
        if device.type == "cuda":
            return cls(device, dtype, False, max_rel_iqr=0.1)
        return cls(device, dtype, False)


@dataclass
class Work:
    """Useful work of a case, for achieved TFLOP/s and GB/s; ``formula`` states how it was counted."""

    flops_fwd: float
    flops_fwd_bwd: float
    bytes_fwd: float
    bytes_fwd_bwd: float
    formula: str


@dataclass
class Step:
    """One implementation bound to its inputs.

    forward() runs the forward with autograd on and returns the output ([N, D] activations, or a
    0-dim loss); ``grad_out`` (same shape as the output, or None for a scalar loss) is fed to
    backward; ``leaves`` are the tensors whose ``.grad`` is cleared before each step.
    The step's output is dropped after each call (no activation outlives a step).
    """

    forward: Callable[[], torch.Tensor]
    leaves: Sequence[torch.Tensor] = ()
    grad_out: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # extra facts for the JSON row (e.g. compile time)

    def clear_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def run_forward(self) -> None:
        with torch.enable_grad():
            self.forward()

    def run_forward_backward(self) -> None:
        self.clear_grads()
        with torch.enable_grad():
            out = self.forward()
            out.backward(self.grad_out)


@dataclass
class Provider:
    """An implementation of a case: ``make()`` -> Step, or raise Skip. ``work`` overrides the
    case's (the floor does less work than the full layer); ``check`` compares its forward output
    with the case's expected output."""

    name: str
    make: Callable[[], Step]
    work: Work | None = None
    check: bool = True


@dataclass
class Case:
    """One shape of one suite; providers[0] is the floor. ``expected()`` (optional) gives the
    reference forward output the providers are checked against (None when dropout makes outputs
    random)."""

    suite: str
    name: str
    params: dict
    work: Work
    providers: list[Provider]
    expected: Callable[[], torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """max |out - expected| / max |expected| in float32."""
    out, expected = out.detach().float(), expected.detach().float().to(out.device)
    scale = expected.abs().max().clamp_min(1e-30)
    return float((out - expected).abs().max() / scale)


def _failure(exc: Exception) -> str:
    text = str(exc).strip()
    return f"failed: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def prepare_provider(provider: Provider, settings: Settings, expected) -> tuple[Step, dict]:
    """make() the step, warm it up (checking its output), then measure peak memory of one step."""
    step = provider.make()
    start = time.perf_counter()
    step.clear_grads()
    with torch.enable_grad():  # warm-up (lazy set-up, compilation, autotuning) and output check
        out = step.forward()
        error = _relative_error(out, expected) if expected is not None and provider.check else None
        out.backward(step.grad_out)
        del out
    _sync(settings.device)
    first_s = time.perf_counter() - start
    step.clear_grads()  # gradients of the warm-up would otherwise be freed inside the measured step
    peak = peak_extra_bytes(step.run_forward_backward, settings.device)
    step.clear_grads()
    row = {"impl": provider.name, "peak_extra_bytes": peak, "rel_err_vs_reference": error,
           "first_run_s": round(first_s, 4), **step.info}
    return step, row


def _time_all(prepared: list[tuple[Step, dict]], settings: Settings) -> None:
    """Fill fwd_ms / fwd_bwd_ms (medians), their min, quartiles, relative IQR and runs in every
    prepared row. CPU: forward and forward+backward of every provider in one interleaved loop (paired
    ratios against the floor's same step); CUDA: triton.testing.do_bench per step."""
    keys = (("fwd", "run_forward"), ("fwd_bwd", "run_forward_backward"))
    fns = [getattr(step, method) for step, _ in prepared for _, method in keys]
    if settings.device.type == "cuda":
        timings = []
        for fn in fns:
            try:
                timings.append(cuda_do_bench(fn, settings))
            except Exception as exc:  # noqa: BLE001
                timings.append(exc)
    else:
        timings = cpu_interleaved(fns, settings, floors=[i % len(keys) for i in range(len(fns))])
    for index, timing in enumerate(timings):
        (step, row), key = prepared[index // len(keys)], keys[index % len(keys)][0]
        step.clear_grads()
        if isinstance(timing, Exception):
            row.setdefault("skipped", _failure(timing))
            continue
        summary = timing.summary()
        row[f"{key}_ms"], row.setdefault("timed_runs", {})[key] = summary["median"], summary["runs"]
        row[f"{key}_min_ms"], row[f"{key}_q1_ms"], row[f"{key}_q3_ms"] = summary["min"], summary["q1"], summary["q3"]
        row[f"{key}_rel_iqr"] = summary["rel_iqr"]
        if not math.isnan(timing.paired_ratio):
            row[f"{key}_paired_ratio"] = timing.paired_ratio


def _time_checked(prepared: list[tuple[Step, dict]], settings: Settings) -> dict[str, list[str]]:
    """_time_all, then the consistency checks; a case that fails them is measured again (up to
    settings.remeasure times). Returns {impl: flags} still failing after the last measurement."""
    for attempt in range(settings.remeasure + 1):
        for _, row in prepared:
            for key in [k for k in row if k.startswith(("fwd_", "fwd_bwd_"))]:
                del row[key]
        _time_all(prepared, settings)
        flags = case_flags([row for _, row in prepared], settings)
        for _, row in prepared:
            row["measurements"] = attempt + 1
        if not flags:
            return {}
    return flags


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, settings: Settings) -> dict:
    """Measure every provider of ``case``: warm-up, output check and peak memory one provider at a
    time, then the timings of all of them; a provider that cannot run is recorded with its reason."""
    expected = None
    if case.expected is not None:
        with torch.no_grad():
            expected = case.expected()
    rows: list[dict] = []
    prepared: list[tuple[Step, dict]] = []
    for provider in case.providers:
        try:
            step, row = prepare_provider(provider, settings, expected)
            prepared.append((step, row))
        except Skip as reason:
            row = {"impl": provider.name, "skipped": str(reason)}
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
            row = {"impl": provider.name, "skipped": _failure(exc)}
        rows.append(row)
        _free_memory(settings.device)
    del expected
    flags = _time_checked(prepared, settings) if prepared else {}
    for row in rows:
        if row["impl"] in flags:
            row["flags"] = flags[row["impl"]]
    for provider, row in zip(case.providers, rows):
        if "skipped" not in row:
            work = provider.work or case.work
            row["tflops_fwd_bwd"] = work.flops_fwd_bwd / (row["fwd_bwd_ms"] * 1e-3) / 1e12
            row["gbps_fwd_bwd"] = work.bytes_fwd_bwd / (row["fwd_bwd_ms"] * 1e-3) / 1e9
            row["work"] = vars(work)
    prepared.clear()
    _free_memory(settings.device)
    result = {"suite": case.suite, "case": case.name, "params": case.params, "floor": case.providers[0].name,
              "formula": case.work.formula, "notes": case.notes, "results": rows}
    if flags:
        result["flags"] = flags
    print(format_case(result), flush=True)
    return result
