#!/usr/bin/env bash
# The one command for a GPU machine (docs/verifying.md §3):
#   bench/gpu_check.sh                      # or: OUT=/some/dir bench/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bench/gpu_check.sh  # the same stages on CPU, tiny shapes (tests/test_gpu_check.py)
# Stages, most valuable first; each writes into $OUT as it finishes, so a run cut short still
# returns what it got:
# 1. nvidia-smi and versions                               -> env.txt
# 2. fusedpeft._C built for sm_90 only, IN THE BACKGROUND  -> build.log
# 3. gpu tests of the backends that need no extension       -> pytest_gpu.log, pytest_gpu.xml
#    (triton, torch: output and every gradient at Llama shapes, dropout masks bit for bit)
# 4. wait for the build; gpu tests of the "cuda" backend    -> pytest_gpu_cuda.log, pytest_gpu_cuda.xml
# 5. every benchmark suite, headline cases first            -> bench.log, bench_all.json, bench_*.png
# 6. the outputs above checked, per-stage times             -> summary.txt
# OUT defaults to bench/results/<date>-gpu. fusedpeft is used from this checkout (PYTHONPATH);
# nothing is installed. Every stage has a timeout cut to what is left of a ${GPU_CHECK_BUDGET_S:-420} s
# budget (the whole script stays under 8 minutes with the machine's start); a failed stage does not
# stop the next one; the exit status is non-zero if any stage failed or an output is missing.
# The dry run (GPU_CHECK_DRY_RUN=1): no GPU is used; the build is skipped (the extension already
# built here is imported instead), the gpu tests run on CPU tensors at tiny shapes in fp32
# (FUSEDPEFT_GPU_DRY_RUN=1, Triton under TRITON_INTERPRET=1), the benchmarks run one tiny case
# per suite (--smoke). It checks the plumbing, not the numbers.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
PY=${PYTHON:-$(command -v python || command -v python3)}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
OUT=${OUT:-bench/results/$(date +%F)-gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && export OUT

BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
START=$(date +%s)
FAILED=()
TIMES=()
if [[ "$DRY_RUN" == 1 ]]; then
    export FUSEDPEFT_GPU_DRY_RUN=1 TRITON_INTERPRET=1
    BENCH_ARGS=(--device cpu --dtype float32 --smoke)
else
    BENCH_ARGS=(--device cuda --dtype bfloat16)
fi
export PY REPO BUDGET_S START DRY_RUN

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME MAX_SECONDS FUNCTION: run the shell function under a timeout of min(MAX_SECONDS, time left)
stage() {
    local name=$1 max=$2 fn=$3 limit rc began
    limit=$(left)
    (( limit > max )) && limit=$max
    if (( limit < 5 )); then
        echo "== $name: not run, the ${BUDGET_S} s budget is used up"
        FAILED+=("$name (not run: budget used up)")
        return
    fi
    echo "== $name (timeout ${limit} s)"
    began=$(date +%s)
    timeout --kill-after=5 "$limit" bash -c "$fn"
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - began )) s"
    TIMES+=("$name: $(( $(date +%s) - began )) s, exit $rc")
    if (( rc == 124 || rc == 137 )); then
        FAILED+=("$name (timed out after ${limit} s)")
    elif (( rc != 0 )); then
        FAILED+=("$name (exit $rc)")
    fi
}

record_env() {
    {
        echo "date: $(date -Is)"
        echo "repo: $REPO  commit: $(git rev-parse HEAD 2>/dev/null || echo 'n/a (no git metadata)')"
        [[ "$DRY_RUN" == 1 ]] && echo "GPU_CHECK_DRY_RUN=1: CPU tensors, tiny shapes; no GPU number in this folder"
        nvidia-smi || echo "nvidia-smi failed"
        "$PY" - <<'PY'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
except Exception as exc:
    print("torch import failed:", exc)
for name in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "cut_cross_entropy", "matplotlib",
             "pytest_benchmark", "numpy"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
PY
        command -v nvcc >/dev/null && nvcc --version | tail -2
    } >"$OUT/env.txt" 2>&1
}

build_extension() {
    # only the GPU's architecture; the CUDA kernels (csrc/cuda/kernels.cu) include no torch header
    local began=$(date +%s)
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "dry run: build skipped, the extension built here is imported instead" >"$OUT/build.log"
    else
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
            || return 1
        echo "fusedpeft._C built in $(( $(date +%s) - began )) s" >>"$OUT/build.log"
    fi
    "$PY" -c "import fusedpeft._C as c; print('fusedpeft._C built_with_cuda =', c.built_with_cuda)" >>"$OUT/build.log" 2>&1
}

# gpu_tests NAME PYTEST_K: the gpu-marked tests selected by -k, into $OUT/NAME.log and .xml
gpu_tests() {
    "$PY" -m pytest -m gpu tests -k "$2" -q -p no:cacheprovider --junitxml="$OUT/$1.xml" >"$OUT/$1.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/$1.log"
    (( rc == 5 )) && { echo "(no gpu tests collected)"; return 0; }
    return $rc
}

wait_for_build() {
    # the build runs in the background from the start; this stage waits for it and reports its result
    while kill -0 "$BUILD_PID" 2>/dev/null; do sleep 1; done
    local rc
    rc=$(cat "$OUT/.build_rc" 2>/dev/null || echo 1)
    tail -n 3 "$OUT/build.log"
    return "$rc"
}

benchmarks() {
    set -o pipefail
    # start no new case in the last 40 s: time for the case in flight and the plots
    local budget=$(( $(left) - 40 ))
    (( budget < 10 )) && budget=10
    "$PY" -u -m bench --suite all "${BENCH_ARGS[@]}" --out "$OUT" --budget-s "$budget" 2>&1 | tee "$OUT/bench.log"
}

check_outputs() {
    local missing=() f
    for f in env.txt build.log pytest_gpu.log pytest_gpu.xml pytest_gpu_cuda.log bench.log bench_all.json; do
        [[ -s "$OUT/$f" ]] || missing+=("$f")
    done
    # a plot for every suite that measured a case; a suite that measured none (a library missing on
    # the machine, say) is named with its reasons, not counted as a failure
    [[ -s "$OUT/bench_all.json" ]] && missing+=($("$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
report = json.loads((out / "bench_all.json").read_text())
suites = {}
for case in report["cases"]:
    measured = any("fwd_bwd_ms" in row or "fwd_ms" in row for row in case.get("results", []))
    suites[case["suite"]] = suites.get(case["suite"], False) or measured
for suite, measured in suites.items():
    if measured and not (out / f"bench_{suite}.png").is_file():
        print(f"bench_{suite}.png")
    elif not measured:
        reasons = sorted({row.get("skipped", "?") for c in report["cases"] if c["suite"] == suite
                          for row in c.get("results", [])})
        print(f"note: suite {suite} measured nothing: {'; '.join(reasons)[:300]}", file=sys.stderr)
PY
))
    if (( ${#missing[@]} )); then
        echo "missing or empty in $OUT: ${missing[*]}"
        return 1
    fi
    echo "every promised output is in $OUT"
}

export -f left record_env build_extension gpu_tests wait_for_build benchmarks check_outputs
BENCH_ARGS_STR="${BENCH_ARGS[*]}"  # arrays do not cross into the stages' bash -c

stage "environment" 30 record_env
(build_extension; echo $? >"$OUT/.build_rc") &
BUILD_PID=$!
export BUILD_PID
stage "gpu tests: triton, torch" 150 "gpu_tests pytest_gpu 'not cuda'"
stage "build fusedpeft._C (sm_90, started in the background)" 150 wait_for_build
stage "gpu tests: cuda backend" 60 "gpu_tests pytest_gpu_cuda cuda"
stage "benchmarks" 400 "BENCH_ARGS=($BENCH_ARGS_STR); benchmarks"
stage "outputs" 10 check_outputs
rm -f "$OUT/.build_rc"

{
    echo "gpu_check finished in $(( $(date +%s) - START )) s; outputs in $OUT"
    [[ "$DRY_RUN" == 1 ]] && echo "GPU_CHECK_DRY_RUN=1: CPU, tiny shapes; nothing here measures a GPU"
    printf 'stage %s\n' "${TIMES[@]}"
    grep -h "^NOT RUN" "$OUT/bench.log" 2>/dev/null
    if (( ${#FAILED[@]} )); then
        printf 'FAILED: %s\n' "${FAILED[@]}"
    else
        echo "all stages passed"
    fi
} | tee "$OUT/summary.txt"
(( ${#FAILED[@]} == 0 ))
