# moegpt: `make demo` sets up and runs the main job; `make test` runs the test suite.
# torch is installed first, pinned, so nothing resolves to a multi-GB CUDA build.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# Extra pip arguments for the torch install, e.g. a CPU-only index on a machine whose default
# index serves CUDA builds: make demo TORCH_PIP_ARGS="--index-url <your CPU-only wheel index>"
TORCH_PIP_ARGS ?=

.PHONY: demo demo-context demo-vision test test-quick bench bench-llama-cpp install install-dev clean

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

# context extension (docs/finetune.md): a tiny model pre-trained at 128 tokens, taught passkey
# retrieval at 128, then extended to 512 (YaRN) on pass keys of 128-512 tokens and text; passkey by length and depth
# before and after, and text perplexity by position against the pre-trained model's; about 14.5 minutes
demo-context: $(VENV)/.installed-dev
	$(BIN)/moegpt demo --set max_seq_len=128 --out runs/demo-128
	rm -rf runs/passkey-128 runs/context
	$(BIN)/moegpt finetune --model runs/demo-128 --out runs/passkey-128 --data passkey:1 --seq-len 128 --steps 1000 --eval-max 100
	$(BIN)/moegpt finetune --model runs/passkey-128 --out runs/context --context 4x --data passkey:2,text:1 --lr 3e-3 \
		--steps 700 --reference runs/demo-128

# vision (docs/vision.md): the demo model (made first if runs/demo is not there) joined to a fresh
# image tower, resampler and gated cross-attention. The tower and resampler first learn the scenes on
# their own (600 steps), then the joined model learns to describe them (900 steps, the tiny language
# model training too); prints held-out accuracy with the images shuffled as the control; about 12.5
# minutes. Scenes only: screenshots mixed in kept the gates shut and transcription is not learned
# yet (docs/vision.md)
demo-vision: $(VENV)/.installed
	test -f runs/demo/config.json || $(BIN)/moegpt demo
	rm -rf runs/vision
	$(BIN)/moegpt train-vision --model runs/demo --out runs/vision --train-text --data shapes:1 --steps 900

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

# the tests not marked slow (no torchrun groups, servers or training runs): about a minute
test-quick: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/run_all.py

# moegpt against llama.cpp on the same weights (bench/llama_cpp.py): installs llama-cpp-python first,
# which builds llama.cpp from source (~15 min on 2 cores, once); `make bench` runs it when installed
bench-llama-cpp: $(VENV)/.installed-dev
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install "llama-cpp-python==0.3.36"
	$(BIN)/python -m bench.llama_cpp

clean:
	rm -rf $(VENV) runs bench/results
