# Developer shortcuts; each runs in the active virtual environment.
PYTHON ?= python

.PHONY: lint format test test-fast

# The type check runs through its gate test: mypy needs the package laid out as the installed
# namespace, which tests/test_types.py builds whatever the editable install's mode.
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_types.py

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test:
	$(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -m "not e2e"
