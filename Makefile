# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ARTIFACTS ?= artifacts
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test test-gpu test-fast bench trt-api clean photos synthetic-images bench-e2e

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
	$(BIN)/memexport predict tests/data -m $(ARTIFACTS)/resmem.onnx -o $(ARTIFACTS)/demo_scores.csv --device cpu --overwrite
	$(BIN)/python tools/demo_table.py $(ARTIFACTS)/demo_scores.csv tests/data/reference_scores.json

test: $(STAMP) trt-api
	$(BIN)/python -m pytest -q

# TensorRT Python binding wheels (about 1 MB each, never committed) for the API-surface test:
# every TensorRT name memexport uses must exist in 8.6.1 (Pascal) and in the newest 10.x; 11.x
# is fetched to check the names gated off there. Fixed tags, so any local Python can fetch them.
TRT_API_DIR := .trt-api
TRT_API_TAGS := --no-deps --only-binary=:all: --python-version 3.11 --implementation cp --abi none -q -d $(TRT_API_DIR)
trt-api: $(TRT_API_DIR)/.stamp
$(TRT_API_DIR)/.stamp: $(STAMP)
	$(PIP) download $(TRT_API_TAGS) --platform manylinux_2_17_x86_64 tensorrt-bindings==8.6.1
	$(PIP) download $(TRT_API_TAGS) --platform manylinux_2_28_x86_64 'tensorrt-cu12-bindings>=10,<11'
	$(PIP) download $(TRT_API_TAGS) --platform manylinux_2_28_x86_64 'tensorrt-cu12-bindings>=11,<12'
	touch $@

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# GPU tests: build and check TensorRT engines. Needs a CUDA GPU and TensorRT installed.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs

bench: $(ARTIFACTS)/resmem.onnx
	$(BIN)/memexport bench -m $(ARTIFACTS)/resmem.onnx --batch-sizes 1,16 --json $(ARTIFACTS)/bench.json

# Real photos for calibration and held-out checks: the sample images inside scikit-image's
# wheel, fetched once at install time into git-ignored folders (never committed, never at run time).
SKIMAGE_VERSION ?= 0.26.0
$(ARTIFACTS)/photos/.done: $(STAMP)
	mkdir -p .cache/wheels $(ARTIFACTS)/photos
	$(PIP) download -q --no-deps --only-binary=:all: -d .cache/wheels scikit-image==$(SKIMAGE_VERSION)
	unzip -q -o -j .cache/wheels/scikit_image-$(SKIMAGE_VERSION)-*.whl 'skimage/data/*.png' 'skimage/data/*.jpg' -d $(ARTIFACTS)/photos
	touch $@

photos: $(ARTIFACTS)/photos/.done

clean:
	rm -rf $(ARTIFACTS) .pytest_cache

# 2,000 seeded synthetic photo-like JPEGs for the end-to-end benchmark (git-ignored).
synthetic-images: $(STAMP)
	$(BIN)/python tools/synthetic_jpegs.py $(ARTIFACTS)/synthetic_jpegs --count 2000

# predict-pipeline images/s (decode+preprocess+infer) next to the model's own, in one run.
bench-e2e: $(ARTIFACTS)/resmem.onnx synthetic-images
	$(BIN)/memexport bench -m $(ARTIFACTS)/resmem.onnx --end-to-end $(ARTIFACTS)/synthetic_jpegs --batch-sizes 16 --json $(ARTIFACTS)/bench_e2e.json
