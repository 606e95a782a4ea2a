"""PNG plots of a run: per suite, fwd+bwd time and peak extra memory of every provider as a ratio
against the case's floor (log scale; 1.0 = the floor). Uses matplotlib's Agg backend; without
matplotlib the plot is skipped with a printed reason."""

from __future__ import annotations

import math
from pathlib import Path

from bench.report import time_ratio


def _ratio(row: dict, floor: dict, key: str) -> float:
    if "skipped" in row or "skipped" in floor or not floor.get(key):
        return math.nan
    if key == "fwd_bwd_ms":
        return time_ratio(row, floor, "fwd_bwd")
    return row[key] / floor[key]


def plot_suite(cases: list[dict], title: str, path: Path) -> Path | None:
    """Grouped bars (one group per case, one bar per non-floor provider) for time and memory ratios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except Exception as exc:  # noqa: BLE001
        print(f"plot skipped: matplotlib not importable ({type(exc).__name__}: {exc})")
        return None
    impls: list[str] = []
    for case in cases:
        for row in case["results"][1:]:
            if "skipped" not in row and row["impl"] not in impls:
                impls.append(row["impl"])
    if not impls:
        print(f"plot skipped for {title}: no provider besides the floor was measured")
        return None
    width = 0.8 / len(impls)
    fig_width = min(40.0, max(8.0, 0.35 * len(cases) * len(impls) + 2))
    fig, axes = plt.subplots(2, 1, figsize=(fig_width, 8), sharex=True)
    metrics = (("fwd_bwd_ms", "fwd+bwd time / floor"), ("peak_extra_bytes", "peak extra memory / floor"))
    for ax, (key, label) in zip(axes, metrics):
        for i, impl in enumerate(impls):
            values = []
            for case in cases:
                floor = case["results"][0]
                row = next((r for r in case["results"][1:] if r["impl"] == impl), {"skipped": ""})
                values.append(_ratio(row, floor, key))
            positions = [c + (i - (len(impls) - 1) / 2) * width for c in range(len(cases))]
            # bars grow from the floor (1.0): up when slower / larger, down when faster / smaller
            ax.bar(positions, [v - 1.0 for v in values], width, bottom=1.0, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel(label)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=7, ncol=min(4, len(impls)))
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([c["case"] for c in cases], rotation=35, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_results(cases: list[dict], out_dir: Path, label: str) -> list[Path]:
    """One PNG per suite present in ``cases``: out_dir / bench_<suite>.png."""
    written = []
    for suite in dict.fromkeys(c["suite"] for c in cases):
        suite_cases = [c for c in cases if c["suite"] == suite]
        path = plot_suite(suite_cases, f"{suite} — {label}", out_dir / f"bench_{suite}.png")
        if path is not None:
            written.append(path)
    return written
