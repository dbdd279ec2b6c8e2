# Two commands on a fresh clone: `make serve` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 is a local CPU build on dev/CI machines; a bare `torch` would pull CUDA.
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch
	$(PIP) install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test]"
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
