# Every install goes through constraints.txt: it pins torch to the local CPU wheel and grpcio to
# the grpcio-tools release that generated protos/.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP_ALL := $(VENV)/.installed-all
STAMP_SERVE := $(VENV)/.installed-serve

.PHONY: install install-serve serve test lint typecheck unit protos bench bench-quick container-test clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_ALL): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e '.[train,export,dev]'
	touch $@ $(STAMP_SERVE)

$(STAMP_SERVE): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	touch $@

install: $(STAMP_ALL)

install-serve: $(STAMP_SERVE)

serve: install-serve
	$(BIN)/lstm-serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/pytest -q

protos: install
	$(BIN)/python -m protos.generate

bench: install
	$(BIN)/python -m benchmarks.run

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

# Builds the image on a local Debian base and runs it for real (root, apt; see deploy/README.md).
container-test: install-serve
	bash scripts/container-test.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
