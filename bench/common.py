"""Shared pieces of the benchmark: settings, cases, timing, the measuring loop and the text table.

A Case holds fixed inputs and a list of Providers (implementations); the first provider is the
case's floor, the baseline every ratio is taken against. A provider's ``make()`` returns a Step
(a forward closure plus the tensors that receive gradients) or raises Skip with the reason.
Everything of one case is measured in the same process, one provider after the other, so the
ratios cancel machine-to-machine noise.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from bench.memory import peak_extra_bytes

MIB = 2**20


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


@dataclass
class Settings:
    """How to measure. CPU: wall clock, warm-up, then ``reps`` runs with reps chosen so one
    measurement takes about ``cpu_budget_s`` (at least ``cpu_min_reps``). CUDA: do_bench times."""

    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    cpu_budget_s: float = 0.6
    cpu_min_reps: int = 3
    cpu_min_reps_slow: int = 2     # for steps slower than a second
    cpu_max_reps: int = 50
    cuda_warmup_ms: float = 10.0
    cuda_rep_ms: float = 40.0

    @classmethod
    def make(cls, device: torch.device, dtype: torch.dtype, quick: bool) -> "Settings":
        if quick:
            return cls(device, dtype, True, cpu_budget_s=0.15, cpu_min_reps=2, cpu_min_reps_slow=1, cpu_max_reps=10,
                       cuda_warmup_ms=2.0, cuda_rep_ms=8.0)
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
    """

    forward: Callable[[], torch.Tensor]
    leaves: Sequence[torch.Tensor] = ()
    grad_out: torch.Tensor | None = None

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


def skipped(name: str, reason: str) -> Provider:
    """A provider that only reports why it cannot run."""

    def make() -> Step:
        raise Skip(reason)

    return Provider(name, make)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_median_ms(fn: Callable[[], None], settings: Settings) -> tuple[float, int]:
    """Median wall-clock ms of fn(); returns (median ms, number of timed runs).

    The caller has already warmed fn up (measure_provider's first step). The first run here is
    timed and sets the number of runs: about cpu_budget_s in total, at least cpu_min_reps
    (cpu_min_reps_slow for steps over a second), at most cpu_max_reps.
    """
    times = []
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    min_reps = settings.cpu_min_reps_slow if times[0] > 1.0 else settings.cpu_min_reps
    reps = int(min(settings.cpu_max_reps, max(min_reps, settings.cpu_budget_s / max(times[0], 1e-6))))
    for _ in range(reps - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, len(times)


def cuda_median_ms(fn: Callable[[], None], settings: Settings) -> tuple[float, int]:
    """Median ms of fn() on the GPU: triton.testing.do_bench (L2 flushed between runs) when triton
    imports, else CUDA events around each run after a warm-up. Returns (median ms, runs or -1)."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - any import problem means: use events
        do_bench = None
    if do_bench is not None:
        ms = do_bench(fn, warmup=settings.cuda_warmup_ms, rep=settings.cuda_rep_ms, return_mode="median")
        return float(ms), -1
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(20 if settings.quick else 50):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        pairs.append((begin, end))
    torch.cuda.synchronize()
    return statistics.median(b.elapsed_time(e) for b, e in pairs), len(pairs)


def median_ms(fn: Callable[[], None], settings: Settings) -> tuple[float, int]:
    if settings.device.type == "cuda":
        return cuda_median_ms(fn, settings)
    return cpu_median_ms(fn, settings)


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """max |out - expected| / max |expected| in float32."""
    out, expected = out.detach().float(), expected.detach().float().to(out.device)
    scale = expected.abs().max().clamp_min(1e-30)
    return float((out - expected).abs().max() / scale)


def measure_provider(case: Case, provider: Provider, settings: Settings, expected) -> dict:
    """Warm up, check the output, then peak memory of one forward+backward, then the two timings."""
    step = provider.make()
    try:
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
        fwd_ms, fwd_reps = median_ms(step.run_forward, settings)
        fwd_bwd_ms, fwd_bwd_reps = median_ms(step.run_forward_backward, settings)
    finally:
        step.clear_grads()
        del step
    work = provider.work or case.work
    return {
        "impl": provider.name,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "peak_extra_bytes": peak,
        "rel_err_vs_reference": error,
        "timed_runs": {"fwd": fwd_reps, "fwd_bwd": fwd_bwd_reps},
        "first_run_s": first_s,
        "tflops_fwd_bwd": work.flops_fwd_bwd / (fwd_bwd_ms * 1e-3) / 1e12,
        "gbps_fwd_bwd": work.bytes_fwd_bwd / (fwd_bwd_ms * 1e-3) / 1e9,
        "work": vars(work),
    }


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, settings: Settings) -> dict:
    """Measure every provider of ``case``; a provider that fails is recorded with its reason."""
    expected = None
    if case.expected is not None:
        with torch.no_grad():
            expected = case.expected()
    rows = []
    for provider in case.providers:
        try:
            rows.append(measure_provider(case, provider, settings, expected))
        except Skip as reason:
            rows.append({"impl": provider.name, "skipped": str(reason)})
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            rows.append({"impl": provider.name, "skipped": f"failed: {message[:300]}"})
        _free_memory(settings.device)
    result = {"suite": case.suite, "case": case.name, "params": case.params, "floor": case.providers[0].name,
              "formula": case.work.formula, "notes": case.notes, "results": rows}
    print(format_case(result), flush=True)
    return result


def _ratio(value, floor) -> str:
    if value is None or not floor:
        return "-"
    return f"{value / floor:.2f}x"


def format_case(result: dict) -> str:
    """Text table of one case: times, memory, ratios against the floor (first row), throughput."""
    rows = result["results"]
    floor = rows[0] if "skipped" not in rows[0] else {}
    lines = [f"\n== {result['suite']} / {result['case']}   (floor: {result['floor']})",
             f"   work: {result['formula']}"]
    lines += [f"   note: {note}" for note in result["notes"]]
    header = (f"   {'impl':<34}{'fwd ms':>10}{'x floor':>9}{'fwd+bwd ms':>12}{'x floor':>9}"
              f"{'peak MiB':>11}{'x floor':>9}{'TFLOP/s':>9}{'GB/s':>8}{'rel err':>10}")
    lines += [header, "   " + "-" * (len(header) - 3)]
    for row in rows:
        if "skipped" in row:
            lines.append(f"   {row['impl']:<34}skipped: {row['skipped']}")
            continue
        err = row["rel_err_vs_reference"]
        lines.append(
            f"   {row['impl']:<34}{row['fwd_ms']:>10.3f}{_ratio(row['fwd_ms'], floor.get('fwd_ms')):>9}"
            f"{row['fwd_bwd_ms']:>12.3f}{_ratio(row['fwd_bwd_ms'], floor.get('fwd_bwd_ms')):>9}"
            f"{row['peak_extra_bytes'] / MIB:>11.1f}{_ratio(row['peak_extra_bytes'], floor.get('peak_extra_bytes')):>9}"
            f"{row['tflops_fwd_bwd']:>9.3g}{row['gbps_fwd_bwd']:>8.3g}{'-' if err is None else f'{err:.1e}':>10}")
    return "\n".join(lines)


def fusedpeft_backends(family: str, device: torch.device) -> list[tuple[str, str | None]]:
    """[(backend, None if it can run ``family`` on ``device`` else why not)], from
    fp.available_backends() refined by fusedpeft.backends.unavailable_reason when present."""
    try:
        import fusedpeft as fp

        backends = fp.available_backends()
    except Exception as exc:  # noqa: BLE001
        return [("(all)", f"fusedpeft.available_backends() is not usable yet ({type(exc).__name__}: {exc})")]
    try:
        from fusedpeft.backends import unavailable_reason
    except Exception:  # noqa: BLE001
        unavailable_reason = None
    out = []
    for name, reason in backends.items():
        if reason is None and unavailable_reason is not None:
            reason = unavailable_reason(name, family, device)
        if reason is None and name == "triton" and device.type == "cpu":
            reason = "Triton on CPU tensors only runs under TRITON_INTERPRET=1, far too slow to benchmark"
        out.append((name, reason))
    return out


def fusedpeft_attr(name: str):
    """fusedpeft.<name>, or raise Skip saying it is not there (yet)."""
    try:
        import fusedpeft as fp
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"import fusedpeft failed ({type(exc).__name__}: {exc})") from exc
    if not hasattr(fp, name):
        raise Skip(f"fusedpeft.{name} does not exist yet (public API of SPEC §1 not landed)")
    return getattr(fp, name)
