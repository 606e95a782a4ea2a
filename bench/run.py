"""`python -m bench`: run the benchmark suites, print tables, write JSON and PNG plots.

    python -m bench --suite all [--device cuda|cpu] [--dtype bfloat16|float16|float32] [--out DIR]
                    [--quick] [--cases SUBSTRING[,SUBSTRING...]]

Every implementation of a case is measured in this one process, side by side, and compared with
the case's floor (ratios, not absolute numbers, are what carries between machines). The JSON is
rewritten after every case, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import ce, dora, lora, lora_grouped, mora, qlora
from bench.allocator import pin_glibc_heap
from bench.common import Settings, run_case
from bench.memory import validate_cpu_method
from bench.plot import plot_results
from bench.providers import INTERPRETED_TRITON
from bench.timing import Progress

REPO = Path(__file__).resolve().parent.parent
SUITES = {"lora": lora.cases, "dora": dora.cases, "lora_grouped": lora_grouped.cases, "mora": mora.cases,
          "ce": ce.cases, "qlora": qlora.cases}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/results/local)")
    parser.add_argument("--quick", action="store_true", help="fewer timed runs (smoke test)")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny case per suite with --quick's timing: checks that every suite runs, "
                             "measures nothing worth reading (bench/gpu_check.sh's dry run)")
    parser.add_argument("--cases", default=None, help="comma-separated substrings of 'suite/case' to keep")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU: leave glibc's heap thresholds alone (default: pinned, bench/allocator.py, so that "
                             "page faults do not depend on the providers run before)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the rest is listed as not run)")
    return parser.parse_args(argv)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Device, library versions, date, CPU count, fusedpeft backends: what the numbers depend on."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "versions": {d: _version(d) for d in ("triton", "transformers", "peft", "liger-kernel", "cut-cross-entropy",
                                              "matplotlib", "numpy", "pytest-benchmark")},
        "git_commit": _git("rev-parse", "HEAD"),
    }
    info["git_dirty"] = bool(_git("status", "--porcelain")) if info["git_commit"] else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    try:
        import fusedpeft

        info["fusedpeft"] = getattr(fusedpeft, "__version__", "?")
        info["fusedpeft_backends"] = fusedpeft.available_backends()
    except Exception as exc:  # noqa: BLE001
        info["fusedpeft_backends"] = f"unavailable: {type(exc).__name__}: {exc}"
    return info


def _selected(suite_names, settings: Settings, filters: list[str] | None) -> list[tuple[str, str, object]]:
    """(suite, case name, builder) to run: every priority-0 case of every suite, then the rest."""
    chosen = []
    for suite in suite_names:
        for name, build, priority in SUITES[suite](settings):
            if not filters or any(f in f"{suite}/{name}" for f in filters):
                chosen.append((priority, suite, name, build))
    return [(suite, name, build) for _, suite, name, build in sorted(chosen, key=lambda c: c[0])]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = None
    if device.type == "cpu":
        allocator = "glibc defaults (--default-malloc)" if args.default_malloc else pin_glibc_heap()
    settings = Settings.make(device, dtype, args.quick, args.smoke)
    INTERPRETED_TRITON["allowed"] = args.smoke and os.environ.get("TRITON_INTERPRET") == "1"
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results" / "local")
    out_dir.mkdir(parents=True, exist_ok=True)
    suite_names = list(SUITES) if args.suite == "all" else [args.suite]
    filters = [f for f in args.cases.split(",") if f] if args.cases else None

    info = machine_info(device)
    info["cpu_allocator"] = allocator or ("not pinned: no glibc mallopt" if device.type == "cpu" else None)
    print(f"fusedpeft bench: suites {suite_names} on {info['device_name']} ({device}), {str(dtype)[6:]}, "
          f"{'smoke' if args.smoke else 'quick' if args.quick else 'full'}; torch {info['torch']}, "
          f"{info['cpu_count']} CPUs, {info['date']}")
    print(f"fusedpeft backends: {info['fusedpeft_backends']}")
    if info["cpu_allocator"]:
        print(f"CPU allocator: {info['cpu_allocator']}")
    report = {"machine": info, "settings": {k: str(v) for k, v in vars(settings).items()}, "cases": []}
    if device.type == "cpu":
        checks = validate_cpu_method()
        report["cpu_memory_method_check"] = {k: {"measured": m, "expected": e} for k, (m, e) in checks.items()}
        print("CPU peak-memory method check (measured / expected bytes): "
              + "; ".join(f"{k}: {m}/{e}" for k, (m, e) in checks.items()))

    json_path = out_dir / f"bench_{args.suite}.json"
    start = time.perf_counter()
    not_run = []
    selected = _selected(suite_names, settings, filters)
    progress = Progress(len(selected), settings)
    print(f"{len(selected)} cases, estimated ~{progress.estimate_total_s() / 60:.0f} min (refined after each case)",
          flush=True)
    for suite, name, build in selected:
        print(progress.line(f"{suite}/{name}"), flush=True)
        progress.case_done()
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            not_run.append(f"{suite}/{name}")
            continue
        try:
            case = build()
        except Exception as exc:  # noqa: BLE001 - keep the other cases
            print(f"\n== {suite} / {name}: could not build inputs ({type(exc).__name__}: {exc})")
            error = f"{type(exc).__name__}: {exc}"
            report["cases"].append({"suite": suite, "case": name, "error": error, "results": []})
            continue
        report["cases"].append(run_case(case, settings))
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        json_path.write_text(json.dumps(report, indent=1, default=str))

    measured = [c for c in report["cases"] if c.get("results")]
    label = f"{info['device_name']}, {str(dtype)[6:]}, torch {info['torch']}"
    plots = plot_results(measured, out_dir, label)
    failures = [f"{c['suite']}/{c['case']}: {r['impl']}: {r['skipped']}" for c in report["cases"]
                for r in c.get("results", []) if r.get("skipped", "").startswith("failed")]
    failures += [f"{c['suite']}/{c['case']}: {c['error']}" for c in report["cases"] if "error" in c]
    report["failures"] = failures
    report["not_run_time_budget"] = not_run
    flagged = [f"{c['suite']}/{c['case']}: {impl}: {'; '.join(flags)}" for c in report["cases"]
               for impl, flags in c.get("flags", {}).items()]
    report["flagged"] = flagged
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{len(report['cases'])} cases in {report['elapsed_s']} s; wrote {json_path}"
          + "".join(f", {p}" for p in plots))
    if not_run:
        print(f"NOT RUN (--budget-s {args.budget_s:g} used up): " + ", ".join(not_run))
    if flagged:
        print(f"FLAGGED ({len(flagged)} rows whose numbers contradict each other after every measurement; "
              "the machine was too noisy for them):\n  " + "\n  ".join(flagged))
    if failures:
        print("FAILED providers (an exception, not a missing dependency):\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
