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

.PHONY: venv install demo demo-sft test test-fast clean gpu-check gpu-wheels

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

# LoRA fine-tuning on the shipped chat data, then generation (recipes/sft_lora_tiny.yaml; about 2 minutes on CPU)
demo-sft: $(VENV)/.installed
	$(BIN)/python -m megatrain.demo --sft

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests --durations=25

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests -m "not slow"

# The prepared GPU check (benchmarks/gpu_check.py, docs/kernels.md): on a bare machine with one NVIDIA GPU.
# WHEELS=DIR installs DeepSpeed and the packages the GPU image lacks from that folder (make gpu-wheels fills it).
gpu-check:
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# Wheels for a Python 3.12 GPU machine without network: DeepSpeed (pure Python, built here) and what it and
# megatrain need beyond that image (pydantic and its parts, hjson), plus Liger for the kernel comparisons.
GPU_WHEELS := pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	hjson==3.1.0 liger-kernel
gpu-wheels:
	$(PY) -m pip wheel -q --no-deps -w .whl $(DEEPSPEED)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)

clean:
	rm -rf runs data_cache build *.egg-info
