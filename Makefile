# One-command set-up: `make test` and `make bench` create the virtual environment, install every
# dependency and the package (editable), then run. Nothing has to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusedpeft-installed

.PHONY: install test bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	# torch first: the package is installed without build isolation so that the extension
	# (when csrc/ has sources) builds against this torch instead of downloading another one.
	$(PY) -m pip install "torch>=2.4"
	$(PY) -m pip install --no-build-isolation -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench --suite all

clean:
	rm -rf $(VENV) build *.egg-info fusedpeft/*.so .pytest_cache
