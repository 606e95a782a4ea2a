"""Shared pieces of the benchmark: settings, cases, timing and the measuring loop.

A Case holds fixed inputs and a list of Providers (implementations); the first provider is the
case's floor, the baseline every ratio is taken against. A provider's ``make()`` returns a Step
(a forward closure plus the tensors that receive gradients) or raises Skip with the reason.
Everything of one case is measured in the same process (warm-up, output check and peak memory one
provider at a time, then the timings; on the CPU interleaved between providers), so the ratios
cancel machine-to-machine noise.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from bench.memory import peak_extra_bytes
from bench.report import format_case


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

    @classmethod
    def make(cls, device: torch.device, dtype: torch.dtype, quick: bool, smoke: bool = False) -> "Settings":
        if quick or smoke:
            return cls(device, dtype, True, smoke, cpu_budget_s=0.15, cpu_min_reps=2, cpu_min_reps_slow=1,
                       cpu_max_reps=10, cuda_warmup_ms=2.0, cuda_rep_ms=8.0, cuda_min_reps=2)
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


def cpu_interleaved_ms(fns: list[Callable[[], None]], settings: Settings) -> list[tuple[float, int, float] | Exception]:
    """Median wall-clock ms of each (already warmed-up) fn, timed in interleaved rounds.

    Every round runs each fn that still needs samples once, in an order rotated from round to
    round, so load from other processes hits every implementation alike. A fn's first run sets
    how many it gets: about cpu_budget_s in total, at least cpu_min_reps (cpu_min_reps_slow for
    runs over a second), at most cpu_max_reps. Returns (median ms, runs, paired ratio) per fn,
    or the exception it raised; the paired ratio is the median over rounds of its time divided
    by fns[0]'s time in the same round, which cancels the machine's drift between rounds.
    """
    times: list[list[float]] = [[] for _ in fns]
    by_round: list[dict[int, float]] = [{} for _ in fns]
    targets: list[int | None] = [None] * len(fns)
    errors: dict[int, Exception] = {}
    for round_index in range(10**6):
        active = [i for i in range(len(fns)) if targets[i] is None or len(times[i]) < targets[i]]
        if not active:
            break
        shift = round_index % len(active)
        for i in active[shift:] + active[:shift]:
            start = time.perf_counter()
            try:
                fns[i]()
            except Exception as exc:  # noqa: BLE001 - reported per provider
                errors[i], targets[i] = exc, len(times[i])
                continue
            elapsed = time.perf_counter() - start
            times[i].append(elapsed)
            by_round[i][round_index] = elapsed
            if targets[i] is None:
                min_reps = settings.cpu_min_reps_slow if elapsed > 1.0 else settings.cpu_min_reps
                targets[i] = int(min(settings.cpu_max_reps, max(min_reps, settings.cpu_budget_s / max(elapsed, 1e-6))))

    def paired_ratio(i: int) -> float:
        shared = [r for r in by_round[i] if r in by_round[0]]
        return statistics.median(by_round[i][r] / by_round[0][r] for r in shared) if shared else math.nan

    return [errors[i] if i in errors else (statistics.median(t) * 1e3, len(t), paired_ratio(i))
            for i, t in enumerate(times)]


_L2_FLUSH: dict = {}  # device -> 256 MiB buffer written before each timed run (larger than any L2)


def _cuda_event_ms(fn: Callable[[], None], flush: torch.Tensor | None = None) -> tuple[object, object]:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if flush is not None:
        flush.zero_()  # evict L2 (outside the timed region), as triton.testing.do_bench does
    begin.record()
    fn()
    end.record()
    return begin, end


def cuda_median_ms(fn: Callable[[], None], settings: Settings) -> tuple[float, int]:
    """Median ms of fn() on the GPU with CUDA events, L2 flushed before every timed run.

    Like triton.testing.do_bench, but one estimating run instead of five and at least
    cuda_min_reps timed runs: warm-up runs fill about cuda_warmup_ms, timed runs about
    cuda_rep_ms (at most cuda_max_reps). Returns (median ms, timed runs).
    """
    flush = _L2_FLUSH.get(settings.device)
    if flush is None:
        flush = _L2_FLUSH[settings.device] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=settings.device)
    begin, end = _cuda_event_ms(fn, flush)
    torch.cuda.synchronize(settings.device)
    estimate = max(begin.elapsed_time(end), 1e-3)
    for _ in range(int(min(25, max(1, settings.cuda_warmup_ms / estimate)))):
        fn()
    reps = int(min(settings.cuda_max_reps, max(settings.cuda_min_reps, settings.cuda_rep_ms / estimate)))
    pairs = [_cuda_event_ms(fn, flush) for _ in range(reps)]
    torch.cuda.synchronize(settings.device)
    return statistics.median(b.elapsed_time(e) for b, e in pairs), reps


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
    """Fill fwd_ms / fwd_bwd_ms of every prepared row (CUDA events per step, interleaved on CPU)."""
    for key, method in (("fwd", "run_forward"), ("fwd_bwd", "run_forward_backward")):
        fns = [getattr(step, method) for step, _ in prepared]
        if settings.device.type == "cuda":
            timings = []
            for fn in fns:
                try:
                    timings.append(cuda_median_ms(fn, settings))
                except Exception as exc:  # noqa: BLE001
                    timings.append(exc)
        else:
            timings = cpu_interleaved_ms(fns, settings)
        for (step, row), timing in zip(prepared, timings):
            step.clear_grads()
            if isinstance(timing, Exception):
                row.setdefault("skipped", _failure(timing))
                continue
            row[f"{key}_ms"], row.setdefault("timed_runs", {})[key] = timing[:2]
            if len(timing) > 2 and not math.isnan(timing[2]):
                row[f"{key}_paired_ratio"] = timing[2]


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
    _time_all(prepared, settings)
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
    print(format_case(result), flush=True)
    return result
