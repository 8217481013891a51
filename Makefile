# Two commands: `make demo` and `make test`. Everything else is a helper for those two.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0
DEEPSPEED := deepspeed==0.19.8
# One ninja for every JIT build: two versions read each other's .ninja_log as changed and rebuild everything.
NINJA := ninja==1.13.2
export PYTHONUNBUFFERED := 1
# JIT-built ops (DeepSpeed's CPU shared-memory comm, megatrain's C++ AdamW) live inside this checkout's venv:
# a fresh clone never shares (or waits on the lock of) another checkout's half-finished build.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
# ... built by the venv's ninja, not whichever the shell finds first (megatrain also pins it on import).
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv install demo test test-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; else $(BIN)/pip install -q $(TORCH_CPU); fi
	$(BIN)/pip install -q $(DEEPSPEED) triton $(NINJA) pytest
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m megatrain.warmup
	touch $@

venv install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m megatrain.demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests --durations=25

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests -m "not slow"

clean:
	rm -rf runs data_cache build *.egg-info
