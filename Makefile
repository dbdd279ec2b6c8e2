# Two commands on a fresh clone: `make serve` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test lint install clean

$(STAMP): pyproject.toml setup.py router/_block_map.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 is a local CPU build on dev/CI machines; a bare `torch` would pull CUDA.
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch
	$(PIP) install -q -e .
	# NIXL (KV transfer): the cu12 build runs on CPU too. The `nixl` meta package would
	# pull a CUDA torch, so it goes in without dependencies. Failure is not fatal: workers
	# then fall back to the tcp transport and say so.
	$(PIP) install -q nixl-cu12 && $(PIP) install -q --no-deps "nixl==1.5.1" || \
		echo "NIXL did not install: KV transfer will use the tcp fallback"
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test]"
	# Debian's Chromium for the dashboard's browser test (it skips, saying so, without it).
	command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "Chromium did not install: the dashboard's browser test will skip"
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/baton serve $(ARGS)

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# AIPerf (load generator for benchmarks/serve.py) is a ~1.2 GiB install: its own venv.
.PHONY: bench-deps
bench-deps:
	$(PYTHON) -m venv .venv-aiperf
	.venv-aiperf/bin/pip install -q aiperf
