# livemask — run `make run` for the service on the simulated microscope, `make test` for the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench train clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# dev: test tools; train: torch (CPU build, pinned) + scikit-learn, so the training tests run
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,train]'
	touch $(STAMP)

## run: the service on the simulated microscope with a live console view (Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/livemask serve --config configs/simulated-nuclei.yaml --truth --view

## test: lint, type-check and the test suite
test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## train: reproduce the shipped nuclei model (needs the train extra: torch, CPU)
train: $(STAMP)
	$(BIN)/livemask train nuclei --out runs/nuclei
	$(BIN)/livemask train grains --out runs/grains

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
