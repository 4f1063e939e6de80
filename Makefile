# Two entry points for a new user: `make run` (the main job on the embedded default) and `make test`.
# Both create the virtual environment on first use, with the exact versions of constraints.txt
# (pyproject.toml holds only lower bounds).
#
# Which torch wheel: by default pip's own index (PyPI; on Linux x86 that wheel bundles CUDA 12 libraries,
# elsewhere it is the CPU build). To pick a PyTorch index, name it:
#   make setup TORCH_INDEX=cpu      # https://download.pytorch.org/whl/cpu   (small, CPU only)
#   make setup TORCH_INDEX=cu126    # https://download.pytorch.org/whl/cu126 (any cuXYZ PyTorch publishes)
#   make setup TORCH_INDEX_URL=https://mirror.example/whl/cu128   # any other index
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
TORCH_INDEX ?=
TORCH_INDEX_URL ?= $(if $(TORCH_INDEX),https://download.pytorch.org/whl/$(TORCH_INDEX),)
# the torch version of the constraints file, for an index whose wheels carry a local tag (2.13.0+cpu)
TORCH_PIN := $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
EXTRAS ?= dev,parquet,eval,lora,tensorboard

.PHONY: setup run test lint bench

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_PIN) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed

# --force: a second `make run` archives the previous runs/compare (as runs/compare.old-<time>) first;
# --device cpu: the main job's numbers are the CPU's, also on a machine with a GPU.
run: setup
	$(VENV)/bin/llada-trm compare --config configs/compare_tiny.yaml --force --device cpu

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
