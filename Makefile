# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

# what the demo and the library need
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# keeps a torch you installed yourself (e.g. a CUDA build); otherwise takes torch 2.13.0
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# plus the test and lint tools (pytest, ruff, diffusers as a reference, OpenCV, onnxruntime)
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)  # flux-nano, shipped in diffsynth/nano/flux-nano: no training, no download
	$(BIN)/diffsynth demo --output demo_output/image.png --overwrite  # its own folder: replaced on each run

nano: $(STAMP)  # rebuild flux-nano from scratch (fixed seeds; see diffsynth/nano/flux-nano/BUILD.md)
	OMP_NUM_THREADS=1 $(BIN)/python -m diffsynth.nano.build

test: $(TEST_STAMP)  # everything but the tests marked slow (each over ~15 s); CI runs both targets
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

lint: $(TEST_STAMP)
	$(BIN)/ruff check diffsynth tests benchmarks examples
	$(BIN)/python -m pytest -q tests/test_layering.py

.PHONY: install demo nano test test-slow test-all lint
