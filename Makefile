# The two commands a newcomer needs (both do all set-up first, idempotently):
#   make main   - BYOL pretraining on Fashion-MNIST on a local Ray cluster, MLflow logging, evaluation table
#   make test   - the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup main test test-fast lint screenshots bench clean

setup:
	@bash scripts/setup.sh

main: setup
	$(PY) -m byol_ray.train --config experiments/fmnist.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

# ruff (lint and format) and mypy, configured in pyproject.toml; CI runs this before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test-fast: setup
	$(PY) -m pytest -q -m "not ray" $(ARGS)

# The README's MLflow UI screenshots (docs/img/mlflow_*.png), retaken by the browser test.
screenshots: setup
	BYOL_UI_SCREENSHOTS=$(CURDIR)/docs/img $(PY) -m pytest -q tests/tracking/test_ui.py $(ARGS)

clean:
	rm -rf outputs .pytest_cache
