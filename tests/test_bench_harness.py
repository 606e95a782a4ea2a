"""The benchmark harness (bench/): numbers that contradict each other are re-measured and then
flagged in the table and the JSON; the plots render for every suite with readable labels."""

import dataclasses
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import run as bench_run
from bench.common import Case, Provider, Settings, Step, Work, run_case
from bench.plot import axis_range, case_label, plot_results
from bench.timing import FWD_OVER_FWD_BWD, RATIO_MISMATCH, SPREAD, median_ci_halfwidth, row_flags

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


def _settings(**changes) -> Settings:
    base = Settings.make(CPU, torch.float32, quick=True)
    fields = {"cpu_budget_s": 0.05, "cpu_min_reps": 8, "cpu_max_reps": 12, "cpu_max_budgets": 1.0, **changes}
    return dataclasses.replace(base, **fields)


def _sleeper(durations) -> Step:
    """A step whose forward sleeps the next of ``durations`` (s) and returns a 0-dim loss."""
    leaf = torch.zeros((), requires_grad=True)
    cycle = itertools.cycle(durations)

    def forward():
        time.sleep(next(cycle))
        return leaf * 2.0

    return Step(forward, [leaf])


class _SlowForward(Step):
    """A step whose forward alone takes longer than forward+backward: impossible for a real step."""

    def run_forward(self) -> None:
        time.sleep(0.012)
        super().run_forward()


def _case(providers) -> Case:
    return Case("fake", "noisy", {"N": 8}, Work(1.0, 2.0, 1.0, 2.0, "fake"), providers)


def test_a_noisy_case_is_remeasured_then_flagged_in_the_table_and_the_json(capsys):
    steady = Provider("steady floor", lambda: _sleeper([0.002]))
    noisy = Provider("noisy", lambda: _sleeper([0.001, 0.001, 0.012, 0.012]))
    result = run_case(_case([steady, noisy]), _settings(remeasure=1))
    assert any(flag.startswith(SPREAD) for flag in result["flags"]["noisy"])
    row = result["results"][1]
    assert row["flags"] == result["flags"]["noisy"] and row["measurements"] == 2
    assert row["fwd_rel_iqr"] > 0.25 and row["fwd_min_ms"] <= row["fwd_q1_ms"] <= row["fwd_ms"] <= row["fwd_q3_ms"]
    json.dumps(result)  # the flags go into the JSON as they are
    table = capsys.readouterr().out
    assert "  !noisy" in table and "! noisy: " in table and "spread (" in table and "do not trust this row" in table


def test_a_forward_slower_than_forward_backward_is_flagged():
    impossible = Provider("impossible", lambda: _SlowForward(_sleeper([0.002]).forward, []))
    result = run_case(_case([Provider("floor", lambda: _sleeper([0.002])), impossible]), _settings(remeasure=0))
    assert any(flag.startswith(FWD_OVER_FWD_BWD) for flag in result["flags"]["impossible"])
    assert result["results"][1]["measurements"] == 1


def test_row_flags_on_consistent_and_contradicting_rows():
    settings = Settings.make(CPU, torch.float32, quick=False)
    floor = {"impl": "floor", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "fwd_rel_iqr": 0.05, "fwd_bwd_rel_iqr": 0.05}
    good = {"impl": "x", "fwd_ms": 1.5, "fwd_bwd_ms": 3.0, "fwd_paired_ratio": 1.45, "fwd_bwd_paired_ratio": 1.55,
            "fwd_rel_iqr": 0.1, "fwd_bwd_rel_iqr": 0.2}
    assert row_flags(good, floor, settings) == []
    # the case: "663 ms against a 732 ms floor with a ratio of 1.74x"
    bad = dict(good, fwd_bwd_ms=663 / 732 * 2.0, fwd_bwd_paired_ratio=1.74)
    assert [f for f in row_flags(bad, floor, settings) if f.startswith(RATIO_MISMATCH)]
    inverted = dict(good, fwd_ms=766.0, fwd_bwd_ms=192.0, fwd_paired_ratio=766.0, fwd_bwd_paired_ratio=96.0)
    assert row_flags(inverted, floor, settings)[0].startswith(FWD_OVER_FWD_BWD)


def test_median_confidence_interval_narrows_with_more_runs():
    assert median_ci_halfwidth([1.0]) == float("inf")
    few, many = [1.0, 1.1, 0.9], [1.0 + 0.1 * ((i * 7) % 11 - 5) / 5 for i in range(200)]
    assert median_ci_halfwidth(many) < median_ci_halfwidth(few)


def test_plot_axis_linear_clips_one_outlier_and_goes_log_for_a_wide_range():
    assert axis_range([1.1, 1.3, 4.8, 1.0]) == (None, False)
    clip, log = axis_range([1.1, 1.3, 1.2, 152.0, 1.5])
    assert clip is not None and 1.5 < clip < 152.0 and not log
    assert axis_range([0.001, 0.5, 1.2])[1]


def test_case_labels_are_readable():
    lora = {"case": "N2048_K1024_D1024_r16_p0.05",
            "params": {"N": 2048, "K": 1024, "D": 1024, "r": 16, "alpha": 32.0, "dropout": 0.05, "dtype": "f"}}
    assert case_label(lora) == "2048 tok, 1024->1024, r16, p=0.05"
    grouped = {"case": "g", "params": {"N": 64, "K": 48, "D": [48, 16, 16], "r": 4}}
    assert case_label(grouped) == "64 tok, 48->48+16+16, r4"
    linear = {"case": "l", "params": {"N": 64, "H": 40, "V": 1003, "head_trainable": True,
                                      "instruction_half_masked": True, "dtype": "f"}}
    assert case_label(linear) == "64 tok, H=40, V=1003, trainable head, half prompt"


@pytest.mark.slow
def test_plots_render_for_every_suite_from_its_smoke_cases(tmp_path):
    """Every suite of `python -m bench` (SUITES, whoever added it) runs its smoke case and plots."""
    settings = _settings(smoke=True, remeasure=0, cpu_min_reps=2, cpu_max_reps=3, cpu_budget_s=0.001)
    results = []
    for suite, builders in bench_run.SUITES.items():
        for _, build, _ in builders(settings):
            results.append(run_case(build(), settings))
    assert {r["suite"] for r in results} == set(bench_run.SUITES)
    written = plot_results([r for r in results if r["results"]], tmp_path, "smoke")
    suites_with_a_provider = {r["suite"] for r in results if any("skipped" not in row for row in r["results"][1:])}
    assert {p.name for p in written} == {f"bench_{s}.png" for s in suites_with_a_provider}
    assert {"lora", "lora_grouped", "mora", "ce"} <= suites_with_a_provider
    for path in written:
        assert path.stat().st_size > 10_000


_STEP_LIKE_CHURN = """
import ctypes, resource, torch
from bench.allocator import pin_glibc_heap
line = pin_glibc_heap()
faults = []
for _ in range(10):  # a training step's pattern: five 20 MiB tensors written, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(5 << 20, dtype=torch.float32).fill_(1.0) for _ in range(5)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = type("mallinfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in (
    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]})
print(line, "|", max(faults[-3:]), libc.mallinfo2().fordblks >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pinned_glibc_heap_keeps_freed_memory_and_reuses_it_without_page_faults():
    """bench/allocator.py: the 100 MiB a step frees stays in the heap (glibc's own trim threshold
    never exceeds 64 MiB, twice its largest dynamic mmap threshold, so unpinned the part freed at
    the top is handed back and faulted in again by the next step: ~20k faults of 4 KiB in most runs
    here), and the steps after the first few reuse it without page faults."""
    done = subprocess.run([sys.executable, "-c", _STEP_LIKE_CHURN], capture_output=True, text=True, cwd=REPO,
                          check=True)
    line, numbers = done.stdout.strip().split(" | ")
    faults, kept_mib = (int(v) for v in numbers.split())
    assert line.startswith("glibc malloc pinned"), line
    assert kept_mib >= 100, kept_mib
    assert faults < 500, faults
