# `make demo` and `make test` set everything up on a fresh machine (creating .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

FASHION_MNIST_DIR := $(or $(CHAMELEON_FUSION_FASHION_MNIST),/usr/share/datasets/fashion-mnist)
FASHION_MNIST := $(FASHION_MNIST_DIR)/t10k-images-idx3-ubyte.gz

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: a bare `torch` requirement resolved by pip would pull a multi-GB CUDA build.
# A torch already in the venv that satisfies setup.cfg's range is kept.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# real Fashion-MNIST (MIT) from Debian's registry; the demo, the recipe and some tests read it
$(FASHION_MNIST):
	@command -v apt-get >/dev/null || { echo "install Debian's dataset-fashion-mnist, or set CHAMELEON_FUSION_FASHION_MNIST to a folder of the idx.gz files"; exit 1; }
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q dataset-fashion-mnist || \
	  { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q dataset-fashion-mnist; }

demo: $(VENV)/.installed $(FASHION_MNIST)
	$(BIN)/chameleon-fusion demo

test: $(VENV)/.installed $(FASHION_MNIST)
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed $(FASHION_MNIST)
	$(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.installed
	$(BIN)/ruff check chameleon_fusion tests benchmarks

clean:
	rm -rf $(VENV) demo_output build *.egg-info
