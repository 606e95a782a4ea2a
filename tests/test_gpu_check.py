"""bench/gpu_check.sh without a GPU: its dry run (GPU_CHECK_DRY_RUN=1) walks every stage on CPU
at tiny shapes and must leave every output it promises; a stage broken on purpose must make it
fail and be named in summary.txt."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
PROMISED = ["env.txt", "build.log", "pytest_gpu.log", "pytest_gpu.xml", "pytest_gpu_cuda.log", "bench.log",
            "bench_all.json", "bench_lora.png", "bench_dora.png", "bench_lora_grouped.png", "bench_mora.png",
            "bench_ce.png", "bench_qlora.png",
            "summary.txt"]


def _run(out: Path, python: str, budget_s: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDPEFT_GPU_DRY_RUN")}
    env.update(GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=python, GPU_CHECK_BUDGET_S=str(budget_s))
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=budget_s + 120)


@pytest.mark.slow
def test_dry_run_walks_every_stage_and_leaves_every_output(tmp_path):
    done = _run(tmp_path, sys.executable, 420)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for name in PROMISED:
        assert (tmp_path / name).stat().st_size > 0, f"{name} missing or empty"
    summary = (tmp_path / "summary.txt").read_text()
    assert "all stages passed" in summary and "GPU_CHECK_DRY_RUN=1" in summary
    tests_log = (tmp_path / "pytest_gpu.log").read_text()
    assert " passed" in tests_log and "failed" not in tests_log
    report = json.loads((tmp_path / "bench_all.json").read_text())
    assert {c["suite"] for c in report["cases"]} == {"lora", "dora", "lora_grouped", "mora", "ce", "qlora"}
    assert not report["failures"]
    ran = {r["impl"] for c in report["cases"] for r in c["results"] if "fwd_ms" in r or "fwd_bwd_ms" in r}
    assert any("[triton]" in name for name in ran), "the triton providers were not walked"


def test_a_broken_stage_fails_the_run_and_is_named(tmp_path):
    """A python that fails every pytest run: the gpu-test stages break, the script goes on to the
    next stages, then exits non-zero and names the broken stages (a short budget keeps it quick)."""
    broken = tmp_path / "python"
    broken.write_text(f'#!/usr/bin/env bash\n[[ " $* " == *" -m pytest "* ]] && exit 3\nexec "{sys.executable}" "$@"\n')
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    done = _run(out, str(broken), 45)
    assert done.returncode != 0
    summary = (out / "summary.txt").read_text()
    assert "FAILED: gpu tests: triton, torch (exit 3)" in summary
    assert "FAILED: gpu tests: cuda backend (exit 3)" in summary
