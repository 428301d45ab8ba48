# The project's two set-up/run commands live here; see README.md.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"

test: install
	$(BIN)/ruff check uniperceiver_cli tests benchmarks
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check uniperceiver_cli tests benchmarks
