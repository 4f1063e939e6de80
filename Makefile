# Two entry points for a new user: `make run` (the main job on the embedded default) and `make test`.
# Both create the virtual environment on first use; torch is pinned to the CPU wheel available here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,parquet,eval,lora,tensorboard]'
	touch $@

setup: $(VENV)/.installed

# --force: a second `make run` archives the previous runs/compare (as runs/compare.old-<time>) first.
run: setup
	$(VENV)/bin/llada-trm compare --config configs/compare_tiny.yaml --force

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
