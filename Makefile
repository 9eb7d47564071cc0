# weightcache: `make demo` runs the main job end to end; `make test` runs the tests.
# Both set themselves up on a fresh Debian machine (a venv, pip, and the Debian packages the
# tests start). Nothing else needs installing by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-gpu lint typecheck system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build this project is tested with
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages the test suite starts: headless Chromium for the dashboard test.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium (Debian) for the dashboard test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

demo: $(STAMP)
	$(BIN)/weightcache demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -m "not slow and not gpu"

test-all: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -m "not gpu"

# On a GPU host: the CUDA path end to end.
test-gpu: $(STAMP)
	$(BIN)/pytest -m gpu

bench: $(STAMP)
	$(BIN)/python benchmarks/eviction_sim.py
	$(BIN)/python benchmarks/s3_pull.py

clean:
	rm -rf $(VENV) test-artifacts
