# Quickstart: `make demo` runs the exporter against the built-in simulator;
# `make test` runs every check CI runs; `make lock` refreshes the pinned versions in requirements/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two steps: the exporter and its demo (what `make demo` needs), then the dev toolchain.
RUNTIME := $(VENV)/.runtime
INSTALLED := $(VENV)/.installed
# The locks: every dependency at an exact version with its files' hashes. LOCK is what the
# exporter needs (also the image's), DEV_LOCK adds the dev toolchain at the same versions.
LOCK := requirements/runtime.txt
DEV_LOCK := requirements/dev.txt
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check
UPGRADE ?= --upgrade
LOCK_COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --generate-hashes $(UPGRADE) \
	--quiet --custom-compile-command 'make lock'
# Parallel test workers: more than the two cores CI has pay, as the tests also wait on
# subprocesses and outside tools (on 2 cores: 4 workers 162 s, 2 workers 208 s). Tests that
# share an expensive set-up carry one xdist_group, which keeps them on one worker.
TEST_WORKERS ?= 4
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

.PHONY: demo test test-under-load unit lint format lock bench attacks soak screenshot clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: Python 3.11 or newer is needed (set PYTHON=python3.x)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) \
		|| { echo "error: '$(PYTHON) -m venv' failed; on Debian: apt-get install python3-venv"; exit 1; }

# Each step installs its lock file (exact versions, every file's hash checked), then the
# exporter itself without dependencies: pip's hash mode cannot hash a source directory.
$(RUNTIME): pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_INSTALL) --require-hashes -r $(LOCK)
	$(PIP_INSTALL) --no-deps -e .
	@touch $@

$(INSTALLED): $(DEV_LOCK) $(RUNTIME)
	$(PIP_INSTALL) --require-hashes -r $(DEV_LOCK)
	@touch $@

# Refreshes both lock files from pyproject.toml: the newest versions its ranges allow, for
# Python 3.11 and up on any platform (CI runs 3.11, the image 3.12). `make lock UPGRADE=` only
# adds what pyproject.toml newly asks for and keeps every other pin. uv comes from the dev lock.
lock: $(INSTALLED)
	$(LOCK_COMPILE) -o $(LOCK)
	$(LOCK_COMPILE) --extra dev --constraint $(LOCK) -o $(DEV_LOCK)

demo: $(RUNTIME)
	$(BIN)/primeintellect-build-exporter --demo

test: lint
	$(PYTEST)

# The whole suite while two busy processes hold both cores, three times in a row: the tests
# must not depend on how fast or how busy the machine is.
test-under-load: $(INSTALLED)
	$(BIN)/python -m tests.helpers.under_load --runs 3 -- $(PYTEST)

# The tests that start no outside tool (Prometheus, promtool, Alertmanager, hadolint, Helm).
unit: $(INSTALLED)
	$(PYTEST) -m 'not tooling'

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
	UPDATE_SCREENSHOT=1 $(BIN)/pytest tests/deployment/test_status_page_browser.py -k screenshot

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build
