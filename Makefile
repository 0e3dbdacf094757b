# livemask — `make run`: the service on the simulated microscope; `make test`: the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint train bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# runtime only: what the service needs
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# dev: test tools; train: torch (pinned; the CPU build where the index serves it) + scikit-learn
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,train]'
	touch $@ $(RUN_STAMP)

## run: the service on the simulated microscope with a live console view (Ctrl-C stops it)
run: $(RUN_STAMP)
	$(BIN)/livemask serve --config configs/simulated-nuclei.yaml --truth --view

## test: lint, type-check and the test suite
test: $(TEST_STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/pytest -q --durations=15

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## train: reproduce the shipped U-Nets from the simulator with their cards' budgets (about
## 15 and 35 min on 2 cores)
train: $(TEST_STAMP)
	$(BIN)/livemask train nuclei --iterations 6000 --minutes 15 --out runs/nuclei
	$(BIN)/livemask train grains --minutes 35 --out runs/grains

## bench: inference, naive loop and full service fps + latency (see docs/performance.md)
bench: $(RUN_STAMP)
	mkdir -p benchmarks/results/local
	$(BIN)/livemask bench --json benchmarks/results/local/bench-cpu-512.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
