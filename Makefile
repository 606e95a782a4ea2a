# One-command set-up: `make test` and `make bench` create the virtual environment, install every
# dependency and the package (editable), build the C++/CUDA extension fusedpeft._C in place, then
# run. Nothing has to be installed by hand. The extension is rebuilt (incrementally, by ninja)
# whenever a file under csrc/ changes; FUSEDPEFT_SKIP_EXT=1 skips it, FUSEDPEFT_SKIP_CUDA=1 builds
# it for the CPU only. Unset, FUSEDPEFT_SKIP_CUDA becomes 1 when torch is not a CUDA build or sees no
# GPU (setup.py also leaves CUDA out without a toolkit); FUSEDPEFT_SKIP_CUDA=0 compiles CUDA anyway.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedpeft-installed
EXT_STAMP := $(VENV)/.fusedpeft-ext
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) 2>/dev/null)

.PHONY: install test bench compat gpu-check-dry-run clean

install: $(EXT_STAMP)

$(STAMP): setup.py Makefile pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	# torch first: the package is installed without build isolation so that the extension
	# builds against this torch instead of downloading another one.
	$(PY) -m pip install "torch>=2.11"
	# the package and its dependencies; the extension is built by the next rule, in place
	FUSEDPEFT_SKIP_EXT=1 $(PY) -m pip install --no-build-isolation -e ".[dev]"
	touch $(STAMP)

$(EXT_STAMP): $(STAMP) $(CSRC)
	@if [ "$${FUSEDPEFT_SKIP_EXT:-0}" = 1 ]; then \
		rm -f fusedpeft/_C*.so; echo "FUSEDPEFT_SKIP_EXT=1: fusedpeft._C not built"; \
	else \
		start=$$(date +%s); \
		if [ -z "$${FUSEDPEFT_SKIP_CUDA:-}" ] && ! $(PY) -c "import sys, torch; sys.exit(not (torch.version.cuda and torch.cuda.is_available()))"; then \
			export FUSEDPEFT_SKIP_CUDA=1; \
			echo "no usable GPU (torch $$($(PY) -c 'import torch; print(torch.__version__)'), no CUDA device visible): building the CPU part only (FUSEDPEFT_SKIP_CUDA=0 to compile CUDA anyway)"; \
		fi; \
		PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) setup.py build_ext --inplace || exit 1; \
		echo "fusedpeft._C built in $$(( $$(date +%s) - start )) s"; \
		touch $(EXT_STAMP); \
	fi

test: $(EXT_STAMP)
	$(PY) -m pytest -q tests

bench: $(EXT_STAMP)
	$(PY) -m bench --suite all

# The GPU image's versions (Python 3.12, torch 2.11, Triton 3.6): a second venv, the extension built
# against it, the AOT compiles and the torch/cpu test files (tools/compat_check.sh). Not part of
# `make test`: it takes over 10 minutes on the 2-core machine (README); run it before submitting
# kernel, setup.py or dependency changes.
compat:
	tools/compat_check.sh

# bench/gpu_check.sh's every stage on CPU at tiny shapes (also run by tests/test_gpu_check.py)
gpu-check-dry-run: $(EXT_STAMP)
	GPU_CHECK_DRY_RUN=1 PYTHON=$(PY) OUT=$${OUT:-bench/results/local/gpu-check-dry-run} bench/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-compat build *.egg-info fusedpeft/*.so .pytest_cache
