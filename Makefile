# Two-command start: `make demo` runs the main job on the offline default, `make test` runs the tests.
# Both create the virtual environment first when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# Offline data and weights: the team's shared folders beside the checkout when present.
SHARED ?= $(abspath ../shared)
ifneq ($(wildcard $(SHARED)/data),)
export BENCH_DATA_DIR ?= $(SHARED)/data
endif
ifneq ($(wildcard $(SHARED)/weights),)
export BENCH_WEIGHTS_DIR ?= $(SHARED)/weights
endif
export BENCH_CACHE_DIR ?= $(abspath .cache/bench)
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test check leaderboard clean

$(BIN)/bench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,sweep]'
	touch $@

setup: $(BIN)/bench

# AToP (RT2 + GAN purifier, fine-tuned; the shipped checkpoint) before the shared ResNet-20, the fixed 512-image
# subset, linf 8/255, the suite's cpu budget on a CPU (about 6 minutes on 2 cores; see docs/quickstart.md).
demo: setup
	$(BIN)/bench run --defense atop --threat linf

test: setup
	$(BIN)/python -m pytest -q

# Regression checks of the committed leaderboards (records valid, markdown fresh, smoke entries rerun).
check: setup
	$(BIN)/bench check

leaderboard: setup
	$(BIN)/bench leaderboard

clean:
	rm -rf runs .cache .pytest_cache
