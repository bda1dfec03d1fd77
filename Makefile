# Quickstart: `make demo` runs the exporter against the built-in simulator;
# `make test` runs every check CI runs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test unit lint format bench attacks soak screenshot clean

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: Python 3.11 or newer is needed (set PYTHON=python3.x)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) \
		|| { echo "error: '$(PYTHON) -m venv' failed; on Debian: apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

demo: $(INSTALLED)
	$(BIN)/primeintellect-build-exporter --demo

test: lint
	$(BIN)/pytest

# The tests that start no outside tool (Prometheus, promtool, Alertmanager, hadolint, Helm).
unit: $(INSTALLED)
	$(BIN)/pytest -m 'not tooling'

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(INSTALLED)
	$(BIN)/python benchmarks/bench.py

attacks: $(INSTALLED)
	$(BIN)/python benchmarks/attacks.py

soak: $(INSTALLED)
	$(BIN)/python benchmarks/soak.py --builds 300 --duration 180

# The README's picture of the status page, made by its browser test's tooling.
screenshot: $(INSTALLED)
	UPDATE_SCREENSHOT=1 $(BIN)/pytest tests/test_status_page_browser.py -k screenshot

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build
