"""PNG plots of a run: per suite, fwd+bwd time and peak extra memory of every provider as a ratio
against the case's floor (1.0 = the floor, named in the axis label), the value printed on every bar.
Linear axes unless the values span more than ``LOG_SPAN``; one outlier that would squash the rest
is clipped (hatched, its value printed). Rows flagged by the consistency checks carry a "!".
Uses matplotlib's Agg backend; without matplotlib the plot is skipped with a printed reason."""

from __future__ import annotations

import math
from pathlib import Path

from bench.report import time_ratio

LOG_SPAN = 100.0     # max / min of the shown values above which the axis is logarithmic
OUTLIER = 4.0        # the largest value, above OUTLIER x the second largest (and above 3x), is clipped


def _ratio(row: dict, floor: dict, key: str) -> float:
    if "skipped" in row or "skipped" in floor or not floor.get(key):
        return math.nan
    if key == "fwd_bwd_ms":
        return time_ratio(row, floor, "fwd_bwd")
    return row[key] / floor[key]


def case_label(case: dict) -> str:
    """A readable label from a case's params, e.g. "2048 tok, 1024->1024, r16, p=0.05"."""
    params = dict(case.get("params") or {})
    if not params:
        return case["case"]
    parts = []
    if "N" in params:
        parts.append(f"{params.pop('N')} tok")
    if "K" in params and "D" in params:
        out = params.pop("D")
        parts.append(f"{params.pop('K')}->{'+'.join(map(str, out)) if isinstance(out, list) else out}")
    for key, fmt in (("H", "H={}"), ("V", "V={}"), ("mora_type", "type{}"), ("r", "r{}")):
        if key in params:
            parts.append(fmt.format(params.pop(key)))
    if "dropout" in params:
        parts.append(f"p={params.pop('dropout'):g}")
    if "head_trainable" in params:
        parts.append("trainable head" if params.pop("head_trainable") else "frozen head")
    if params.pop("instruction_half_masked", False):
        parts.append("half prompt")
    if "variant" in params:
        parts.append(str(params.pop("variant")))
    for key in ("dtype", "alpha", "r_hat", "pad"):
        params.pop(key, None)
    parts += [f"{k}={v}" for k, v in params.items()]
    return ", ".join(parts)


def axis_range(values: list[float]) -> tuple[float | None, bool]:
    """(clip: bars above it are cut there, or None; log: whether the axis is logarithmic).

    The largest value is clipped when it is above OUTLIER x the second largest (and above 3x):
    one outlier would squash every other bar."""
    finite = sorted(v for v in values if math.isfinite(v) and v > 0)
    if not finite:
        return None, False
    clip = None
    if len(finite) >= 2 and finite[-1] > max(3.0, OUTLIER * finite[-2]):
        clip = max(2.0, 1.25 * finite[-2])
    shown_max = min(finite[-1], clip or math.inf)
    return clip, max(shown_max, 1.0) / min(finite[0], 1.0) > LOG_SPAN


def _draw_metric(ax, cases: list[dict], impls: list[str], key: str, label: str) -> None:
    width = 0.8 / len(impls)
    per_impl = {}
    for impl in impls:
        values, flagged = [], []
        for case in cases:
            floor = case["results"][0]
            row = next((r for r in case["results"][1:] if r["impl"] == impl), {"skipped": ""})
            values.append(_ratio(row, floor, key))
            flagged.append(bool(row.get("flags")) or bool(floor.get("flags")))
        per_impl[impl] = (values, flagged)
    clip, log = axis_range([v for values, _ in per_impl.values() for v in values])
    for i, impl in enumerate(impls):
        values, flagged = per_impl[impl]
        positions = [c + (i - (len(impls) - 1) / 2) * width for c in range(len(cases))]
        heights = [min(v, clip) if clip and math.isfinite(v) else v for v in values]
        bars = ax.bar(positions, heights, width, label=impl, color=f"C{i}")
        for bar, value in zip(bars, values):
            if clip and math.isfinite(value) and value > clip:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        texts = ["" if not math.isfinite(v) else f"{v:.2f}x" if v < 10 else f"{v:.0f}x" for v in values]
        texts = [t + ("!" if t and f else "") + (" (clipped)" if clip and math.isfinite(v) and v > clip else "")
                 for t, f, v in zip(texts, flagged, values)]
        ax.bar_label(bars, labels=texts, fontsize=7, rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.9, linestyle="--")
    if log:
        ax.set_yscale("log")
    else:
        top = max([1.0] + [min(v, clip or math.inf) for values, _ in per_impl.values() for v in values
                           if math.isfinite(v)])
        ax.set_ylim(0, top * 1.35)
    floors = " / ".join(dict.fromkeys(c["floor"] for c in cases))
    ax.set_ylabel(f"{label} / floor\n(1.0 = {floors})", fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)


def plot_suite(cases: list[dict], title: str, path: Path) -> Path | None:
    """Grouped bars (one group per case, one bar per non-floor provider) for time and memory ratios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
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
    fig_width = min(40.0, max(8.0, 0.45 * len(cases) * len(impls) + 2))
    fig, axes = plt.subplots(2, 1, figsize=(fig_width, 9), sharex=True)
    for ax, (key, label) in zip(axes, (("fwd_bwd_ms", "fwd+bwd time"), ("peak_extra_bytes", "peak extra memory"))):
        _draw_metric(ax, cases, impls, key, label)
    axes[0].set_title(title + ("   (! = flagged by the consistency checks)"
                               if any(r.get("flags") for c in cases for r in c["results"]) else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([case_label(c) for c in cases], rotation=25, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
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
