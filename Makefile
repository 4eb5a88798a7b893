# Every target bootstraps its own virtualenv: on a fresh machine `make demo` and `make test` are the whole set-up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DATA_DISABLE_PROGRESS_BARS := 1

.PHONY: demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[models,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/totask-ray demo --method all

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=40

# The inner loop: no `ray start` cluster, no Label Studio server, no benchmark smoke (`-m "not slow"`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=10 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) .venv-sdk .pytest_cache build *.egg-info
