"""The text table printed for every case: times, peak memory, ratios against the floor, throughput."""

from __future__ import annotations

MIB = 2**20


def time_ratio(row: dict, floor: dict, key: str) -> float | None:
    """row's time over the floor's: the paired per-round ratio when measured (CPU), else the
    ratio of the medians."""
    if f"{key}_paired_ratio" in row:
        return row[f"{key}_paired_ratio"]
    return row[f"{key}_ms"] / floor[f"{key}_ms"] if floor.get(f"{key}_ms") else None


def _ratio(value, floor) -> str:
    if value is None or not floor:
        return "-"
    return f"{value / floor:.2f}x"


def _shown(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _spread(row: dict, key: str) -> str:
    """The interquartile range in percent of the median ("-" with fewer than 4 runs)."""
    runs = row.get("timed_runs", {}).get(key, 0)
    return f"{100 * row[f'{key}_rel_iqr']:.0f}%" if runs >= 4 and f"{key}_rel_iqr" in row else "-"


def format_case(result: dict) -> str:
    """Text table of one case: times (median, IQR in % of it), memory, ratios against the floor
    (first row), throughput; a row marked "!" failed the consistency checks (listed below)."""
    rows = result["results"]
    floor = rows[0] if "skipped" not in rows[0] else {}
    lines = [f"\n== {result['suite']} / {result['case']}   (floor: {result['floor']})",
             f"   work: {result['formula']}"]
    lines += [f"   note: {note}" for note in result["notes"]]
    header = (f"   {'impl':<34}{'fwd ms':>10}{'iqr':>5}{'x floor':>9}{'fwd+bwd ms':>12}{'iqr':>5}{'x floor':>9}"
              f"{'peak MiB':>11}{'x floor':>9}{'TFLOP/s':>9}{'GB/s':>8}{'rel err':>10}")
    lines += [header, "   " + "-" * (len(header) - 3)]
    for row in rows:
        if "skipped" in row:
            lines.append(f"   {row['impl']:<34}skipped: {row['skipped']}")
            continue
        err = row["rel_err_vs_reference"]
        lines.append(
            f"{'!' if row.get('flags') else ' ':>3}{row['impl']:<34}{row['fwd_ms']:>10.3f}{_spread(row, 'fwd'):>5}"
            f"{_shown(time_ratio(row, floor, 'fwd')):>9}"
            f"{row['fwd_bwd_ms']:>12.3f}{_spread(row, 'fwd_bwd'):>5}{_shown(time_ratio(row, floor, 'fwd_bwd')):>9}"
            f"{row['peak_extra_bytes'] / MIB:>11.1f}{_ratio(row['peak_extra_bytes'], floor.get('peak_extra_bytes')):>9}"
            f"{row['tflops_fwd_bwd']:>9.3g}{row['gbps_fwd_bwd']:>8.3g}{'-' if err is None else f'{err:.1e}':>10}"
            + (f"   (compiled in {row['compile_s']:.1f} s)" if "compile_s" in row else ""))
    measurements = max((row.get("measurements", 1) for row in rows), default=1)
    for impl, flags in result.get("flags", {}).items():
        lines.append(f"   ! {impl}: {'; '.join(flags)} -- still after {measurements} measurements: do not trust this row")
    if measurements > 1 and not result.get("flags"):
        lines.append(f"   (measured {measurements} times: the first measurement failed the consistency checks)")
    return "\n".join(lines)
