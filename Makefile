# Everything a fresh machine needs: `make demo`, `make test`, `make lint`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SOURCES := pyproject.toml $(shell find bioproxy twisted -name '*.py')

.PHONY: demo test lint bench clean

# The venv, with bioproxy installed as users install it (not editable, so
# the twistd plugin is found exactly as in production).
$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q '.[test,lint]'
	touch $@

demo: $(VENV)/.installed
	BIN=$(BIN) sh scripts/demo.sh

test: $(VENV)/.installed
	$(BIN)/python -m twisted.trial tests

lint: $(VENV)/.installed
	$(BIN)/ruff check bioproxy tests twisted
	$(BIN)/ruff format --check bioproxy tests twisted
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python bench/passthrough.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
