# MAE pipeline: `make run` sets up and runs the whole pipeline; `make test` sets up and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET_DIR := /usr/share/datasets/fashion-mnist
# make sweep: the key swept and its values (the paper's Figure 5 by default)
KEY ?= pretrain.mask_ratio
VALUES ?= 0.25,0.5,0.75,0.9
SET ?=
# EXPERIMENT: an MLflow experiment of the sweep's own (default: tracking.experiment)
EXPERIMENT ?=
# DVC stages call `mae-cli`: find it in the project's environment.
export PATH := $(abspath $(BIN)):$(PATH)
# MLflow's usage telemetry stays off unless you set MLFLOW_DISABLE_TELEMETRY=false
export MLFLOW_DISABLE_TELEMETRY ?= true

.DEFAULT_GOAL := help
.PHONY: help setup dataset run gpu-run sweep compare ui test test-fast test-gpu lint format clean

help: ## Show the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(VENV)/.installed dataset ## Create .venv, install the package with dev tools, install Fashion-MNIST

# Re-install only when the package metadata changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $@

dataset: ## Install Debian's dataset-fashion-mnist where apt is available
	@if ls $(DATASET_DIR)/*-idx?-ubyte.gz >/dev/null 2>&1; then \
		echo "Fashion-MNIST: found in $(DATASET_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST: not installed (no apt). Get the four *-idx?-ubyte.gz files from"; \
		echo "  https://github.com/zalandoresearch/fashion-mnist (data/fashion) and point data.source at them."; \
	fi

run: setup ## Set up, then run the whole pipeline with DVC (dvc repro)
	$(BIN)/dvc repro

GPU_RECIPE ?= recipes/fashion-mnist-gpu.yaml
gpu-run: setup ## Run the GPU recipe (GPU_RECIPE) as a DVC experiment, on every local GPU
	@# The recipe is checked against params.yaml first: a bad key stops here, named.
	@# With a DVC remote (`dvc remote add -d`), pull the shards (and any outputs it holds)
	@# instead of building them again.
	args="$$($(BIN)/python -m pipeline.tools.recipe $(GPU_RECIPE))" && \
		pull="$$($(BIN)/dvc remote default >/dev/null 2>&1 && echo --pull || true)" && \
		eval "$(BIN)/dvc exp run $$pull -n gpu-recipe $$args"

sweep: setup ## Queue and run a sweep of one key (KEY=... VALUES=a,b,...; SET='-S k=v', EXPERIMENT=), then compare
	@# Create the tracking store once: parallel first use of a fresh SQLite store fails.
	$(BIN)/python -c "from pipeline.params import load_params; from pipeline.tracking import connect; connect(load_params('params.yaml').tracking)"
	$(BIN)/dvc exp run --queue -S '$(KEY)=$(VALUES)' $(SET) \
		$(if $(EXPERIMENT),-S tracking.experiment=$(EXPERIMENT))
	$(BIN)/dvc queue start
	@while $(BIN)/dvc queue status | grep -qE 'Queued|Running'; do sleep 30; done
	$(BIN)/dvc queue status
	$(BIN)/mae-cli compare --by $(KEY) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

compare: ## Mask ratio vs downstream accuracy across tracked runs (plots/compare.png)
	$(BIN)/mae-cli compare

ui: ## The MLflow UI for this project's store on http://127.0.0.1:5000
	$(BIN)/mae-cli ui

# The tests run on every core (pytest-xdist), at most 4 workers (each a Python holding torch
# and MLflow; beyond 4 the longest test, ~4 min, bounds the run), a test file per worker at a time
# (its module fixtures are built once), the files with slow tests first (tests/conftest.py).
# WORKERS=0 runs them in this process, one after another.
WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest --numprocesses $(WORKERS) --maxprocesses 4 \
	--dist loadfile --no-loadscope-reorder

test: setup ## Set up, then run the test suite (all but GPU tests) on every core
	$(PYTEST) -m "not gpu"

test-fast: ## Run the tests without the slow ones (no set-up)
	$(PYTEST) -m "not gpu and not slow"

test-gpu: setup ## Run the tests that need CUDA (bf16, compile, NCCL)
	$(BIN)/python -m pytest -m gpu

lint: $(VENV)/.installed ## ruff: format check and lint
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(VENV)/.installed ## ruff: format and fix what it can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove caches (keeps .venv, data, models and mlflow.db)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
