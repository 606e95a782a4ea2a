#!/usr/bin/env bash
# `make compat`: fusedpeft under the GPU image's versions (Python 3.12, torch 2.11.0, Triton 3.6.0,
# transformers 5.17.0, peft), on a machine without a GPU:
#   1. a venv with exactly those versions ($COMPAT_VENV, default .venv-compat; made once, kept)
#   2. the extension built against torch 2.11 for sm_90 (fusedpeft/_C.cpython-312-*.so, beside the
#      CI venv's build; build/temp.*-cpython-312 keeps it incremental)
#   3. every Triton kernel config compiled ahead of time for sm_80 / sm_90: no spills, wgmma
#   4. the torch / cpu backend, layer, loss, compile, integration, extension and QLoRA test files
#      (bitsandbytes is installed there too, though the GPU image may lack it)
# Triton 3.6's interpreter fails on numpy 2.x (int() of a 1-element array in its __index__), so
# the Triton kernels are checked here by compiling them, not by interpreting them
# (TRITON_INTERPRET=0: the triton backend reports itself unavailable on CPU tensors).
# Exit status non-zero on any failure. The build log goes to $COMPAT_BUILD_LOG (default
# build/compat_build.log), the rest to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${COMPAT_VENV:-.venv-compat}
find_python312() {  # the first candidate that really runs 3.12 (a pyenv shim may exist and refuse)
    local candidate
    for candidate in "${COMPAT_PYTHON:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
                     /usr/bin/python3.12 /usr/local/bin/python3.12; do
        [[ -n "$candidate" ]] || continue
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}
PINS=("torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "peft" "safetensors" "pytest" "pytest-benchmark"
      "ninja" "numpy" "accelerate" "bitsandbytes")
STAMP="$VENV/.compat-$(printf '%s ' "${PINS[@]}" | md5sum | cut -c1-12)"
TESTS=(tests/test_triton_aot.py tests/test_triton_*_aot.py  # every Triton kernel config, AOT
       tests/test_backends.py tests/test_ops.py tests/test_compile.py tests/test_lora_layer.py tests/test_mora_layer.py
       tests/test_losses.py tests/test_causal_lm.py tests/test_peft_io.py tests/test_integrations_models.py
       tests/test_cpp_extension.py tests/test_spec_cross_entropy.py tests/test_spec_lora_peft.py tests/test_spec_mora.py
       tests/test_dequant_4bit.py tests/test_qlora_layer.py tests/test_dora.py tests/test_dora_peft_io.py
       tests/test_ce_normalize.py tests/test_hardening.py tests/test_cpu_dora_kernels.py)
start=$(date +%s)
step() { echo "== compat: $1 ($(( $(date +%s) - start )) s)"; }

if [[ ! -f "$STAMP" ]]; then
    PY312=$(find_python312) || { echo "compat: no working python3.12 found (set COMPAT_PYTHON)" >&2; exit 2; }
    step "creating $VENV with $("$PY312" --version)"
    rm -rf "$VENV"
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    "$VENV/bin/python" -m pip install -q "${PINS[@]}"
    touch "$STAMP"
fi
"$VENV/bin/python" - <<'PY'
import platform, torch, triton, transformers
print(f"compat: python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
assert platform.python_version().startswith("3.12.") and torch.__version__.startswith("2.11.0")
assert triton.__version__.startswith("3.6.")
PY

step "building fusedpeft._C against torch 2.11 (sm_90)"
PATH="$(pwd)/$VENV/bin:$PATH" TORCH_CUDA_ARCH_LIST=9.0 "$VENV/bin/python" setup.py -q build_ext --inplace \
    >"${COMPAT_BUILD_LOG:-build/compat_build.log}" 2>&1 || { tail -n 30 "${COMPAT_BUILD_LOG:-build/compat_build.log}"; exit 1; }
"$VENV/bin/python" -c "import fusedpeft._C as c; print('compat: fusedpeft._C built_with_cuda =', c.built_with_cuda)"

step "pytest (AOT sm_80/sm_90 under Triton 3.6, torch/cpu backends, integrations)"
TRITON_INTERPRET=0 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step "passed"
