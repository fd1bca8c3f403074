# Every install goes through constraints.txt: it pins torch to the local CPU wheel and grpcio to
# the grpcio-tools release that generated protos/.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP_ALL := $(VENV)/.installed-all
STAMP_SERVE := $(VENV)/.installed-serve
STAMP_BENCH := $(VENV)/.installed-bench

.PHONY: install install-serve system-deps monitoring-check serve test fuzz lint protolint imports typecheck unit protos bench bench-quick container-test scale-test clean

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

# What `make serve` passes on top of the defaults; the test suite starts the same command beside
# itself (tests/integration/conftest.py) to prove it never needs the default ports. KServe v2
# over HTTP/REST is off by default in the library; `make serve` (like the container) turns it on.
SERVE_FLAGS := --reflection --http-port 8000

serve: install-serve
	$(BIN)/lstm-serve $(SERVE_FLAGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# buf lint, STANDARD rules, over protos/ (buf.yaml).
protolint: install
	$(BIN)/buf lint

# Import-layer contracts ([tool.importlinter] in pyproject.toml).
imports: install
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy

# Debian's redis-server and nginx: the state-store tests start their own redis-server
# (tests/state_services.py), the deployment tests check nginx configurations with nginx -t and the
# scale test proxies through nginx. Installed with apt-get as root, else a message naming the
# command; .ci/run runs the same script.
system-deps:
	@bash scripts/system-deps.sh

# The Prometheus rules (deploy/prometheus/): promtool check config/rules, and the rule unit tests.
# promtool is Debian's, unpacked by system-deps into .cache/prometheus (PROMETHEUS_DIR).
PROMETHEUS_DIR ?= $(or $(LSTM_SERVE_PROMETHEUS_DIR),.cache/prometheus)
PROMTOOL := $(PROMETHEUS_DIR)/usr/bin/promtool

monitoring-check: system-deps
	$(PROMTOOL) check config deploy/prometheus.yml
	$(PROMTOOL) check rules deploy/prometheus/lstm-serve.rules.yml
	$(PROMTOOL) test rules deploy/prometheus/lstm-serve.rules.test.yml

test: install system-deps monitoring-check lint protolint imports typecheck
	$(BIN)/pytest -q

# The hypothesis fuzzing of every RPC (health included) at 10,000 cases; the default test run
# does about 1,100.
fuzz: install
	LSTM_SERVE_FUZZ_EXAMPLES=10000 $(BIN)/pytest -q tests/integration/test_server_fuzz.py

protos: install
	$(BIN)/python -m protos.generate

# d2l (the book's code, the training baseline) pins 2023 releases of numpy/pandas/matplotlib that
# cannot sit beside this project's; it goes in with --no-deps, and the `bench` extra holds what it
# imports (see benchmarks/README.md).
$(STAMP_BENCH): pyproject.toml constraints.txt $(STAMP_ALL)
	$(PIP) -e '.[train,export,dev,bench]'
	$(BIN)/pip install -c constraints.txt --no-deps d2l==1.0.3
	touch $@

bench: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks.run --quick

# nginx + redis-server + three replicas as plain processes on loopback, kill -9 of one mid-run
# (see deploy/README.md).
scale-test: install system-deps
	$(BIN)/python scripts/scale_test.py --out .bench/scale-test.json

# Builds the image on a local Debian base and runs it for real (root, apt; see deploy/README.md).
container-test: install-serve
	bash scripts/container-test.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
