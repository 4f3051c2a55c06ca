# Developer shortcuts; each runs in the active virtual environment.
PYTHON ?= python

.PHONY: lint format test test-fast

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test:
	$(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -m "not e2e"
