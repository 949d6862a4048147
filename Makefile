# sdserve: `make demo` runs the service once end to end, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck unit demo serve bench clean

venv: $(STAMP)

# Pinned installs: every version comes from requirements.lock (torch is the CPU/CUDA wheel already on disk).
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check serving models tests
	$(BIN)/ruff format --check serving models tests

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit -q

test: lint typecheck
	$(BIN)/pytest -q

demo: venv
	$(BIN)/sdserve demo --out out

serve: venv
	$(BIN)/sdserve serve

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
