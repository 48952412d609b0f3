# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ARTIFACTS ?= artifacts
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test test-gpu test-fast bench trt-api clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[export,test]'
	# The published ResMem weights (non-commercial licence): installed, never vendored.
	# --no-deps: its torchvision dependency is not needed.
	$(PIP) install -q --no-deps resmem==1.1.6
	touch $(STAMP)

install: $(STAMP)

$(ARTIFACTS)/resmem.onnx: $(STAMP)
	$(BIN)/memexport export resmem -o $@

demo: $(ARTIFACTS)/resmem.onnx
	$(BIN)/memexport predict tests/data -m $(ARTIFACTS)/resmem.onnx -o $(ARTIFACTS)/demo_scores.csv --device cpu
	$(BIN)/python tools/demo_table.py $(ARTIFACTS)/demo_scores.csv tests/data/reference_scores.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# GPU tests: build and check TensorRT engines. Needs a CUDA GPU and TensorRT installed.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs

bench: $(ARTIFACTS)/resmem.onnx
	$(BIN)/memexport bench -m $(ARTIFACTS)/resmem.onnx --batch-sizes 1,16 --json $(ARTIFACTS)/bench.json

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
