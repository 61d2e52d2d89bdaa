# Two commands set everything up from nothing: `make bench` (the main job) and `make test`.
PYTHON_BOOT ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEV_PACKAGES := ninja setuptools wheel numpy pytest hypothesis ruff matplotlib tqdm
export MAX_JOBS ?= 2
export FUSED_XENT_REQUIRE_EXTENSION ?= 1
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

KERNEL_SOURCES := setup.py $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))
VENV_STAMP := $(VENV)/.fused_xent-deps
BUILD_STAMP := build/.fused_xent-built

.PHONY: install build test bench lint gpu-check clean

install: $(BUILD_STAMP)

$(VENV_STAMP):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" $(DEV_PACKAGES)
	touch $@

# Builds fused_xent/_C in place (ninja, incremental) and puts the checkout on the venv's path.
$(BUILD_STAMP): $(VENV_STAMP) $(KERNEL_SOURCES)
	$(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) -c "import site, sys; open(site.getsitepackages()[0] + '/fused_xent-dev.pth', 'w').write(sys.argv[1])" "$(CURDIR)"
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PYTHON) -m pytest tests

bench: $(BUILD_STAMP)
	$(PYTHON) benchmarks/bench.py

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check fused_xent tests benchmarks setup.py

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build fused_xent/_C*.so *.egg-info
