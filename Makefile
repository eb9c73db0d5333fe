# Common commands. `make report` sets everything up and writes the reports; `make test` runs the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS ?= tiny.en
DATA ?= demo
OUT ?= reports
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install system lint format test test-fast test-notebooks report bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps openai-whisper==20250625
	$(BIN)/xattn models --prepare
	touch $(STAMP)

install: system $(STAMP) ## virtual env at .venv, packages, system packages, model conversion

system: ## system packages (espeak-ng, to regenerate the synthetic corpus); skipped without root
	@if command -v espeak-ng >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq espeak-ng libespeak-ng1) >/dev/null; \
	else echo "espeak-ng not installed (only needed to regenerate data/raw/demo): apt-get install espeak-ng"; fi

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff format and fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint ## the whole test suite (tiny random model, real bundled models, notebooks)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## tests on the tiny random model only
	$(BIN)/python -m pytest -m "not slow and not notebooks" $(PYTEST_ARGS)

test-notebooks: $(STAMP) ## run every notebook headless on the tiny random model
	$(BIN)/python -m pytest -m notebooks $(PYTEST_ARGS)

report: install ## run every analysis notebook on the bundled models and demo data; HTML in reports/
	$(BIN)/xattn report --models $(MODELS) --data $(DATA) --out $(OUT)

bench: $(STAMP) ## benchmarks (print measured ratios)
	$(BIN)/python benchmarks/saliency.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/mixing.py

clean: ## remove reports and caches (not the venv)
	rm -rf reports out .pytest_cache .ruff_cache
