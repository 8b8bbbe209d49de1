# make test: install the test extras (torch CPU build first) and run lint, types and tests.
PY ?= python

.PHONY: test dev lint types pytest test-min gpu bench

test: dev lint types pytest

dev:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

lint:
	$(PY) -m ruff check memplan tests benchmarks scripts
	$(PY) -m ruff format --check memplan tests benchmarks scripts

types:
	$(PY) -m mypy

pytest:
	$(PY) -m pytest -q -p no:cacheprovider

# The calculator alone, without torch: what `memplan estimate` needs.
test-min:
	$(PY) -m pytest -q tests/test_cli.py tests/test_estimate.py

# CUDA tests (skipped without a GPU).
gpu:
	$(PY) -m pytest -q -m gpu

bench:
	$(PY) benchmarks/estimate_speed.py
