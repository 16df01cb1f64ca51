# moegpt: `make demo` sets up and runs the main job; `make test` runs the test suite.
# torch is installed first, pinned, so nothing resolves to a multi-GB CUDA build.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# Extra pip arguments for the torch install, e.g. a CPU-only index on a machine whose default
# index serves CUDA builds: make demo TORCH_PIP_ARGS="--index-url <your CPU-only wheel index>"
TORCH_PIP_ARGS ?=

.PHONY: demo test test-quick bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,plot,serve]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/moegpt demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

# the tests not marked slow (no torchrun groups, servers or training runs): about a minute
test-quick: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs bench/results
