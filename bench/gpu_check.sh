#!/usr/bin/env bash
# The one command for a GPU machine (DESIGN §3.7):
#   bench/gpu_check.sh            # or: OUT=/some/dir bench/gpu_check.sh
# 1. records nvidia-smi and versions            -> $OUT/env.txt
# 2. builds fusedpeft._C in place (csrc/*.cpp)  -> $OUT/build.log      (only if csrc/ has .cpp sources)
# 3. runs the gpu tests                         -> $OUT/pytest_gpu.log, $OUT/pytest_gpu.xml
# 4. runs every benchmark suite on cuda, bf16   -> $OUT/bench.log, bench_all.json, bench_*.png
# OUT defaults to bench/results/<date>-gpu. fusedpeft is used from this checkout (PYTHONPATH);
# nothing is installed. Every stage has a timeout cut to what is left of a 390 s budget (the
# whole script stays under 7 minutes); a failed stage does not stop the next one; the exit status
# is non-zero if any stage failed.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-bench/results/$(date +%F)-gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && export OUT

BUDGET_S=${GPU_CHECK_BUDGET_S:-390}
START=$(date +%s)
FAILED=()
export PY REPO BUDGET_S START

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
for name in ("triton", "transformers", "peft", "liger_kernel", "cut_cross_entropy", "matplotlib", "pytest_benchmark"):
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
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || return 1
    echo "fusedpeft._C built in $(( $(date +%s) - began )) s" >>"$OUT/build.log"
    "$PY" -c "import fusedpeft._C as c; print('fusedpeft._C built_with_cuda =', c.built_with_cuda)" >>"$OUT/build.log" 2>&1
}

gpu_tests() {
    "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/pytest_gpu.log"
    (( rc == 5 )) && { echo "(no gpu tests collected)"; return 0; }
    return $rc
}

benchmarks() {
    set -o pipefail
    # start no new case in the last 40 s: time for the case in flight and the plots
    local budget=$(( $(left) - 40 ))
    (( budget < 10 )) && budget=10
    "$PY" -u -m bench --suite all --device cuda --dtype bfloat16 --out "$OUT" --budget-s "$budget" \
        2>&1 | tee "$OUT/bench.log"
}

export -f left record_env build_extension gpu_tests benchmarks

stage "environment" 30 record_env
if compgen -G "csrc/*.cpp" >/dev/null; then
    stage "build fusedpeft._C" 150 build_extension
    tail -n 3 "$OUT/build.log"
else
    echo "== build: skipped, csrc/ has no .cpp sources" | tee "$OUT/build.log"
fi
stage "pytest -m gpu" 100 gpu_tests
stage "benchmarks" 400 benchmarks

{
    echo "gpu_check finished in $(( $(date +%s) - START )) s; outputs in $OUT"
    if (( ${#FAILED[@]} )); then
        printf 'FAILED: %s\n' "${FAILED[@]}"
    else
        echo "all stages passed"
    fi
} | tee "$OUT/summary.txt"
(( ${#FAILED[@]} == 0 ))
