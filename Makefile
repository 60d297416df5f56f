# stock-sensitivity: the two commands of the quick start are `make run` and `make test`.
#
#   make run     create .venv, install, run the whole pipeline on the bundled sample (offline)
#   make test    install the dev extras and run the test suite
#   make lint    ruff (lint + format check) and mypy
#   make bench   the kernel against statsmodels RollingOLS, a numpy lstsq loop and the memory floor
#                (quick grid, a few minutes); make bench-full: the whole grid; make bench-pipeline:
#                the flow end to end (500 symbols x 20 years, backfill then the next day three
#                times through `sensitivity run` and three times as the served daily deployment,
#                against a Prefect server on 127.0.0.1, as scheduled runs go)
#   make audit   pip-audit: known vulnerabilities of everything installed in .venv (needs pypi.org)
#
# torch is installed first, pinned to the CPU build (TORCH_SPEC), so that resolving the
# project's own `torch>=2.4,<3` range never pulls a multi-GB CUDA build.  Elsewhere,
# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU wheel from PyTorch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG ?= config/sample.toml

.PHONY: run test lint bench bench-full bench-pipeline audit clean venv install install-dev

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-audit: pyproject.toml $(VENV)/.installed
	$(PIP) install --quiet -e ".[audit]"
	touch $@

venv install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(VENV)/bin/sensitivity run --config $(CONFIG)

test: $(VENV)/.installed-dev
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_kernel.py

bench-full: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_kernel.py --full

bench-pipeline: $(VENV)/.installed
	$(PY) benchmarks/bench_pipeline.py --server --repeat 3 --deployment

# The project itself is not on PyPI (--skip-editable); the README notes the last result.
audit: $(VENV)/.installed-audit
	$(VENV)/bin/pip-audit --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data/prices data/reports data/.lock
