"""Timing a case's implementations, the spread of the samples, and the checks that flag numbers
which contradict each other.

CPU: every (implementation, forward | forward+backward) of a case runs in one interleaved loop, so
load from other processes hits them alike and the forward and forward+backward medians come from
the same minutes. Each gets repetitions until its median is stable (the 95% confidence interval of
the median within ``cpu_median_ci`` of it) or its time cap is spent. CUDA: triton.testing.do_bench
(CUDA events, L2 flushed before each run), all samples kept. Statistics (median, quartiles, min)
from pytest-benchmark's Stats.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from pytest_benchmark.stats import Stats


@dataclass
class Timing:
    """The samples (ms) of one function and what the report shows of them."""

    samples: list[float]
    paired_ratio: float = math.nan  # median over rounds of (this run / the floor's run of that round)

    @property
    def stats(self) -> Stats:
        stats = Stats()
        for sample in self.samples:
            stats.update(sample)
        return stats

    def summary(self) -> dict:
        """median, min, q1, q3, rel_iqr ((q3 - q1) / median) and runs, in ms."""
        s = self.stats
        median = s.median
        return {"median": median, "min": s.min, "q1": s.q1, "q3": s.q3, "runs": s.rounds,
                "rel_iqr": (s.q3 - s.q1) / median if median > 0 and s.rounds >= 4 else 0.0}


def median_ci_halfwidth(samples: list[float]) -> float:
    """Half-width of the ~95% distribution-free confidence interval of the median (order
    statistics n/2 -/+ 0.98 sqrt(n)), relative to the median; inf with fewer than 2 samples."""
    n = len(samples)
    if n < 2:
        return math.inf
    ordered = sorted(samples)
    lo = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    hi = min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)) - 1)
    median = statistics.median(ordered)
    return (ordered[hi] - ordered[lo]) / 2 / median if median > 0 else 0.0


def cpu_interleaved(fns: list[Callable[[], None]], settings, floors: list[int] | None = None
                    ) -> list[Timing | Exception]:
    """Wall-clock samples of each (already warmed-up) fn, timed in interleaved rounds.

    Every round runs each fn that still needs samples once, in an order rotated from round to
    round. A fn's first run sets its first target: about cpu_budget_s of runs, at least
    cpu_min_reps (cpu_min_reps_slow over a second), at most cpu_max_reps. On reaching it, a fn whose
    median is not yet stable (median_ci_halfwidth > cpu_median_ci) gets half as many again, until
    it has spent cpu_budget_s * cpu_max_budgets. ``floors[i]`` is the index of the fn that fn i's
    paired ratio is taken against (default 0). Returns a Timing per fn, or the exception it raised.
    """
    floors = floors or [0] * len(fns)
    times: list[list[float]] = [[] for _ in fns]
    by_round: list[dict[int, float]] = [{} for _ in fns]
    targets: list[int | None] = [None] * len(fns)
    errors: dict[int, Exception] = {}
    cap_s = settings.cpu_budget_s * settings.cpu_max_budgets

    def wants_more(i: int) -> bool:
        if i in errors:
            return False
        if targets[i] is None or len(times[i]) < targets[i]:
            return True
        if (len(times[i]) >= settings.cpu_max_reps or sum(times[i]) >= cap_s
                or median_ci_halfwidth(times[i]) <= settings.cpu_median_ci):
            return False
        targets[i] = min(settings.cpu_max_reps, targets[i] + max(1, targets[i] // 2))
        return True

    for round_index in range(10**6):
        active = [i for i in range(len(fns)) if wants_more(i)]
        if not active:
            break
        shift = round_index % len(active)
        for i in active[shift:] + active[:shift]:
            start = time.perf_counter()
            try:
                fns[i]()
            except Exception as exc:  # noqa: BLE001 - reported per provider
                errors[i] = exc
                continue
            elapsed = time.perf_counter() - start
            times[i].append(elapsed)
            by_round[i][round_index] = elapsed
            if targets[i] is None:
                min_reps = settings.cpu_min_reps_slow if elapsed > 1.0 else settings.cpu_min_reps
                targets[i] = int(min(settings.cpu_max_reps, max(min_reps, settings.cpu_budget_s / max(elapsed, 1e-6))))

    def paired_ratio(i: int) -> float:
        ref = by_round[floors[i]]
        shared = [r for r in by_round[i] if r in ref]
        return statistics.median(by_round[i][r] / ref[r] for r in shared) if shared else math.nan

    return [errors[i] if i in errors else Timing([t * 1e3 for t in times[i]], paired_ratio(i))
            for i in range(len(fns))]


def cuda_do_bench(fn: Callable[[], None], settings) -> Timing:
    """All samples (ms) of triton.testing.do_bench(fn): CUDA events, L2 flushed before each run;
    called again until there are at least cuda_min_reps samples."""
    from triton.testing import do_bench

    samples: list[float] = []
    while len(samples) < settings.cuda_min_reps:
        samples += do_bench(fn, warmup=settings.cuda_warmup_ms, rep=settings.cuda_rep_ms, return_mode="all")
    return Timing(samples[: max(settings.cuda_max_reps, settings.cuda_min_reps)])


# ---- the checks: numbers of one case that contradict each other -----------------------------------

FWD_OVER_FWD_BWD = "fwd > fwd+bwd"
RATIO_MISMATCH = "paired ratio != ratio of medians"
SPREAD = "spread"


def row_flags(row: dict, floor: dict, settings) -> list[str]:
    """What is wrong with one measured row: its forward median above its forward+backward median
    (by more than fwd_tolerance), a paired ratio that disagrees with the ratio of the medians (by
    more than ratio_tolerance, relative), or a relative IQR above max_rel_iqr."""
    flags = []
    if "fwd_ms" in row and "fwd_bwd_ms" in row and row["fwd_ms"] > row["fwd_bwd_ms"] * (1 + settings.fwd_tolerance):
        flags.append(f"{FWD_OVER_FWD_BWD} ({row['fwd_ms']:.3g} > {row['fwd_bwd_ms']:.3g} ms)")
    for key in ("fwd", "fwd_bwd"):
        paired = row.get(f"{key}_paired_ratio")
        if paired is not None and floor.get(f"{key}_ms") and row.get(f"{key}_ms"):
            of_medians = row[f"{key}_ms"] / floor[f"{key}_ms"]
            if abs(math.log(paired / of_medians)) > math.log1p(settings.ratio_tolerance):
                flags.append(f"{RATIO_MISMATCH} ({key}: {paired:.2f}x vs {of_medians:.2f}x)")
        spread = row.get(f"{key}_rel_iqr")
        if spread is not None and spread > settings.max_rel_iqr:
            flags.append(f"{SPREAD} ({key}: IQR {100 * spread:.0f}% of the median > {100 * settings.max_rel_iqr:.0f}%)")
    return flags


def case_flags(rows: list[dict], settings) -> dict[str, list[str]]:
    """{impl: flags} of the measured rows of a case that fail row_flags (rows[0] is the floor)."""
    floor = rows[0] if rows and "skipped" not in rows[0] else {}
    out = {}
    for row in rows:
        if "skipped" not in row:
            flags = row_flags(row, floor, settings)
            if flags:
                out[row["impl"]] = flags
    return out


# ---- progress ------------------------------------------------------------------------------------

def estimate_case_s(settings, providers: int = 6) -> float:
    """Rough seconds of one case before any was measured: per provider, warm-up and memory
    pass plus forward and forward+backward timings (CPU: about a budget each and some extension;
    CUDA: do_bench's warm-up and repetitions)."""
    if settings.device.type == "cuda":
        return providers * (1.0 + 2 * 2 * (settings.cuda_warmup_ms + settings.cuda_rep_ms) / 1e3)
    return providers * (1.0 + 2 * 1.3 * settings.cpu_budget_s)


class Progress:
    """A line per case: "case 3/12 lora/..., 1.2 min so far, ~2.0 min left", the estimate refined by
    the mean time of the cases done so far."""

    def __init__(self, total: int, settings):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.per_case = estimate_case_s(settings)

    @staticmethod
    def _minutes(seconds: float) -> str:
        return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"

    def estimate_total_s(self) -> float:
        return self.total * self.per_case

    def line(self, label: str) -> str:
        elapsed = time.perf_counter() - self.start
        per_case = elapsed / self.done if self.done else self.per_case
        left = (self.total - self.done) * per_case
        return (f"-- case {self.done + 1}/{self.total}: {label}   ({self._minutes(elapsed)} so far, "
                f"~{self._minutes(left)} left)")

    def case_done(self) -> None:
        self.done += 1
